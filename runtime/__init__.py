"""The runtime: everything needed to run the model in one process (GGUF reading, tokenizer and chat template,
ggml graphs, KV cache, router, experts, sampling, grammar masks, text and tool-call output, the engine).

It imports neither ray, grpc, HTTP libraries nor cluster/; only its ggml_*.py modules import ggml.
The writers of synthetic models (demo, scripted, replica) live apart, in runtime/synthetic/.
"""
