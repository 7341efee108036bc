"""Sampling cost over Kimi's real vocabulary (163,840 logits), per sequence per step, beside llama.cpp's.

    python tests/bench/bench_sampling.py [--vocab N] [--repeats R]

Two kinds of logits: flat (standard normal: the nucleus holds most of the vocabulary, the worst case
for top-p) and peaked (a trained model's: a few hundred tokens hold nearly all the mass). llama.cpp runs
the same filters as its sampler chain (llama-cpp-python, in a subprocess), on a candidate array filled
from the logits each call, as llama_sampler_sample fills one each step (the fill is timed apart too, as
numpy fills it more slowly than llama.cpp's C loop). Penalties (with a 200-token
history) and top logprobs are timed on our side only: this llama-cpp-python's binding of the penalties
sampler does not match its library.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.engine import token_logprobs  # noqa: E402
from runtime.sampling import Sampler, SamplingParams, sample_rows  # noqa: E402

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature 1": {"temperature": 1.0},
    "T 0.8, top-k 40, top-p 0.9": {"temperature": 0.8, "top_k": 40, "top_p": 0.9},
    "Kimi's: T 0.6, top-p 0.95, min-p 0.01": {"temperature": 0.6, "top_p": 0.95, "min_p": 0.01},
}
BATCH = 16
PENALTIES = {"repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.2}

LLAMA_SCRIPT = """
import ctypes, json, sys, time
import numpy as np
import llama_cpp as L
args = json.loads(sys.stdin.read())
entry = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
logits_sets = [np.array(values, np.float32) for values in args["logits"]]
out = {}
for name, s in args["settings"].items():
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if s.get("top_k"):
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(s["top_k"]))
    if s.get("top_p", 1) < 1:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(s["top_p"], 1))
    if s.get("min_p", 0) > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(s["min_p"], 1))
    if s["temperature"] == 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    else:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(s["temperature"]))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(0))
    out[name] = []
    for logits in logits_sets:
        candidates = np.zeros(logits.size, entry)
        def once():
            candidates["id"] = np.arange(logits.size)
            candidates["logit"] = logits
            candidates["p"] = 0
            array = L.llama_token_data_array(candidates.ctypes.data_as(L.llama_token_data_p), logits.size, -1, False)
            L.llama_sampler_apply(chain, ctypes.byref(array))
        once()
        times = []
        for _ in range(args["repeats"]):
            started = time.perf_counter()
            once()
            times.append(time.perf_counter() - started)
        out[name].append(1000 * float(np.median(times)))
    L.llama_sampler_free(chain)
candidates = np.zeros(logits_sets[0].size, entry)
def refill():
    candidates["id"] = np.arange(candidates.size)
    candidates["logit"] = logits_sets[0]
    candidates["p"] = 0
times = []
for _ in range(args["repeats"]):
    started = time.perf_counter()
    refill()
    times.append(time.perf_counter() - started)
out["refill"] = 1000 * float(np.median(times))
print(json.dumps(out))
"""


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=163_840)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    flat = rng.standard_normal(args.vocab).astype(np.float32)
    peaked = flat * 3
    peaked[rng.choice(args.vocab, 300, replace=False)] += 12
    history = rng.integers(0, args.vocab, 200).tolist()
    llama = json.loads(subprocess.run(
        [sys.executable, "-c", LLAMA_SCRIPT], capture_output=True, text=True, check=True,
        input=json.dumps({"settings": SETTINGS, "repeats": args.repeats, "logits": [flat.tolist(), peaked.tolist()]})
    ).stdout)
    print(f"vocabulary {args.vocab}, median of {args.repeats} calls, ms per sequence per step")
    print(f"{'setting':40s} {'flat':>7s} {'llama':>7s} {'ratio':>6s}   {'peaked':>7s} {'llama':>7s} {'ratio':>6s}")
    for name, setting in SETTINGS.items():
        sampler = Sampler(SamplingParams(**setting, seed=0))
        ours = [median_ms(lambda: sampler.sample(logits, []), args.repeats) for logits in (flat, peaked)]
        theirs = llama[name]
        print(f"{name:40s} {ours[0]:7.2f} {theirs[0]:7.2f} {theirs[0] / ours[0]:5.1f}x   "
              f"{ours[1]:7.2f} {theirs[1]:7.2f} {theirs[1] / ours[1]:5.1f}x")
    print(f"(ratio: llama.cpp's time over ours, above 1x we are faster; llama.cpp's times include filling its "
          f"candidate array from numpy, {llama['refill']:.2f} ms, which its own C loop does faster)")
    sampler = Sampler(SamplingParams(**SETTINGS["Kimi's: T 0.6, top-p 0.95, min-p 0.01"], **PENALTIES, seed=0))
    ours = [median_ms(lambda: sampler.sample(logits, history), args.repeats) for logits in (flat, peaked)]
    label = "Kimi's + 3 penalties, 200-token history"
    print(f"{label:40s} {ours[0]:7.2f} {'':14s}   {ours[1]:7.2f}")
    ours = [median_ms(lambda: token_logprobs(logits, 5, 20), args.repeats) for logits in (flat, peaked)]
    print(f"{'top 20 logprobs':40s} {ours[0]:7.2f} {'':14s}   {ours[1]:7.2f}")
    print(f"batches of {BATCH} sequences (Kimi's settings, one sample_rows call), ms per sequence:")
    for name, logits in (("flat", flat), ("peaked", peaked)):
        batch = np.stack([np.roll(logits, 7 * i) for i in range(BATCH)])
        samplers = [Sampler(SamplingParams(**SETTINGS["Kimi's: T 0.6, top-p 0.95, min-p 0.01"], seed=i))
                    for i in range(BATCH)]
        together = median_ms(lambda: sample_rows(samplers, batch, [[]] * BATCH), args.repeats) / BATCH
        apart = median_ms(lambda: [s.sample(row, []) for s, row in zip(samplers, batch)], args.repeats) / BATCH
        print(f"  {name:8s} {together:6.2f} batched, {apart:6.2f} one call per sequence")


if __name__ == "__main__":
    main()
