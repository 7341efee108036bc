"""Losing a worker mid-stream: decode speed before, at the failover step, while degraded and after rejoin.

    python tests/bench/bench_failover.py [MODEL.gguf] [--threads N] [--tokens N]

On the k2-slice file with 2 local expert workers (a local Ray, as `serve --workers 2`), one greedy stream:
  1. SIGKILL a worker after a quarter of the tokens. Ray restarts its process, which loads its share again
     while the head computes that share from its own mapping of the file, then takes it back.
  2. SIGSTOP a worker (a hung machine) until the per-layer deadline covers it, then SIGCONT it.
Printed: tokens/s of each phase (against the healthy cluster and against llama.cpp on the same file and
prompt, run beside it), the failover step's extra latency, time from the fault to degraded and from the
worker's return to ok.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import LLAMA_SCRIPT, bench_model, bench_parser, prompt_of_exact_length, run_with_peak_rss  # noqa: E402

from cluster.config import ClusterConfig  # noqa: E402
from cluster.head import ExpertCluster  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402


class Timeline:
    """When each token came, and when the cluster went degraded and came back (polled every 5 ms)."""

    def __init__(self, cluster: ExpertCluster):
        self.cluster, self.token_times, self.degraded_at, self.ok_at = cluster, [], None, None
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            down = bool(self.cluster.failover.report())
            now = time.perf_counter()
            if down and self.degraded_at is None:
                self.degraded_at = now
            if not down and self.degraded_at is not None and self.ok_at is None:
                self.ok_at = now

    def stop(self) -> None:
        self._stop.set()


def tokens_per_s(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def run_fault(cluster: ExpertCluster, model, prompt: list[int], tokens: int, fault) -> dict:
    """Generate `tokens` greedily; fault(pid) at a quarter of them. Phases split by the timeline."""
    name = sorted(cluster.actors)[0]
    pid = ray.get(cluster.actors[name].__ray_call__.remote(lambda self: os.getpid()))
    timeline = Timeline(cluster)
    fault_at, returned_at = None, None
    for count, _ in enumerate(Engine(model, context_size=4096).generate(prompt, tokens), 1):
        timeline.token_times.append(time.perf_counter())
        if count == tokens // 4:
            fault_at = time.perf_counter()
            returned_at = fault(pid)
    deadline = time.monotonic() + 120
    while timeline.ok_at is None and time.monotonic() < deadline:  # the stream may end before the rejoin
        time.sleep(0.05)
    timeline.stop()
    times = timeline.token_times
    before = [t for t in times if t <= fault_at]
    degraded = [t for t in times if fault_at < t <= (timeline.ok_at or float("inf"))]
    after = [t for t in times if timeline.ok_at is not None and t > timeline.ok_at]
    gaps = [b - a for a, b in zip(before, before[1:])]
    first_gap = degraded[0] - fault_at if degraded else float("nan")
    return {"before": tokens_per_s(before), "failover_step_extra_s": first_gap - statistics.median(gaps),
            "degraded": tokens_per_s(degraded[1:]), "after": tokens_per_s(after),
            "to_degraded_s": (timeline.degraded_at or float("nan")) - fault_at,
            "return_to_ok_s": (timeline.ok_at or float("nan")) - (returned_at or fault_at),
            "tokens_after": len(after), "continued": returned_at is not None}


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def stop_then_continue(pid: int, stopped_s: float) -> float:
    """SIGSTOP now, SIGCONT after stopped_s on a timer; returns when it will be continued."""
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(stopped_s, os.kill, (pid, signal.SIGCONT)).start()
    return time.perf_counter() + stopped_s


def main() -> None:
    parser = bench_parser(__doc__)
    parser.set_defaults(tokens=160)
    args = parser.parse_args()
    model_path = bench_model(args.model)
    config = ClusterConfig.from_dict({"model": str(model_path), "reserve_gb": 0.5}, "bench")
    with ExpertCluster(model_path, config, local_workers=2, repack="all", progress=False) as cluster:
        model = cluster.start()
        text, prompt = prompt_of_exact_length(Tokenizer.from_metadata(cluster.model_file.metadata))
        print(f"model: {model_path} ({cluster.model_file.file_bytes / 1e9:.2f} GB), 2 local workers, "
              f"deadline_s {config.deadline_s:g}, {args.tokens} tokens per run, fault after {args.tokens // 4}",
              flush=True)
        results = {"SIGKILL (Ray restarts it)": run_fault(cluster, model, prompt, args.tokens, kill),
                   "SIGSTOP, SIGCONT 10 s later": run_fault(cluster, model, prompt, args.tokens,
                                                            lambda pid: stop_then_continue(pid, 10.0))}
    llama, _ = run_with_peak_rss([sys.executable, "-c", LLAMA_SCRIPT, json.dumps(
        {"model": str(model_path), "prompt": prompt, "tokens": 64, "threads": args.threads})])
    llama_rate = llama["tokens_per_s"]
    print(f"\nllama.cpp, one process, same file and prompt: {llama_rate:.2f} tok/s")
    for name, r in results.items():
        print(f"\n{name}")
        for phase in ("before", "degraded", "after"):
            print(f"  {phase:9s} {r[phase]:7.2f} tok/s  {r[phase] / r['before']:5.2f}x healthy  "
                  f"{r[phase] / llama_rate:5.2f}x llama.cpp" + (f"  ({r['tokens_after']} tokens)" if phase == "after" else ""))
        print(f"  failover step: +{r['failover_step_extra_s'] * 1000:.0f} ms over a healthy token")
        back = "continued" if r["continued"] else "killed (restart, load, rejoin)"
        print(f"  fault -> degraded: {r['to_degraded_s'] * 1000:.0f} ms; {back} -> ok: {r['return_to_ok_s']:.2f} s")


if __name__ == "__main__":
    main()
