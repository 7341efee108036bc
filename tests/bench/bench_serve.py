"""Serving throughput: aggregate output tokens/s and time to first token at 1, 4 and 16 concurrent streams,
against `kimi-cluster serve --workers N` (experts on local Ray workers), with llama.cpp's own batched
decoding of as many sequences measured in the same run for comparison.

    python tests/bench/bench_serve.py [MODEL.gguf] [--workers 2] [--tokens 32] [--streams 1 4 16]

Every stream sends its own 32-token prompt and generates --tokens tokens greedily (no early stop).
llama.cpp runs in a subprocess: the prompts decoded together as one batch, then one token per sequence
per llama_decode, as llama-server's continuous batching does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import REPO_ROOT, bench_model  # noqa: E402

from runtime.gguf_file import GGUFModelFile  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

PROMPT_TOKENS = 32

LLAMA_BATCHED = """
import ctypes, json, sys, time
import numpy as np
import llama_cpp as L
args = json.loads(sys.argv[1])
prompts, n_gen, n_seq = args["prompts"], args["tokens"], len(args["prompts"])
L.llama_backend_init()
model = L.llama_model_load_from_file(args["model"].encode(), L.llama_model_default_params())
params = L.llama_context_default_params()
params.n_ctx, params.n_batch, params.n_seq_max = 256 * n_seq, 512, n_seq
params.n_threads = params.n_threads_batch = args["threads"]
ctx = L.llama_init_from_model(model, params)
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
batch = L.llama_batch_init(512, 0, n_seq)

def decode(entries):  # entries: (token, position, sequence, wants_logits)
    batch.n_tokens = len(entries)
    for i, (token, pos, seq, logits) in enumerate(entries):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq
    if L.llama_decode(ctx, batch) != 0:
        raise SystemExit("llama_decode failed")
    rows = [i for i, e in enumerate(entries) if e[3]]
    return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)))) for i in rows]

start = time.perf_counter()
tokens = decode([(t, p, s, p == len(prompt) - 1) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)])
first_token_s = time.perf_counter() - start
for step in range(1, n_gen):
    tokens = decode([(t, len(prompts[s]) + step - 1, s, True) for s, t in enumerate(tokens)])
elapsed = time.perf_counter() - start
print(json.dumps({"aggregate_tokens_per_s": n_seq * n_gen / elapsed, "first_token_s": first_token_s}))
"""


def prompts_for(tokenizer: Tokenizer, count: int) -> list[list[int]]:
    """`count` different prompts of exactly PROMPT_TOKENS tokens each."""
    words = "pool memory across machines experts routers caches latent attention workers heads tokens".split()
    prompts = []
    for i in range(count):
        text = " ".join(words[(i + j) % len(words)] for j in range(4 * PROMPT_TOKENS))
        prompts.append(tokenizer.encode(text)[:PROMPT_TOKENS])
    return prompts


def start_server(model: Path, workers: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", str(model), "--workers", str(workers),
                                "--port", "0", "--max-sequences", "16", *extra], cwd=REPO_ROOT, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True, env={**os.environ, "KIMI_API_KEY": ""})
    for line in process.stderr:
        if (match := re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)):
            url = match.group(1)
            break
    else:
        raise RuntimeError("the server did not start")
    while httpx.get(f"{url}/health").status_code != 200:
        if process.poll() is not None:
            raise RuntimeError("the server exited while loading")
        time.sleep(0.5)
    return process, url


def one_stream(url: str, prompt: list[int], tokens: int) -> tuple[float, int]:
    """(seconds to the first token, tokens received) for one streamed completion."""
    started, first, received = time.perf_counter(), None, 0
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                received = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - started
    return first, received


def run_streams(url: str, prompts: list[list[int]], tokens: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: one_stream(url, p, tokens), prompts))
    elapsed = time.perf_counter() - started
    return {"aggregate_tokens_per_s": sum(n for _, n in results) / elapsed,
            "first_token_s": statistics.median(t for t, _ in results)}


def llama_batched(model: Path, prompts: list[list[int]], tokens: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", LLAMA_BATCHED, json.dumps(
        {"model": str(model), "prompts": prompts, "tokens": tokens, "threads": threads})],
        capture_output=True, text=True, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="GGUF file (default: make the k2-slice Q4_K_M file)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--serve-args", default="", help="more `kimi-cluster serve` options, e.g. '--repack head'")
    args = parser.parse_args()
    model = bench_model(args.model)
    model_file = GGUFModelFile(model)
    prompts = prompts_for(Tokenizer.from_metadata(model_file.metadata), max(args.streams))
    print(f"model: {model} ({model_file.file_bytes / 1e9:.2f} GB); {args.workers} expert workers; prompts of "
          f"{PROMPT_TOKENS} tokens; {args.tokens} tokens per stream; {args.threads} threads for llama.cpp")
    process, url = start_server(model, args.workers, args.serve_args.split())
    try:
        run_streams(url, prompts[:2], 4)  # warm-up: page cache, first-call costs
        ours = {n: run_streams(url, prompts[:n], args.tokens) for n in args.streams}
    finally:
        process.terminate()
        process.wait(timeout=60)
    theirs = {n: llama_batched(model, prompts[:n], args.tokens, args.threads) for n in args.streams}

    print("\nstreams   kimi-cluster tok/s  x single   TTFT s   |  llama.cpp batched tok/s  x single   TTFT s"
          "  | ours/llama.cpp")
    rate = "aggregate_tokens_per_s"
    single_ours, single_theirs = ours[args.streams[0]][rate], theirs[args.streams[0]][rate]
    for n in args.streams:
        o, t = ours[n], theirs[n]
        print(f"{n:7d}   {o[rate]:18.2f} {o[rate] / single_ours:9.2f}x {o['first_token_s']:8.3f}   |  "
              f"{t[rate]:23.2f} {t[rate] / single_theirs:9.2f}x {t['first_token_s']:8.3f}  | {o[rate] / t[rate]:6.2f}x")

if __name__ == "__main__":
    main()
