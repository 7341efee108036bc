"""Kimi K2.6 at its real size on this machine: the sparse replica (340 GB of holes) with local workers.

    python tests/bench/bench_replica.py [--workers 3] [--tokens 12] [--warmup 4] [--no-llama]

Writes the replica (build/k2.6/) if missing, then, one after the other:
1. kimi-cluster with N local expert workers, every node's experts paged from the sparse files
   (allow_disk): load time, the head's memory (its weights are mapped file pages: RssFile), and each
   decode step split into head math (attention, router, shared experts, output: what runs on the head
   outside the experts), the head's own expert share, sending, waiting for the workers, and sampling;
   beside them each worker's expert math and the gRPC round trip left over per request.
2. kimi-cluster in one process.
3. llama.cpp (llama-cpp-python, in a subprocess) on the same files.
The first `--warmup` decode steps are left out of the figures: the page cache is still filling.
The weights are zeros, so the routers send every token to the same 8 experts per layer; the math costs
what it costs on real weights, but a real model touches other experts each token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import runtime.engine as engine_module  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from cluster.head import ExpertCluster  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.ggml_ops import GgmlRunner  # noqa: E402
from runtime.gguf_file import GGUFModelFile  # noqa: E402
from runtime.model import KimiModel  # noqa: E402
from runtime.sampling import SamplingParams  # noqa: E402
from runtime.synthetic.replica_model import NAME, part_paths, write_sparse_replica  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = [163587, 300, 301, 302, 303, 304, 305, 163601]  # <|im_user|> ... <|im_middle|>
KIMI_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, min_p=0.01, seed=0)  # Kimi K2's recommended

LLAMA_SCRIPT = """
import json, sys, time
import llama_cpp
args = json.loads(sys.argv[1])
started = time.perf_counter()
llm = llama_cpp.Llama(model_path=args["model"], n_ctx=256, n_threads=2, verbose=False)
load_s = time.perf_counter() - started
llm.eval(args["prompt"])
steps = []
for _ in range(args["tokens"]):
    started = time.perf_counter()
    llm.eval([0])
    steps.append(time.perf_counter() - started)
print(json.dumps({"load_s": load_s, "steps": steps}))
"""


def memory_of(pid: str = "self") -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


class Timers:
    """Seconds spent per decode step in each part, filled by wrappers around the head's calls."""

    def __init__(self):
        self.current = {"sampling": 0.0, "head experts": 0.0, "sending": 0.0, "waiting": 0.0}
        self.steps: list[dict[str, float]] = []

    @contextmanager
    def timing(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.current[part] += time.perf_counter() - started

    def end_step(self, rows: int, seconds: float) -> None:
        self.steps.append({"rows": rows, "step": seconds, **self.current})
        self.current = dict.fromkeys(self.current, 0.0)


def instrument(cluster: ExpertCluster, timers: Timers) -> None:
    remote = cluster.remote
    local_forward, start = remote.local.forward_pairs if remote.local else None, remote.start
    sample_rows = engine_module.sample_rows

    def timed_sampling(*args, **kwargs):
        with timers.timing("sampling"):
            return sample_rows(*args, **kwargs)

    def timed_local(*args, **kwargs):
        with timers.timing("head experts"):
            return local_forward(*args, **kwargs)

    def timed_start(*args, **kwargs):
        before = timers.current["head experts"]
        started = time.perf_counter()
        result = start(*args, **kwargs)
        timers.current["sending"] += time.perf_counter() - started - (timers.current["head experts"] - before)

        def timed_result():
            with timers.timing("waiting"):
                return result()
        return timed_result

    engine_module.sample_rows = timed_sampling
    if remote.local:
        remote.local.forward_pairs = timed_local
    remote.start = timed_start


def bench_cluster(model: Path, workers: int, tokens: int, warmup: int) -> None:
    config = ClusterConfig.from_dict({"model": str(model), "reserve_gb": 0.5, "allow_disk": True, "context": 256,
                                      "max_sequences": 1}, "bench")
    started = time.perf_counter()
    with ExpertCluster(model, config, local_workers=workers, worker_memory_gb=2, head_memory_gb=12,
                       progress=False) as cluster:
        engine_model = cluster.start()
        load_s = time.perf_counter() - started
        head_memory = memory_of()
        timers = Timers()
        instrument(cluster, timers)
        engine = Engine(engine_model, context_size=256)
        engine.on_step = timers.end_step
        stats_before = None
        round_trips: list[float] = []
        generated = 0
        for _ in engine.generate(PROMPT, tokens + warmup + 1, KIMI_SAMPLING):
            generated += 1
            if generated == warmup + 1:  # measured from here on
                stats_before = [client.stats() for client in cluster.remote.workers]
                cluster.remote.observers.append(lambda node, pairs, seconds: seconds is not None and
                                                round_trips.append(seconds))
        stats_after = [client.stats() for client in cluster.remote.workers]
        worker_memory = {client.node: client.health().rss_bytes for client in cluster.remote.workers}
    steps = timers.steps[1 + warmup: 1 + warmup + tokens]  # after the prompt step and the warm-up
    mean = {part: statistics.mean(s[part] for s in steps) for part in steps[0] if part != "rows"}
    head_math = mean["step"] - mean["sampling"] - mean["head experts"] - mean["sending"] - mean["waiting"]
    worker_compute = {client.node: (after["compute_s"] - before["compute_s"]) / len(steps)
                      for client, before, after in zip(cluster.remote.workers, stats_before, stats_after)}
    requests = sum(a["requests"] - b["requests"] for b, a in zip(stats_before, stats_after))
    mean_compute_per_request = sum(worker_compute.values()) * len(steps) / max(requests, 1)
    print(f"kimi-cluster, {workers} local workers, experts paged from the sparse files")
    print(f"  load: {load_s:.1f} s (Ray, {workers} workers mapping their shares, the head reading its weights in)")
    print(f"  head memory after load: RSS {head_memory['VmRSS'] / 2**30:.2f} GiB = file pages "
          f"{head_memory['RssFile'] / 2**30:.2f} GiB + own {head_memory['RssAnon'] / 2**30:.2f} GiB")
    print("  worker memory after decoding: " + ", ".join(f"{node} {rss / 2**30:.2f} GiB"
                                                         for node, rss in worker_memory.items()))
    print(f"  decode, mean of {len(steps)} steps after {warmup} warm-up: {1000 * mean['step']:.0f} ms/token "
          f"= {1 / mean['step']:.2f} tok/s")
    for label, seconds in (("head math (attention, router, shared experts, output)", head_math),
                           ("head's own expert share", mean["head experts"]),
                           ("sending to workers", mean["sending"]),
                           ("waiting for workers", mean["waiting"]),
                           ("sampling (163,840 logits, Kimi's settings)", mean["sampling"])):
        print(f"    {label:55s} {1000 * seconds:8.1f} ms  {100 * seconds / mean['step']:5.1f}%")
    print("  workers' expert math per token: " + ", ".join(f"{node} {1000 * s:.0f} ms"
                                                          for node, s in worker_compute.items()))
    if round_trips:
        print(f"  gRPC round trip per request: median {1000 * statistics.median(round_trips):.2f} ms, of which "
              f"the worker computes {1000 * mean_compute_per_request:.2f} ms on average "
              f"({requests / len(steps):.0f} requests a token)")


def bench_single_process(model: Path, tokens: int, warmup: int) -> list[float]:
    """In a process of its own, so that its memory is its own; prints a line, returns its decode steps."""
    result = subprocess.run([sys.executable, __file__, "--one-process", "--tokens", str(tokens), "--warmup",
                             str(warmup)], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    line, steps = result.stdout.strip().splitlines()[-2:]
    print(line)
    return json.loads(steps)


def run_single_process(model: Path, tokens: int, warmup: int) -> None:
    started = time.perf_counter()
    kimi = KimiModel(GGUFModelFile(model), GgmlRunner(), repack="head")
    kimi.load(progress=False)
    load_s = time.perf_counter() - started
    steps: list[float] = []
    engine = Engine(kimi, context_size=256)
    engine.on_step = lambda rows, seconds: steps.append(seconds)
    for _ in engine.generate(PROMPT, tokens + warmup + 1, KIMI_SAMPLING):
        pass
    measured, memory = steps[1 + warmup:], memory_of()
    print(f"kimi-cluster, one process: load {load_s:.1f} s, decode {1000 * statistics.mean(measured):.0f} ms/token "
          f"(mean of {len(measured)} after {warmup} warm-up), RSS {memory['VmRSS'] / 2**30:.2f} GiB = file pages "
          f"{memory['RssFile'] / 2**30:.2f} GiB + own {memory['RssAnon'] / 2**30:.2f} GiB")
    print(json.dumps(measured))


def bench_llama(model: Path, tokens: int, warmup: int) -> list[float]:
    args = json.dumps({"model": str(model), "prompt": PROMPT, "tokens": tokens + warmup})
    result = subprocess.run([sys.executable, "-c", LLAMA_SCRIPT, args], capture_output=True, text=True,
                            cwd=REPO_ROOT, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    measured = out["steps"][warmup:]
    print(f"llama.cpp, one process: load {out['load_s']:.1f} s, decode {1000 * statistics.mean(measured):.0f} ms/token "
          f"(mean of {len(measured)} after {warmup} warm-up)")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8, help="decode steps measured (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=4, help="decode steps left out first (default %(default)s)")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp (it takes minutes here)")
    parser.add_argument("--one-process", action="store_true", help=argparse.SUPPRESS)  # part 2, run apart
    args = parser.parse_args()
    model = part_paths(REPO_ROOT / "build" / "k2.6" / f"{NAME}.gguf")[0]
    if args.one_process:
        run_single_process(model, args.tokens, args.warmup)
        return
    if not model.exists():
        write_sparse_replica(model.parent / f"{NAME}.gguf")
    bench_cluster(model, args.workers, args.tokens, args.warmup)
    ours = bench_single_process(model, args.tokens, args.warmup)
    if not args.no_llama:
        theirs = bench_llama(model, args.tokens, args.warmup)
        print(f"one process, kimi-cluster vs llama.cpp: {statistics.mean(theirs) / statistics.mean(ours):.2f}x "
              "llama.cpp's speed")


if __name__ == "__main__":
    main()
