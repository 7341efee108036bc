"""Writers of synthetic models in Kimi's exact GGUF layout, for demos, tests and benchmarks: the demo model
and its vocabulary, scripted models that write given token sequences, and the sparse replica of Kimi K2.6's
file set. They use the runtime (its tokenizer); the runtime never uses them."""
