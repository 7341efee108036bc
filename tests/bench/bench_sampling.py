"""Sampling cost over Kimi's real vocabulary (163,840 logits), per sequence per step.

    python tests/bench/bench_sampling.py [--vocab N] [--repeats R]

Two kinds of logits: flat (standard normal: the nucleus holds most of the vocabulary, the worst case
for top-p) and peaked (a trained model's: a few hundred tokens hold nearly all the mass). Each setting
runs with a 200-token history for the penalties; top logprobs are timed on their own.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime.engine import token_logprobs  # noqa: E402
from runtime.sampling import Sampler, SamplingParams  # noqa: E402

SETTINGS = {
    "greedy": SamplingParams(),
    "temperature 1": SamplingParams(temperature=1.0, seed=0),
    "top-k 40, top-p 0.9, penalties": SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1,
                                                     presence_penalty=0.5, seed=0),
    "Kimi's: T 0.6, top-p 0.95, min-p 0.01": SamplingParams(temperature=0.6, top_p=0.95, min_p=0.01, seed=0),
}


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
    print(f"vocabulary {args.vocab}, median of {args.repeats} calls, ms per sequence per step")
    print(f"{'setting':40s} {'flat':>8s} {'peaked':>8s}")
    for name, params in SETTINGS.items():
        sampler = Sampler(params)
        cost = [median_ms(lambda: sampler.sample(logits, history), args.repeats) for logits in (flat, peaked)]
        print(f"{name:40s} {cost[0]:8.2f} {cost[1]:8.2f}")
    cost = [median_ms(lambda: token_logprobs(logits, 5, 20), args.repeats) for logits in (flat, peaked)]
    print(f"{'top 20 logprobs':40s} {cost[0]:8.2f} {cost[1]:8.2f}")


if __name__ == "__main__":
    main()
