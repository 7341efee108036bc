"""The cost model of `plan --estimate` against runs on this machine: Kimi K2's depth (k2-depth), its widths
(k2-slice) and its size (the sparse replica), in one process and with 1 and 2 local workers.

Decode of one stream everywhere. Decode of 8 streams together and a prompt's prefill at K2's widths with
0, 1 and 2 workers, and at its depth in one process, where one stream also decodes past a 1024-token
prompt. Not held: the replica's (its experts are paged from this machine's disk, so a prompt through all of
them measures the disk), and k2-depth's with workers, whose 256-wide experts make the cluster path's costs
per row and expert most of a step: they vary by 3x between runs here, and the estimate has been 40% fast on
a 512-token prompt (at Kimi's widths they are under 1% of a step)."""
from __future__ import annotations

import os
import statistics

import numpy as np
import pytest

from cluster.config import ClusterConfig
from cluster.cost_model.estimate import MachineSpeed, ModelCost, NodeSpeed, estimate, model_types
from cluster.cost_model.probe import attention_speeds, expert_speeds, fixed_costs, matmul_speeds
from cluster.head import ExpertCluster, local_budgets
from runtime.engine import Engine, Request
from runtime.ggml_ops import GgmlRunner
from runtime.model import KimiModel
from runtime.synthetic.demo_model import make_model
from tests.ray_clusters import retry_ray_start

pytestmark = pytest.mark.slow
TOLERANCE = 0.3
PROMPT = [300, 301, 302, 303]
STREAMS, CONTEXT = 8, 16  # the streams' prompts and tokens keep their context near CONTEXT
# (warm-up steps, measured steps) per model: the replica's first steps fill the page cache
STEPS = {"k2-depth": (4, 16), "k2-slice": (3, 8), "replica": (5, 6)}
# memory for the head and each worker: the replica's experts exceed it and are paged from disk
MEMORY_GB = {"k2-depth": (None, None), "k2-slice": (None, None), "replica": (12, 2)}
PREFILL_TOKENS = {"k2-depth": 512, "k2-slice": 128}  # k2-slice computes about 20 tokens/s here
LONG_CONTEXT = 1024  # k2-depth in one process also decodes past a prompt this long: attention is much of its step
ATTEMPTS = 3  # this shared machine's speed drifts by 20% over minutes: figures and runs are taken again


@pytest.fixture(scope="module")
def models(model_dir, replica):
    return {"k2-depth": make_model(model_dir / "k2-depth-F16.gguf", preset="k2-depth"),
            "k2-slice": make_model(model_dir / "k2-slice-F16.gguf", preset="k2-slice"), "replica": replica}


class FixedCosts:
    """The runtime's fixed costs on this machine, as `kimi-cluster probe` measures them, measured again when
    asked (a burst of other load during the probe skews every estimate after it)."""

    def __init__(self, folder):
        self.folder = folder
        self.measure_again()

    def measure_again(self) -> None:
        self.costs = retry_ray_start(lambda: fixed_costs(self.folder, matmul_speeds({"F16", "F32"}, self.folder)))


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> FixedCosts:
    return FixedCosts(tmp_path_factory.mktemp("probe"))


def decode_ms(model, warmup: int, steps: int) -> float:
    """Median ms of one stream's decode step, after the warm-up."""
    times: list[float] = []
    engine = Engine(model, context_size=64)
    engine.on_step = lambda rows, seconds: times.append(seconds)
    for _ in engine.generate(PROMPT, warmup + steps + 1):
        pass
    return 1000 * statistics.median(times[1 + warmup:])


def long_context_decode_ms(model, warmup: int, steps: int) -> float:
    """Median ms of one stream's decode step past a LONG_CONTEXT-token prompt, after the warm-up."""
    times: list[tuple[int, float]] = []
    engine = Engine(model, context_size=LONG_CONTEXT + warmup + steps + 2)
    engine.on_step = lambda rows, seconds: times.append((rows, seconds))
    for _ in engine.generate(np.random.default_rng(0).integers(300, 2000, LONG_CONTEXT).tolist(), warmup + steps + 1):
        pass
    return 1000 * statistics.median([seconds for rows, seconds in times if rows == 1][warmup:])


def streams_ms(model) -> float:
    """Median ms of a step in which STREAMS streams each decode a token."""
    times: list[tuple[int, float]] = []
    engine = Engine(model, context_size=64, max_sequences=STREAMS)
    engine.on_step = lambda rows, seconds: times.append((rows, seconds))
    for stream in range(STREAMS):
        engine.submit(Request(tuple(range(300 + stream, 308 + stream)), 12), lambda output: None)
    while engine.busy:
        engine.step()
    return 1000 * statistics.median([seconds for rows, seconds in times if rows == STREAMS][2:])


def prefill_ms(model, tokens: int) -> float:
    """ms of the step through a `tokens`-token prompt, the faster of two."""
    times: list[float] = []
    engine = Engine(model, context_size=1024)
    engine.on_step = lambda rows, seconds: times.append(seconds)
    prompt = np.random.default_rng(0).integers(300, 2000, tokens).tolist()
    for _ in range(2):
        for _ in engine.generate(prompt, 1):
            pass
    return 1000 * min(times)


@pytest.mark.parametrize("name", ["k2-depth", "k2-slice", "replica"])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_the_estimate_is_within_30_percent_of_a_run(models, fixed, name, workers, tmp_path):
    many_rows = name == "k2-slice" or (name == "k2-depth" and not workers)
    failing = ["one stream"] + ([f"{STREAMS} streams", "prefill"] if many_rows else [])
    failing += [f"one stream at {LONG_CONTEXT} tokens"] if name == "k2-depth" and not workers else []
    results = {}
    for attempt in range(ATTEMPTS):
        if attempt:  # this shared machine's speed drifts: every figure is taken again, then the runs
            fixed.measure_again()
        results.update(predict_and_measure(models[name], name, workers, failing, fixed.costs, tmp_path))
        failing = [kind for kind in failing if abs(results[kind][0] - results[kind][1]) > TOLERANCE * results[kind][1]]
        if not failing:
            break
    for kind, (predicted, measured) in results.items():
        print(f"{name}, {workers} workers, {kind}: predicted {predicted:.1f} ms/step, measured {measured:.1f}")
    assert not failing, results


def predict_and_measure(path, name: str, workers: int, kinds: list[str], fixed: dict, folder
                        ) -> dict[str, tuple[float, float]]:
    """kind -> (predicted, measured) ms of one step, on a cluster of `workers` local workers. The matmul
    and expert speeds are measured just before each prediction."""
    head_gb, worker_gb = MEMORY_GB[name]
    config = ClusterConfig.from_dict({"model": str(path), "reserve_gb": 0.5, "allow_disk": True, "context": 1024,
                                      "max_sequences": STREAMS}, "test")
    budgets = local_budgets(workers, worker_gb, head_gb)
    results = {}
    with ExpertCluster(path, config, local_workers=workers, worker_memory_gb=worker_gb, head_memory_gb=head_gb,
                       progress=False) as cluster:
        placement = cluster.plan(budgets)
        cost = ModelCost.from_model(cluster.model_file, cluster.model_config)
        if workers:
            model = cluster.start()
        else:
            model = KimiModel(cluster.model_file, GgmlRunner(), repack="head")
            if placement.disk_backed:  # as `kimi-cluster generate` reads experts that do not fit
                model.experts.read_on_demand(cluster.model_file)
            model.load(progress=False)
        for kind in kinds:
            speed = MachineSpeed(*matmul_speeds(model_types(cost), folder), expert_speeds(cost, folder),
                                 cost.expert_shape, attention_speeds(cost), cost.attention_shape, **fixed,
                                 cores=len(os.sched_getaffinity(0)))
            threads = max(1, speed.cores // (workers + 1))
            speeds = {b.name: NodeSpeed("here", speed, speed.cores if b.is_head else threads) for b in budgets}
            prompt = PREFILL_TOKENS.get(name, 1)
            predicted = estimate(cost, placement, speeds, STREAMS, prompt, CONTEXT)
            if kind == "one stream":
                results[kind] = 1000 / predicted.decode_tps, decode_ms(model, *STEPS[name])
            elif kind == f"one stream at {LONG_CONTEXT} tokens":
                at_length = estimate(cost, placement, speeds, context=LONG_CONTEXT + sum(STEPS[name]) // 2)
                results[kind] = 1000 / at_length.decode_tps, long_context_decode_ms(model, *STEPS[name])
            elif kind == f"{STREAMS} streams":
                results[kind] = 1000 * STREAMS / predicted.streams_tps, streams_ms(model)
            else:
                results[kind] = 1000 * prompt / predicted.prefill_tps, prefill_ms(model, prompt)
    return results
