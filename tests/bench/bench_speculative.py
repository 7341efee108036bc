"""Speculative decoding (drafts from the context, checked in the same step) against llama.cpp's plain decode.

    python tests/bench/bench_speculative.py [--threads N] [--rounds R]

(a) Recital: a scripted model at Kimi K2's depth (61 layers, 384 experts, 8 used; RECITER in
    runtime/synthetic/scripted_model.py), quantized to Q4_K_M by llama.cpp, recites a 300-token text quoted in
    its prompt. `kimi-cluster generate` with --speculate auto and off, in one process and with --workers 2,
    beside llama.cpp's plain decode of the same file and prompt; every run's text is checked to be the recital.
(b) Text that does not repeat: the k2-depth demo model (random weights), sampled (temperature 1, a fixed
    seed: the same text with and without drafts), with --speculate auto and off in one process.
Each round runs every command in a fresh process, in turn; medians over rounds are compared.
Targets: (a) auto >= 2.5x llama.cpp in one process, >= 1.0x with 2 workers; (b) auto >= 0.95x off.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from runtime.gguf_file import GGUFModelFile  # noqa: E402
from runtime.synthetic.demo_model import quantize_with_llama_cpp  # noqa: E402
from runtime.synthetic.demo_vocab import demo_tokenizer_metadata  # noqa: E402
from runtime.synthetic.scripted_model import RECITER, recitable, recital, write_scripted_model  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402
from tests.bench.bench_decode import (LLAMA_SCRIPT, bench_model, bench_parser, median_decode_speeds,  # noqa: E402
                                     prompt_of_exact_length)

RECITED_TOKENS = 300


def reciter(tokenizer: Tokenizer) -> tuple[Path, list[int], list[int]]:
    """The reciting model in build/ (written on first use), its prompt and the tokens it must write."""
    prompt, script = recital(recitable(tokenizer, RECITED_TOKENS), tokenizer)
    path = REPO_ROOT / "build" / "reciter-Q4_K_M.gguf"
    if not path.exists():
        print(f"writing {path} (a reciting model at K2's depth, Q4_K_M) ...", flush=True)
        base = path.with_name(path.name + ".base.tmp")
        try:
            quantize_with_llama_cpp(write_scripted_model(base, [script], preset=RECITER), path, "Q4_K_M")
        finally:
            base.unlink(missing_ok=True)
    return path, prompt, script[2:]


def ours(model: Path, text: str, tokens: int, threads: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", "generate", str(model), "--prompt", text, "--max-tokens",
            str(tokens), "--threads", str(threads), "--json", *extra]


def llama(model: Path, ids: list[int], tokens: int, threads: int) -> list[str]:
    return [sys.executable, "-c", LLAMA_SCRIPT, json.dumps({"model": str(model), "prompt": ids, "tokens": tokens,
                                                             "threads": threads})]


def report(title: str, speeds: dict[str, float], baseline: str) -> None:
    print(f"\n{title}\n  median decode          tok/s  ms/token  vs {baseline}")
    for name, rate in speeds.items():
        print(f"  {name:20s} {rate:8.2f} {1000 / rate:9.2f} {rate / speeds[baseline]:10.2f}x")


def main() -> None:
    args = bench_parser(__doc__, preset="k2-depth").parse_args()
    tokenizer = Tokenizer.from_metadata(demo_tokenizer_metadata("instruct"))
    path, prompt, recited = reciter(tokenizer)
    text = tokenizer.decode(prompt)
    if tokenizer.encode(text) != prompt:
        raise RuntimeError("the recital's prompt does not survive a round trip through its text")
    n, t = len(recited), args.threads
    commands = {"auto, one process": ours(path, text, n, t),
                "off, one process": ours(path, text, n, t, "--speculate", "off"),
                "auto, --workers 2": ours(path, text, n, t, "--workers", "2"),
                "off, --workers 2": ours(path, text, n, t, "--workers", "2", "--speculate", "off"),
                "llama.cpp": llama(path, prompt, n, t)}

    def check_recital(name: str, result: dict) -> None:
        if name != "llama.cpp" and result["tokens"] != recited:
            raise RuntimeError(f"{name}: the recital differs from the text from token "
                               f"{next(i for i, (a, b) in enumerate(zip(result['tokens'], recited)) if a != b)}")
        if "drafted_tokens" in result and result["drafted_tokens"]:
            print(f"  {name}: {result['accepted_tokens']}/{result['drafted_tokens']} drafted tokens accepted")

    print(f"(a) {path.name} ({GGUFModelFile(path).file_bytes / 1e9:.2f} GB, {RECITER.num_layers} layers) recites "
          f"{n} tokens; threads: {t}, rounds: {args.rounds} (+1 warm-up)")
    report("(a) recital", median_decode_speeds(commands, args.rounds, check_recital), "llama.cpp")

    model = bench_model(args.model, preset="k2-depth")
    text, _ = prompt_of_exact_length(Tokenizer.from_metadata(GGUFModelFile(model).metadata))
    sampled = ["--temperature", "1", "--seed", "7"]
    commands = {"auto": ours(model, text, args.tokens, t, *sampled),
                "off": ours(model, text, args.tokens, t, *sampled, "--speculate", "off")}
    texts: dict[str, list[int]] = {}

    def check_same(name: str, result: dict) -> None:
        texts.setdefault(name, result["tokens"])
        if result["tokens"] != texts.get("off", result["tokens"]) or result["tokens"] != texts[name]:
            raise RuntimeError(f"{name}: a different text than without drafts")
        if result["drafted_tokens"]:
            print(f"  {name}: {result['accepted_tokens']}/{result['drafted_tokens']} drafted tokens accepted")

    print(f"\n(b) {model.name}, sampled: {args.tokens} tokens")
    report("(b) text that does not repeat", median_decode_speeds(commands, args.rounds, check_same), "off")


if __name__ == "__main__":
    main()
