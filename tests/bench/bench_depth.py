"""Decode speed at Kimi K2's depth: one process, `--workers 1` and `--workers 2` against llama.cpp.

    python tests/bench/bench_depth.py [MODEL.gguf] [--threads N] [--rounds R] [--tokens N]

Without MODEL it writes the k2-depth preset (61 layers, 384 experts, 8 used, tiny widths) quantized to
Q4_K_M by llama.cpp, so that what is measured is the framework's cost per layer rather than the math.
Each round runs the four in turn in fresh processes (greedy, the same prompt and thread count); the
medians over rounds are compared, and each is also given as milliseconds per token per layer.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from runtime.config import ModelConfig  # noqa: E402
from runtime.gguf_file import GGUFModelFile  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402
from tests.bench.bench_decode import (LLAMA_SCRIPT, bench_model, bench_parser, median_decode_speeds,  # noqa: E402
                                     prompt_of_exact_length)


def main() -> None:
    args = bench_parser(__doc__, preset="k2-depth").parse_args()

    model = bench_model(args.model, preset="k2-depth")
    model_file = GGUFModelFile(model)
    num_layers = ModelConfig.from_metadata(model_file.metadata).num_layers
    text, ids = prompt_of_exact_length(Tokenizer.from_metadata(model_file.metadata))
    ours = [sys.executable, "-m", "cluster.cli", "generate", str(model), "--prompt", text, "--max-tokens",
            str(args.tokens), "--threads", str(args.threads), "--json"]
    commands = {
        "one process": ours,
        "--workers 1": ours + ["--workers", "1"],
        "--workers 2": ours + ["--workers", "2"],
        "llama.cpp": [sys.executable, "-c", LLAMA_SCRIPT, json.dumps({"model": str(model), "prompt": ids,
                                                                       "tokens": args.tokens,
                                                                       "threads": args.threads})],
    }
    print(f"model: {model} ({model_file.file_bytes / 1e9:.2f} GB, {num_layers} layers), threads: {args.threads}, "
          f"generate: {args.tokens} tokens, rounds: {args.rounds} (+1 warm-up)")
    speeds = median_decode_speeds(commands, args.rounds)
    one_process, llama = speeds["one process"], speeds["llama.cpp"]
    print("\nmedian decode     tok/s  ms/token  ms/token/layer  vs one process  vs llama.cpp")
    for name, rate in speeds.items():
        print(f"  {name:12s} {rate:8.2f} {1000 / rate:9.2f} {1000 / rate / num_layers:15.3f} "
              f"{rate / one_process:14.2f}x {rate / llama:12.2f}x")


if __name__ == "__main__":
    main()
