"""The head on a GPU: parity with the CPU path, and prefill and decode against llama.cpp with the same split.

    python tests/bench/bench_gpu.py [MODEL.gguf] [--gpu 0] [--prompt 512] [--tokens 32] [--threads N]

Without MODEL it writes the k2-slice and k2-depth presets at Q4_K_M to build/. For each model, in fresh
processes: kimi-cluster with the head's weights on the device (`--gpu`), kimi-cluster on the CPU alone, and
llama.cpp with every layer on the GPU and the routed experts on the CPU (`-ngl 99 -ot exps=CPU`). Each prefills
the same --prompt token ids, then decodes --tokens greedy tokens. It builds nothing: ggml-python and
llama-cpp-python must already have the GPU's backend (tests/gpu/check.sh builds them). `--gpu cpu` runs the
device path with the CPU standing in, and llama.cpp on the CPU, which checks this script on any machine.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import bench_model, bench_parser  # noqa: E402
from bench_long_context import run  # noqa: E402

OURS = """
import json, sys
import numpy as np
from runtime.engine import Engine, GenerationStats
from runtime.ggml_backends import ComputeDevice, choose_device
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel, device_weight_bytes
args = json.load(open(sys.argv[1]))  # the prompt outgrows a command line
model_file = GGUFModelFile(args["model"])
device = None
if args["gpu"] is not None:
    info, line = choose_device(args["gpu"], device_weight_bytes(model_file))
    print(line, file=sys.stderr)
    device = ComputeDevice(info)
model = KimiModel(model_file, GgmlRunner(args["threads"]), repack="experts", device=device)
model.load(progress=False)
engine = Engine(model, len(args["prompt"]) + args["tokens"] + 64, max_sequences=1, max_step_tokens=512)
list(engine.generate(args["prompt"][:8], 2))  # builds and warms the graphs and the device
stats = GenerationStats()
tokens = list(engine.generate(args["prompt"], args["tokens"], stats=stats))
print(json.dumps({"prompt_tokens_per_s": stats.prompt_tokens_per_s, "tokens_per_s": stats.decode_tokens_per_s,
                  "tokens": tokens, "logits": stats.prompt_logits.tolist()}))
"""

LLAMA = """
import ctypes, json, sys, time
from pathlib import Path
import numpy as np
import llama_cpp
args = json.load(open(sys.argv[1]))
if args["gpu"]:
    # -ot exps=CPU: llama-cpp-python has no argument for it, so its default model parameters carry the override.
    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu.so*"))))
    lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    class Override(ctypes.Structure):
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]
    overrides = (Override * 2)(Override(b"exps", lib.ggml_backend_cpu_buffer_type()), Override(None, None))
    defaults = llama_cpp.llama_model_default_params
    def with_experts_on_the_cpu():
        params = defaults()
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        return params
    llama_cpp.llama_model_default_params = with_experts_on_the_cpu
llm = llama_cpp.Llama(args["model"], n_ctx=len(args["prompt"]) + args["tokens"] + 64, n_batch=512, n_ubatch=512,
                      n_threads=args["threads"], n_threads_batch=args["threads"], n_gpu_layers=99 if args["gpu"] else 0,
                      flash_attn=True, verbose=False)
logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
llm.eval(args["prompt"][:8])
llm.reset()
start = time.perf_counter()
llm.eval(args["prompt"])
prompt_s = time.perf_counter() - start
first = logits()
tokens = [int(np.argmax(first))]
start = time.perf_counter()
for _ in range(args["tokens"] - 1):
    llm.eval([tokens[-1]])
    tokens.append(int(np.argmax(logits())))
print(json.dumps({"prompt_tokens_per_s": len(args["prompt"]) / prompt_s,
                  "tokens_per_s": (args["tokens"] - 1) / (time.perf_counter() - start),
                  "tokens": tokens, "logits": first.tolist()}))
"""


def agreement(ours: dict, reference: dict) -> str:
    """How far the prompt's logits are apart (relative to the reference's range) and how many greedy tokens
    agree before the first difference."""
    a, b = np.array(ours["logits"]), np.array(reference["logits"])
    same = next((i for i, (x, y) in enumerate(zip(ours["tokens"], reference["tokens"])) if x != y),
                len(ours["tokens"]))
    return f"logits {np.abs(a - b).max() / np.ptp(b):.1e} of the range apart, {same}/{len(ours['tokens'])} tokens alike"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--gpu", default="0", help="the device: a GPU's number, or cpu (default %(default)s)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default %(default)s)")
    parser.set_defaults(tokens=32)
    args = parser.parse_args()
    gpu = int(args.gpu) if args.gpu.isdigit() else args.gpu
    models = [bench_model(args.model)] if args.model else [bench_model(None, p) for p in ("k2-slice", "k2-depth")]
    from runtime.gguf_file import GGUFModelFile
    for model in models:
        vocab = int(len(GGUFModelFile(model).metadata["tokenizer.ggml.tokens"]))
        prompt = [int(t) for t in np.random.default_rng(args.prompt).integers(100, vocab - 300, args.prompt)]
        settings = {"model": str(model), "prompt": prompt, "tokens": args.tokens, "threads": args.threads}
        figures = {"kimi-cluster device": run(OURS, {**settings, "gpu": gpu}),
                   "kimi-cluster CPU": run(OURS, {**settings, "gpu": None}),
                   "llama.cpp device": run(LLAMA, {**settings, "gpu": gpu != "cpu"})}
        print(f"\n{model.name}: {args.prompt}-token prompt, {args.tokens} tokens decoded, {args.threads} threads, "
              f"device {args.gpu}")
        for name, f in figures.items():
            print(f"  {name:19s} prefill {f['prompt_tokens_per_s']:9.2f} tok/s   decode {f['tokens_per_s']:8.2f} "
                  f"tok/s   peak RSS {f['peak_rss'] / 2**30:.2f} GiB")
        ours, cpu, llama = figures.values()
        print(f"  ratio to llama.cpp: prefill {ours['prompt_tokens_per_s'] / llama['prompt_tokens_per_s']:.2f}x, "
              f"decode {ours['tokens_per_s'] / llama['tokens_per_s']:.2f}x")
        print(f"  parity: against our CPU path {agreement(ours, cpu)}; against llama.cpp {agreement(ours, llama)}")


if __name__ == "__main__":
    main()
