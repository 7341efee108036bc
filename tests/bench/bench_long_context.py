"""Long context: a long prompt's prefill, and decoding at that context, against llama.cpp on the same file.

    python tests/bench/bench_long_context.py [MODEL.gguf] [--context 16384] [--threads N] [--tokens 16]
                                             [--short 512]

Without MODEL it writes the k2-slice preset (Kimi K2's real widths, 3 layers, 16 experts) at Q4_K_M. Each
engine runs in a fresh process: a --context-token prompt prefilled in 512-row chunks (llama.cpp's n_batch and
our --step-tokens), then --tokens greedy tokens decoded at that context; the same for a --short prompt, so
that what the long context costs shows apart from the weights'. llama.cpp runs without flash attention and
with it (its programs' default on the CPU); ours attends a prompt's rows with matmuls, as llama.cpp does
without, and a decoding row with flash attention. Prompts are token ids, the same for both.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import bench_model, bench_parser, run_with_peak_rss  # noqa: E402

OURS = """
import json, sys, time
from runtime.engine import Engine, GenerationStats
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel
args = json.load(open(sys.argv[1]))  # the prompt outgrows a command line
model = KimiModel(GGUFModelFile(args["model"]), GgmlRunner(args["threads"]), repack="all")
model.load()
engine = Engine(model, len(args["prompt"]) + args["tokens"] + 64, max_sequences=1, max_step_tokens=512)
stats = GenerationStats()
list(engine.generate(args["prompt"], args["tokens"], stats=stats))
print(json.dumps({"prompt_tokens_per_s": stats.prompt_tokens_per_s, "tokens_per_s": stats.decode_tokens_per_s}))
"""

LLAMA = """
import json, sys, time
import numpy as np
import llama_cpp
args = json.load(open(sys.argv[1]))  # the prompt outgrows a command line
llm = llama_cpp.Llama(args["model"], n_ctx=len(args["prompt"]) + args["tokens"] + 64, n_batch=512, n_ubatch=512,
                      n_threads=args["threads"], n_threads_batch=args["threads"], flash_attn=args["flash"],
                      verbose=False)
start = time.perf_counter()
llm.eval(args["prompt"])
prompt_s = time.perf_counter() - start
logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
token = int(np.argmax(logits()))
start = time.perf_counter()
for _ in range(args["tokens"] - 1):
    llm.eval([token])
    token = int(np.argmax(logits()))
print(json.dumps({"prompt_tokens_per_s": len(args["prompt"]) / prompt_s,
                  "tokens_per_s": (args["tokens"] - 1) / (time.perf_counter() - start)}))
"""


def run(script: str, settings: dict) -> dict:
    """One engine's figures, from a fresh process that reads its settings from a file."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(settings, file)
        file.flush()
        result, peak = run_with_peak_rss([sys.executable, "-c", script, file.name])
    return {**result, "peak_rss": peak}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--context", type=int, default=16384, help="the long prompt's tokens (default %(default)s)")
    parser.add_argument("--short", type=int, default=512, help="the short prompt's tokens (default %(default)s)")
    parser.set_defaults(tokens=16)
    args = parser.parse_args()
    model = bench_model(args.model)
    from runtime.gguf_file import GGUFModelFile
    vocab = int(len(GGUFModelFile(model).metadata["tokenizer.ggml.tokens"]))
    prompts = {length: [int(t) for t in np.random.default_rng(length).integers(100, vocab - 300, length)]
               for length in (args.short, args.context)}
    engines = {"kimi-cluster": (OURS, {}), "llama.cpp": (LLAMA, {"flash": False}),
               "llama.cpp FA": (LLAMA, {"flash": True})}
    print(f"model: {model}, threads: {args.threads}, prompts of {args.short} and {args.context} tokens, then "
          f"{args.tokens} tokens decoded")
    figures: dict[tuple[str, int], dict] = {}
    for length, prompt in prompts.items():
        for name, (script, extra) in engines.items():
            settings = {"model": str(model), "prompt": prompt, "tokens": args.tokens, "threads": args.threads,
                        **extra}
            figures[name, length] = run(script, settings)
            print(f"  {name:13s} {length:6d}-token prompt: prefill {figures[name, length]['prompt_tokens_per_s']:8.2f} "
                  f"tok/s, decode {figures[name, length]['tokens_per_s']:7.2f} tok/s, peak RSS "
                  f"{figures[name, length]['peak_rss'] / 1e9:.2f} GB", flush=True)
    print(f"\n{'':34s}{'kimi-cluster':>13s}{'llama.cpp':>11s}{'ratio':>8s}{'llama.cpp FA':>14s}{'ratio':>8s}")
    for length in prompts:
        for key, label in (("prompt_tokens_per_s", "prefill tok/s"), ("tokens_per_s", "decode tok/s")):
            ours, plain, flash = (figures[name, length][key] for name in engines)
            print(f"  {label:15s} at {length:6d} tokens {ours:13.2f}{plain:11.2f}{ours / plain:7.2f}x"
                  f"{flash:14.2f}{ours / flash:7.2f}x")
    for name in engines:
        long, short = figures[name, args.context], figures[name, args.short]
        prefill, decode = (long[key] / short[key] for key in ("prompt_tokens_per_s", "tokens_per_s"))
        print(f"  {name:13s} at {args.context} tokens keeps {prefill:.0%} of its prefill rate and {decode:.0%} of "
              "its decode rate")


if __name__ == "__main__":
    main()
