"""Decode and prompt speed of `kimi-cluster generate` against llama.cpp on the same file, side by side.

    python tests/bench/bench_decode.py [MODEL.gguf] [--threads N] [--rounds R] [--tokens N]

Without MODEL it writes the k2-slice preset (Kimi K2's real widths, 3 layers, 16 experts) quantized to
Q4_K_M by llama.cpp. Each round runs our CLI and llama.cpp (llama-cpp-python, with flash attention as
llama.cpp's own programs default to on the CPU) one after the other in fresh processes, with the same thread count and greedy decoding: once with a
128-token prompt (decode speed), once with a 512-token prompt (prefill speed, one 512-row batch on both
sides). The medians over rounds are compared. Peak RSS is read from /proc while each process runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from runtime.gguf_file import GGUFModelFile  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

DECODE_PROMPT_TOKENS, PREFILL_PROMPT_TOKENS = 128, 512
TEXT = ("Kimi pools the memory of several machines so that a model too large for any one of them can run. "
        "Each layer's experts are spread over every node, and hidden states travel between them. ") * 40

LLAMA_SCRIPT = """
import json, resource, sys, time
import numpy as np
import llama_cpp
args = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=args["model"], n_ctx=1024, n_batch=512, n_threads=args["threads"],
                      n_threads_batch=args["threads"], flash_attn=True, verbose=False)
start = time.perf_counter()
llm.eval(args["prompt"])
prompt_s = time.perf_counter() - start


def last_logits():  # Llama.scores is not filled without logits_all; read the context's own output row
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


token = int(np.argmax(last_logits()))
start = time.perf_counter()
for _ in range(args["tokens"] - 1):
    llm.eval([token])
    token = int(np.argmax(last_logits()))
decode_s = time.perf_counter() - start
print(json.dumps({"prompt_tokens_per_s": len(args["prompt"]) / prompt_s,
                  "tokens_per_s": (args["tokens"] - 1) / decode_s,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_with_peak_rss(cmd: list[str]) -> tuple[dict, int]:
    """Run a command that prints one JSON object; return it and the process's peak RSS (VmHWM)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    peak = 0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak


def prompt_of_exact_length(tokenizer: Tokenizer, length: int = DECODE_PROMPT_TOKENS) -> tuple[str, list[int]]:
    ids = tokenizer.encode(TEXT)[:length]
    text = tokenizer.decode(ids)
    ids = tokenizer.encode(text)
    if len(ids) != length:
        raise RuntimeError(f"prompt re-tokenizes to {len(ids)} tokens, expected {length}")
    return text, ids


def bench_parser(description: str, preset: str = "k2-slice") -> argparse.ArgumentParser:
    """The options every decode benchmark takes: MODEL, --threads, --rounds, --tokens."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help=f"GGUF file (default: make the {preset} Q4_K_M file)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate per run")
    return parser


def median_decode_speeds(commands: dict[str, list[str]], rounds: int,
                         check: Callable[[str, dict], None] | None = None) -> dict[str, float]:
    """Run every command once per round, in turn, after one warm-up round (it fills the page cache for
    all); median decode tokens/s of each. check(name, result) looks at every run's output."""
    speeds: dict[str, list[float]] = {name: [] for name in commands}
    for round_no in range(rounds + 1):
        for name, command in commands.items():
            result, _ = run_with_peak_rss(command)
            if check is not None:
                check(name, result)
            if round_no > 0:
                speeds[name].append(result["tokens_per_s"])
                print(f"  round {round_no} {name:12s} decode {result['tokens_per_s']:7.2f} tok/s", flush=True)
    return {name: statistics.median(values) for name, values in speeds.items()}


def bench_model(path: str | None, preset: str = "k2-slice") -> Path:
    """The given GGUF, or the preset's Q4_K_M file in build/, written on first use."""
    model = Path(path) if path else REPO_ROOT / "build" / f"{preset}-Q4_K_M.gguf"
    if not model.exists():
        from runtime.synthetic.demo_model import make_model
        print(f"writing {model} ({preset}, Q4_K_M) ...", flush=True)
        make_model(model, preset, "Q4_K_M")
    return model


def main() -> None:
    args = bench_parser(__doc__).parse_args()

    model = bench_model(args.model)
    model_file = GGUFModelFile(model)
    tokenizer = Tokenizer.from_metadata(model_file.metadata)

    def commands(prompt_tokens: int) -> dict[str, list[str]]:
        text, ids = prompt_of_exact_length(tokenizer, prompt_tokens)
        return {"kimi-cluster": [sys.executable, "-m", "cluster.cli", "generate", str(model), "--prompt", text,
                                 "--max-tokens", str(args.tokens), "--threads", str(args.threads), "--json"],
                "llama.cpp": [sys.executable, "-c", LLAMA_SCRIPT, json.dumps(
                    {"model": str(model), "prompt": ids, "tokens": args.tokens, "threads": args.threads})]}
    runs = {"decode": commands(DECODE_PROMPT_TOKENS), "prefill": commands(PREFILL_PROMPT_TOKENS)}

    print(f"model: {model} ({model_file.file_bytes / 1e9:.2f} GB), threads: {args.threads}, prompts: "
          f"{DECODE_PROMPT_TOKENS} tokens (decode), {PREFILL_PROMPT_TOKENS} tokens (prefill), generate: "
          f"{args.tokens} tokens, rounds: {args.rounds} (+1 warm-up)")
    results: dict[tuple[str, str], list[tuple[dict, int]]] = {(kind, name): [] for kind in runs for name in runs[kind]}
    for round_no in range(args.rounds + 1):
        for kind, cmds in runs.items():
            for name, cmd in cmds.items():
                result = run_with_peak_rss(cmd)
                if round_no > 0:  # the first round warms the page cache for both
                    results[kind, name].append(result)
                    print(f"  round {round_no} {kind:7s} {name:12s} decode {result[0]['tokens_per_s']:7.2f} tok/s   "
                          f"prompt {result[0]['prompt_tokens_per_s']:8.2f} tok/s   peak RSS {result[1] / 1e9:.2f} GB",
                          flush=True)

    def median(kind: str, name: str, key: str) -> float:
        return statistics.median(r[0][key] for r in results[kind, name])

    print("\nmedians                                kimi-cluster    llama.cpp    ratio")
    for label, kind, key in ((f"decode tokens/s ({DECODE_PROMPT_TOKENS}-token prompt)", "decode", "tokens_per_s"),
                             (f"prompt tokens/s ({DECODE_PROMPT_TOKENS}-token prompt)", "decode", "prompt_tokens_per_s"),
                             (f"prompt tokens/s ({PREFILL_PROMPT_TOKENS}-token prompt)", "prefill", "prompt_tokens_per_s")):
        ours, theirs = median(kind, "kimi-cluster", key), median(kind, "llama.cpp", key)
        print(f"  {label:36s} {ours:12.2f} {theirs:12.2f} {ours / theirs:8.2f}x")
    for name in ("kimi-cluster", "llama.cpp"):
        peak = max(r[1] for kind in runs for r in results[kind, name])
        print(f"  peak RSS {name:12s} {peak / 1e9:6.2f} GB = {peak / model_file.file_bytes:.2f}x the file size")

if __name__ == "__main__":
    main()
