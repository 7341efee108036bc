"""`kimi-cluster probe`: measure this machine's figures for the cost model (cluster/estimate.py).

For each weight type the model uses: how fast a one-row matmul streams it (decode reads every weight
once per step) and how fast 512-row matmuls compute (prefill). Then the runtime's fixed cost per layer,
on a small model in the Kimi layout, in one process and with one and two local workers (Ray actors over
gRPC, sharing this machine's cores with the head).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from cluster.estimate import MachineSpeed
from runtime.demo_model import Preset
from runtime.ggml_ops import GgmlRunner, Weight

READ_BYTES = 256 << 20  # far beyond any cache, and a matmul's fixed cost is noise beside it
ROW_LENGTH = 7168  # Kimi K2's width: a multiple of every block size
PROBE_TOKENS, PROBE_WARMUP = 40, 4
# The runtime's fixed cost per layer shows on a model in the Kimi layout whose math is a few microseconds.
PROBE_MODEL = Preset(n_embd=256, num_layers=16, num_dense_layers=1, num_heads=4, q_lora_rank=256, kv_lora_rank=256,
                     head_dim_nope=64, rope_dim=32, head_dim_v=64, n_ff_dense=512, n_ff_expert=32, num_experts=64,
                     num_experts_used=8, base_dtype="f16")


def _timed(call: Callable[[], object], repeats: int = 5) -> float:
    call()  # pages in, graph buffers made
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _weight(ggml_type: GGMLQuantizationType, rows: int, folder: Path) -> Weight:
    """A weight of zeros in a file, mapped as model weights are: the OS backs mapped files with 4 KB pages,
    which read slower than the huge pages it may give a process's own arrays."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    path = folder / f"{ggml_type.name}-{rows}.bin"
    np.full(ROW_LENGTH // block_size * type_size * rows, 0, np.uint8).tofile(path)  # written: no file holes
    return Weight(ggml_type, (ROW_LENGTH, rows), np.memmap(path, np.uint8, "r"))


def matmul_speeds(types: set[str], folder: Path) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per ggml type name: GB/s of one-row matmuls on every core and on one, and GFLOP/s of 512-row
    matmuls on every core; the weights are written to files in `folder`."""
    every_core, one_core = GgmlRunner(), GgmlRunner(1)
    read_gbps, thread_read_gbps, gflops = {}, {}, {}
    row = np.ones((1, ROW_LENGTH), np.float32)
    for name in sorted(types):
        ggml_type = GGMLQuantizationType[name]
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        big = _weight(ggml_type, max(1, READ_BYTES // (ROW_LENGTH // block_size * type_size)), folder)
        read_gbps[name] = big.nbytes / _timed(lambda: every_core.matmul(big, row)) / 1e9
        thread_read_gbps[name] = big.nbytes / _timed(lambda: one_core.matmul(big, row)) / 1e9
        small, rows = _weight(ggml_type, 512, folder), np.ones((512, ROW_LENGTH), np.float32)
        gflops[name] = 2 * ROW_LENGTH * 512 * 512 / _timed(lambda: every_core.matmul(small, rows), repeats=3) / 1e9
    return read_gbps, thread_read_gbps, gflops


def layer_costs(folder: Path) -> tuple[float, float, float]:
    """ms per layer and step in one process; more per MoE layer and step with one local worker; more again
    for a second one. The probe model's math is a few microseconds a layer: what is left is fixed cost."""
    from cluster.config import ClusterConfig
    from cluster.head import ExpertCluster
    from runtime.demo_model import make_model
    from runtime.engine import Engine
    from runtime.gguf_file import GGUFModelFile
    from runtime.model import KimiModel
    path = make_model(folder / "probe.gguf", preset=PROBE_MODEL)
    moe_layers = PROBE_MODEL.num_layers - PROBE_MODEL.num_dense_layers

    def step_ms(model) -> float:
        steps: list[float] = []
        engine = Engine(model, context_size=64)
        engine.on_step = lambda rows, seconds: steps.append(seconds)
        for _ in engine.generate([300, 301, 302], PROBE_TOKENS + PROBE_WARMUP + 1):
            pass
        return 1000 * statistics.median(steps[1 + PROBE_WARMUP:])

    def with_workers(count: int) -> float:
        config = ClusterConfig.from_dict({"model": str(path), "reserve_gb": 0, "max_sequences": 1, "context": 64},
                                         "probe")
        with ExpertCluster(path, config, local_workers=count, worker_memory_gb=1, head_memory_gb=1,
                           progress=False) as cluster:
            return step_ms(cluster.start())

    alone = step_ms(KimiModel(GGUFModelFile(path)))
    one, two = with_workers(1), with_workers(2)
    return alone / PROBE_MODEL.num_layers, max(0.0, one - alone) / moe_layers, max(0.0, two - one) / moe_layers


def probe(types: set[str], progress: Callable[[str], None] = lambda line: None) -> MachineSpeed:
    """This machine's figures for a model whose weights have these ggml types."""
    with tempfile.TemporaryDirectory(prefix="kimi-probe-") as folder:
        progress(f"matmul speed of {', '.join(sorted(types))} ...")
        read_gbps, thread_read_gbps, gflops = matmul_speeds(types | {"F32"}, Path(folder))
        progress("the runtime's fixed cost per layer, alone and with 1 and 2 local workers (starts Ray twice) ...")
        layer_ms, remote_layer_ms, next_worker_ms = layer_costs(Path(folder))
    return MachineSpeed(read_gbps, thread_read_gbps, gflops, layer_ms, remote_layer_ms, next_worker_ms,
                        len(os.sched_getaffinity(0)))
