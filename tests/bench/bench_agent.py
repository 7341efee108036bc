"""A coding agent's session replayed against `kimi-cluster serve`: time to the first token of every turn with
prompt reuse, without it (`--prompt-cache-gb 0`), and after a restart with the cache on disk
(`--prompt-cache-dir`), beside llama.cpp on the same file (llama-cpp-python keeps the previous prompt's KV and
computes only what follows it, as llama-server's slot does).

    python tests/bench/bench_agent.py [MODEL.gguf] [--preset k2-slice] [--system-tokens 8192] [--turns 6]
                                      [--turn-tokens 500] [--replays 100]

The session: a system prompt with tools (--system-tokens), then --turns turns, each adding --turn-tokens of
tool output to everything before; every turn asks for 8 greedy tokens. Prompts are token ids, the same for
both engines. Then a leak check: --replays smaller sessions, each its own, through one server whose prompt
cache holds about three of them; its resident memory must stay flat once the cache is full.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import REPO_ROOT, bench_model  # noqa: E402

REPLY_TOKENS = 8
LEAK_SESSION = (512, 6, 64)  # the leak check's sessions: system tokens, turns, tokens a turn

LLAMA_SESSION = """
import json, sys, time
import llama_cpp
args = json.loads(sys.stdin.read())  # the prompts outgrow a command line
llm = llama_cpp.Llama(args["model"], n_ctx=args["context"], n_batch=512, n_threads=args["threads"], flash_attn=True,
                      verbose=False)
times = []
for prompt in args["turns"]:
    started = time.perf_counter()
    next(llm.generate(prompt, temp=0.0, reset=True))  # the first token: only what follows the kept KV is computed
    times.append(time.perf_counter() - started)
print(json.dumps(times))
"""


def session(vocab: int, system_tokens: int, turns: int, turn_tokens: int, seed: int = 0) -> list[list[int]]:
    """Each turn's whole prompt: the system prompt, then every turn's tool output so far."""
    rng = np.random.default_rng(seed)
    prompt = [int(t) for t in rng.integers(100, vocab - 300, system_tokens)]
    prompts = []
    for _ in range(turns):
        prompt = prompt + [int(t) for t in rng.integers(100, vocab - 300, turn_tokens)]
        prompts.append(prompt)
    return prompts


def serve(model: Path, context: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", str(model), "--port", "0",
                                "--context", str(context), "--max-sequences", "2", "--quiet", *extra], cwd=REPO_ROOT,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "KIMI_API_KEY": ""})
    for line in process.stderr:
        if (match := re.search(r"ready at (http://127\.0\.0\.1:\d+)/v1", line)):
            return process, match.group(1)
    raise RuntimeError("the server did not start")


def first_token_s(url: str, prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first token, prompt tokens reused) of one streamed completion."""
    started, first, cached = time.perf_counter(), None, 0
    body = {"prompt": prompt, "max_tokens": REPLY_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=3600) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                elif first is None:
                    first = time.perf_counter() - started
    return first, cached


def replay(model: Path, context: int, prompts: list[list[int]], extra: list[str]) -> list[tuple[float, int]]:
    process, url = serve(model, context, extra)
    try:
        return [first_token_s(url, prompt) for prompt in prompts]
    finally:
        process.terminate()
        process.wait(timeout=120)


def resident_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def leak_check(model: Path, vocab: int, replays: int) -> list[int]:
    """The server's resident memory after each of `replays` sessions, each with a system prompt of its own
    (LEAK_SESSION's shape), while a prompt cache that holds about three of them keeps, hands over and evicts."""
    sessions = [session(vocab, *LEAK_SESSION, seed=seed) for seed in range(1, replays + 1)]
    context = -(-(len(sessions[0][-1]) + REPLY_TOKENS + 64) // 1024) * 1024
    from runtime.gguf_file import GGUFModelFile
    from runtime.kv_cache import bytes_per_token
    from runtime.model import checked_config
    three = 3 * len(sessions[0][-1]) * bytes_per_token(checked_config(GGUFModelFile(model)))
    process, url = serve(model, context, ["--prompt-cache-gb", f"{three / 1e9:.6f}"])
    try:
        resident = []
        for prompts in sessions:
            for prompt in prompts:
                first_token_s(url, prompt)
            resident.append(resident_bytes(process.pid))
        return resident
    finally:
        process.terminate()
        process.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="GGUF file (default: make the --preset Q4_K_M file)")
    parser.add_argument("--preset", default="k2-slice")
    parser.add_argument("--system-tokens", type=int, default=8192)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=500)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--replays", type=int, default=100,
                        help="sessions replayed for the leak check (smaller ones, each its own; 0: none)")
    args = parser.parse_args()
    model = bench_model(args.model, args.preset)
    from runtime.gguf_file import GGUFModelFile
    vocab = len(GGUFModelFile(model).metadata["tokenizer.ggml.tokens"])
    prompts = session(vocab, args.system_tokens, args.turns, args.turn_tokens)
    context = -(-(len(prompts[-1]) + REPLY_TOKENS + 64) // 1024) * 1024
    print(f"model: {model}; a system prompt of {args.system_tokens} tokens, {args.turns} turns of "
          f"{args.turn_tokens} more; {args.threads} threads for llama.cpp")

    reused = replay(model, context, prompts, [])
    cold = replay(model, context, prompts, ["--prompt-cache-gb", "0"])
    with tempfile.TemporaryDirectory() as folder:
        replay(model, context, prompts[:1], ["--prompt-cache-dir", folder])
        restarted = replay(model, context, prompts[:1], ["--prompt-cache-dir", folder])[0]
    out = subprocess.run([sys.executable, "-c", LLAMA_SESSION], input=json.dumps(
        {"model": str(model), "context": context, "threads": args.threads, "turns": prompts}),
        capture_output=True, text=True, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp failed:\n{out.stderr[-2000:]}")
    llama = json.loads(out.stdout.strip().splitlines()[-1])

    print("\nturn  prompt   reused | TTFT s: reuse   no reuse  llama.cpp | reuse/first  reuse/llama.cpp")
    for turn, (prompt, (ours, cached), (plain, _), theirs) in enumerate(zip(prompts, reused, cold, llama), 1):
        print(f"{turn:4d} {len(prompt):7d} {cached:8d} | {ours:13.2f} {plain:10.2f} {theirs:10.2f} | "
              f"{ours / reused[0][0]:11.2f}x {ours / theirs:14.2f}x")
    print(f"after a restart with --prompt-cache-dir: turn 1 in {restarted[0]:.2f} s, {restarted[1]} tokens read "
          f"from disk ({restarted[0] / cold[0][0]:.2f}x a cold turn 1)")
    if args.replays:
        resident = leak_check(model, vocab, args.replays)
        settled = min(10, len(resident)) - 1
        system, turns, turn = LEAK_SESSION
        print(f"leak check, {args.replays} sessions of {system} + {turns} x {turn} tokens: "
              "server RSS " + ", ".join(f"{resident[i - 1] / 2**20:.0f} MiB after {i}"
                                        for i in sorted({1, settled + 1, len(resident)}))
              + f"; {(resident[-1] - resident[settled]) / max(1, len(resident) - 1 - settled) / 1024:+.1f} KiB a "
                "session after the first ten")


if __name__ == "__main__":
    main()
