"""`kimi-cluster probe`: measure this machine's figures for the cost model (estimate.py).

For each weight type the model uses: how fast a one-row matmul streams it (decode reads every weight
once per step) and how fast 512-row matmuls compute (prefill). How fast routed experts of the model's own
shape compute with few and with many rows each (ggml's mul_mat_id). Where the head's weights go on a GPU, the
same for them there, attention there, and a step's crossing to the CPU and back. Then the runtime's fixed costs, on a
model in the Kimi layout whose math costs little, the same for every model: per layer in one process, for
each further row and sequence in a step, and with one and two local workers (Ray actors over gRPC, sharing
this machine's cores with the head). Each phase shows its progress; a figure measured while other processes computed, or
one that came out as 0.0, is named as not final.
"""
from __future__ import annotations

import os
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from tqdm import tqdm

from cluster.cost_model.estimate import (DECODE, PROMPT, GpuSpeed, MachineSpeed, ModelCost, NodeSpeed, head_types,
                                         model_types, single_node, step_parts, touched_fraction)
from cluster.cost_model.machine_load import OtherLoad
from cluster.placement import Placement
from runtime.ggml_backends import ComputeDevice
from runtime.ggml_device_ops import attention_on, matmul_on, round_trip_on
from runtime.ggml_ops import GgmlRunner, Weight
from runtime.synthetic.demo_model import Preset

RAY_PORT = 6379  # the head's Ray port, open to every node (configs/ray-cluster.yaml)
READ_BYTES = 256 << 20  # far beyond any cache, and a matmul's fixed cost is noise beside it
ROW_LENGTH = 7168  # Kimi K2's width: a multiple of every block size
PROBE_TOKENS, PROBE_WARMUP = 40, 4
PROBE_SEQUENCES = 8
PROBE_PROMPT = 256  # rows of the longer prompt: near the 512 rows of a prefill step, whose cost per row is lower
PROBE_CONTEXT = PROBE_PROMPT + 64  # the probe's caches: its longest prompt and the tokens after it
PROBE_ROUNDS = 3
FIXED_COST_RUNS = 1 + 4 * PROBE_ROUNDS + 2  # the probe model and its experts, 4 one-process steps a round, Ray twice
EXPERT_BYTES_PROBED = 256 << 20  # experts enough to read this much (at least 4): per-call costs are noise beside it
PAIRS_PER_EXPERT = (1, 4, 64)  # one stream, many streams, prompts
ATTENTION_CONTEXT, ATTENTION_PROMPT = 4096, 512  # a decoding row's positions; a prompt chunk's rows and positions
TRANSFER_FLOATS = 16 << 20  # a copy of 64 MiB each way: its fixed cost is noise beside it
# The runtime's fixed costs show on a model in the Kimi layout whose math is a few microseconds a layer, at
# Kimi K2's depth and expert count: a shallower one stays in a large processor cache and looks faster per
# layer, and a worker's cost grows with the experts a step uses. (A 64-wide one, whose ops cost less than at
# any real width, was estimated 40-50% fast at 256 wide.)
PROBE_MODEL = Preset(n_embd=256, num_layers=61, num_dense_layers=1, num_heads=4, q_lora_rank=256, kv_lora_rank=256,
                     head_dim_nope=64, rope_dim=32, head_dim_v=64, n_ff_dense=512, n_ff_expert=16, num_experts=384,
                     num_experts_used=8, base_dtype="f16")
# Fixed costs kept from a probe that measured them otherwise are measured again.
FIXED_COST_METHOD = f"{PROBE_MODEL!r}, prompts of {PROBE_SEQUENCES} and {PROBE_PROMPT} rows"


def _timed(call: Callable[[], object], repeats: int = 5) -> float:
    call()  # pages in, graph buffers made
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _weight(ggml_type: GGMLQuantizationType, ne: tuple[int, ...], folder: Path) -> Weight:
    """A weight of zeros in a file, mapped as model weights are: the OS backs mapped files with 4 KB pages,
    which read slower than the huge pages it may give a process's own arrays."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    path = folder / f"{ggml_type.name}-{'x'.join(map(str, ne))}.bin"
    np.full(ne[0] // block_size * type_size * int(np.prod(ne[1:])), 0, np.uint8).tofile(path)  # no file holes
    return Weight(ggml_type, ne, np.memmap(path, np.uint8, "r"))


def matmul_speeds(types: set[str], folder: Path, done: Callable[[], object] = lambda: None
                  ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per ggml type name: GB/s of one-row matmuls on every core and on one, and GFLOP/s of 512-row
    matmuls on every core; the weights are written to files in `folder`. Calls `done` after each type."""
    every_core, one_core = GgmlRunner(), GgmlRunner(1)
    read_gbps, thread_read_gbps, gflops = {}, {}, {}
    row = np.ones((1, ROW_LENGTH), np.float32)
    for name in sorted(types):
        ggml_type = GGMLQuantizationType[name]
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        big = _weight(ggml_type, (ROW_LENGTH, max(1, READ_BYTES // (ROW_LENGTH // block_size * type_size))), folder)
        read_gbps[name] = big.nbytes / _timed(lambda: every_core.matmul(big, row)) / 1e9
        thread_read_gbps[name] = big.nbytes / _timed(lambda: one_core.matmul(big, row)) / 1e9
        small, rows = _weight(ggml_type, (ROW_LENGTH, 512), folder), np.ones((512, ROW_LENGTH), np.float32)
        gflops[name] = 2 * ROW_LENGTH * 512 * 512 / _timed(lambda: every_core.matmul(small, rows), repeats=3) / 1e9
        done()
    return read_gbps, thread_read_gbps, gflops


def expert_speeds(cost: ModelCost, folder: Path, done: Callable[[], object] = lambda: None) -> dict[int, float]:
    """GFLOP/s of routed experts of the model's shape and types, as the runtime computes them (ggml's
    mul_mat_id, every core), with PAIRS_PER_EXPERT rows on each expert; the weights are written to files
    in `folder`. Calls `done` after each number of rows."""
    runner = GgmlRunner()
    expert_bytes = sum(next(iter(cost.expert_bytes.values())).values())
    experts = int(min(cost.num_experts, max(4, EXPERT_BYTES_PROBED // expert_bytes)))
    matrices = {kind: _weight(GGMLQuantizationType[kind_type], (n_in, n_out, experts), folder)
                for kind, (kind_type, n_in, n_out) in cost.expert_matrices.items()}
    flops_per_pair = 2 * sum(n_in * n_out for _, n_in, n_out in cost.expert_matrices.values())
    speeds = {}
    for pairs in PAIRS_PER_EXPERT:
        busy = 4 if pairs == PAIRS_PER_EXPERT[-1] else experts  # at the most pairs, 4 experts are work enough
        rows = busy * pairs  # one slot each, every busy expert the same number of rows
        x = np.ones((rows, cost.n_embd), np.float32)
        ids = (np.arange(rows, dtype=np.int32) % busy).reshape(rows, 1)
        seconds = _timed(lambda: runner.expert_ffn(matrices.get("gate"), matrices.get("up"), matrices["down"], x, ids,
                                                   np.ones((rows, 1), np.float32), gate_up=matrices.get("gate_up")),
                         repeats=3)
        speeds[pairs] = rows * flops_per_pair / seconds / 1e9
        done()
    return speeds


def attention_speeds(cost: ModelCost, done: Callable[[], object] = lambda: None) -> dict[str, float]:
    """GFLOP/s of one layer's attention at the model's shape as the runtime computes it, every core: a decoding
    row with flash attention over ATTENTION_CONTEXT positions, and a prompt's ATTENTION_PROMPT rows with matmuls
    over as many positions. Calls `done` after each."""
    runner, (heads, width, values) = GgmlRunner(), cost.attention_dims
    speeds = {}
    for kind, rows, positions, flash in ((DECODE, 1, ATTENTION_CONTEXT, True),
                                         (PROMPT, ATTENTION_PROMPT, ATTENTION_PROMPT, False)):
        cache = np.ones((positions, width), np.float16)
        queries, mask = np.ones((heads, rows, width), np.float32), np.zeros((rows, positions), np.float16)
        seconds = _timed(lambda: runner.attention(cache, queries, mask, values, 1.0, flash), repeats=3)
        speeds[kind] = cost.attention_flops_per_pair * rows * positions / seconds / 1e9
        done()
    return speeds


def gpu_speeds(cost: ModelCost, device: ComputeDevice, folder: Path, done: Callable[[], object] = lambda: None
               ) -> GpuSpeed:
    """The figures of the GPU the head's weights go on: per type the head's weights have, GB/s of one-row matmuls
    and GFLOP/s of 512-row ones over weights in its memory; attention at the model's shape over a cache in its
    memory; and what a step's crossing to the CPU and back costs (a row, then a prompt's rows). Calls `done`
    after each type and each other figure."""
    read_gbps, gflops = {}, {}
    for name in sorted(head_types(cost)):
        ggml_type = GGMLQuantizationType[name]
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        big = _weight(ggml_type, (ROW_LENGTH, max(1, READ_BYTES // (ROW_LENGTH // block_size * type_size))), folder)
        read_gbps[name] = big.nbytes / _timed(matmul_on(device, big, 1)) / 1e9
        small = _weight(ggml_type, (ROW_LENGTH, 512), folder)
        gflops[name] = 2 * ROW_LENGTH * 512 * 512 / _timed(matmul_on(device, small, 512), repeats=3) / 1e9
        done()
    heads, width, values = cost.attention_dims
    attention_gflops = {}
    for kind, rows, positions, flash in ((DECODE, 1, ATTENTION_CONTEXT, True),
                                         (PROMPT, ATTENTION_PROMPT, ATTENTION_PROMPT, False)):
        seconds = _timed(attention_on(device, heads, width, values, rows, positions, flash), repeats=3)
        attention_gflops[kind] = cost.attention_flops_per_pair * rows * positions / seconds / 1e9
        done()
    crossing_ms = 1000 * _timed(round_trip_on(device, cost.n_embd), repeats=20)
    done()
    transfer_gbps = 2 * 4 * TRANSFER_FLOATS / _timed(round_trip_on(device, TRANSFER_FLOATS)) / 1e9
    done()
    return GpuSpeed(gpu_name(device), device.info.total_bytes / 2**30, read_gbps, gflops, attention_gflops,
                    crossing_ms, transfer_gbps)


def gpu_name(device: ComputeDevice) -> str:
    """How the figures name a device's GPU (GpuSpeed.name)."""
    return f"{device.info.name} ({device.info.description})"


def round_trip_ms(head: str, tries: int = 20, timeout_s: float = 2.0) -> float:
    """Median ms of opening a TCP connection to `head` (HOST or HOST:PORT, Ray's port 6379 by default): a
    handshake is one round trip, and a refused one (nothing listening) is one too."""
    host, _, port = head.rpartition(":") if ":" in head else (head, "", str(RAY_PORT))
    try:
        address = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4]
    except (socket.gaierror, ValueError) as e:
        raise ValueError(f"--head {head}: not an address this machine can resolve ({e}); give the head's IP "
                         "address or host name, optionally with :PORT") from None
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        try:
            with socket.create_connection(address, timeout=timeout_s):
                pass
        except ConnectionRefusedError:
            pass
        except OSError as e:
            raise ValueError(f"--head {head}: no answer within {timeout_s:g} s ({e}); is the head up, and does its "
                             f"firewall let this machine reach port {port}?") from None
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


FIXED_COST_NAMES = ("layer_ms", "row_layer_us", "sequence_layer_ms", "remote_layer_ms", "remote_expert_us",
                    "next_worker_ms")  # what fixed_costs measures: MachineSpeed's fields of those names


def fixed_costs(folder: Path, matmuls: tuple[dict[str, float], dict[str, float], dict[str, float]],
                done: Callable[[], object] = lambda: None) -> dict[str, float]:
    """The runtime's fixed costs, as MachineSpeed holds them. The probe model runs in six ways; from each
    measured step, the cost model's math for it (from `matmuls`, matmul_speeds' figures, and the probe
    model's experts' measured speed) is taken away, and what is left, compared between two ways that
    differ in one thing, is that thing's cost: per layer; per further row of a sequence (small matrices
    compute far below the rate of big ones); per further sequence in a step; per MoE layer for one local
    worker and again for a second one; per expert of a layer a worker computes in a step. Calls `done` after
    each of its FIXED_COST_RUNS runs."""
    from cluster.config import ClusterConfig
    from cluster.head import ExpertCluster
    from runtime.gguf_file import GGUFModelFile
    from runtime.model import KimiModel
    from runtime.synthetic.demo_model import make_model
    path = make_model(folder / "probe.gguf", preset=PROBE_MODEL)
    model = KimiModel(GGUFModelFile(path))
    cost = ModelCost.from_model(model.file, model.config)
    cores = len(os.sched_getaffinity(0))
    speed = MachineSpeed(*matmuls, expert_speeds(cost, folder), cost.expert_shape, attention_speeds(cost),
                         cost.attention_shape, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, cores)
    done()
    layers, moe_layers = PROBE_MODEL.num_layers, PROBE_MODEL.num_layers - PROBE_MODEL.num_dense_layers
    decode_positions = 3 + PROBE_TOKENS // 2

    def unexplained(measured_ms: float, placement: Placement, workers: int, rows: int, sequences: int,
                    positions: int) -> float:
        """What the cost model, with no fixed costs, leaves of a measured step."""
        threads = max(1, cores // (workers + 1))
        nodes = {name: NodeSpeed("here", speed, cores if name == placement.head_node else threads)
                 for name in placement.experts}
        return measured_ms - sum(step_parts(cost, placement, nodes, rows, sequences, positions).values())

    def with_workers(count: int) -> tuple[Placement, float, float]:
        """The placement, a decode step and a prompt's step, with `count` local workers."""
        config = ClusterConfig.from_dict({"model": str(path), "reserve_gb": 0, "max_sequences": 1,
                                          "context": PROBE_CONTEXT},
                                         "probe")
        with ExpertCluster(path, config, local_workers=count, worker_memory_gb=1, head_memory_gb=1,
                           progress=False) as cluster:
            clustered = cluster.start()
            decode = _decode_ms(clustered)
            measured = cluster.placement, decode, _prompt_ms(clustered, PROBE_PROMPT) if count == 1 else 0.0
        done()
        return measured

    alone = single_node(cost)
    # This machine's speed drifts over seconds: the one-process runs take turns, and each keeps its median.
    # (step, its rows, sequences and attended positions): one decode, PROBE_SEQUENCES decoding, two prompts
    steps = ((lambda: _decode_ms(model), 1, 1, decode_positions),
             (lambda: _decode_ms(model, PROBE_SEQUENCES), PROBE_SEQUENCES, PROBE_SEQUENCES, decode_positions),
             (lambda: _prompt_ms(model, PROBE_SEQUENCES), PROBE_SEQUENCES, 1, PROBE_SEQUENCES),
             (lambda: _prompt_ms(model, PROBE_PROMPT), PROBE_PROMPT, 1, PROBE_PROMPT))
    rounds = []
    for _ in range(PROBE_ROUNDS):
        rounds.append([])
        for step, rows, sequences, positions in steps:
            rounds[-1].append(unexplained(step(), alone, 0, rows, sequences, positions))
            done()
    one, together, short_prompt, prompt = (statistics.median(kind) for kind in zip(*rounds))
    # Prompt steps of two lengths give the cost per row (a prompt's step also costs more than a decode step).
    row = max(0.0, prompt - short_prompt) / (PROBE_PROMPT - PROBE_SEQUENCES)
    placement, decode, worker_prompt = with_workers(1)
    worker_one = unexplained(decode, placement, 1, 1, 1, decode_positions)
    worker_prompt = unexplained(worker_prompt, placement, 1, PROBE_PROMPT, 1, PROBE_PROMPT)
    remote = sum(len(per_layer.get(layer, ())) for node, per_layer in placement.experts.items()
                 if node != placement.head_node for layer in cost.expert_bytes)
    more_touched = (touched_fraction(cost, PROBE_PROMPT) - touched_fraction(cost, 1)) * remote  # experts, all layers
    placement, decode, _ = with_workers(2)
    two_workers = unexplained(decode, placement, 2, 1, 1, decode_positions)
    return {"layer_ms": max(0.0, one) / layers, "row_layer_us": 1000 * row / layers,
            "sequence_layer_ms": max(0.0, (together - one) / (PROBE_SEQUENCES - 1) - row) / layers,
            "remote_layer_ms": max(0.0, worker_one - one) / moe_layers,
            "remote_expert_us": 1000 * max(0.0, (worker_prompt - worker_one) - (prompt - one)) / more_touched,
            "next_worker_ms": max(0.0, two_workers - worker_one) / moe_layers}


def _decode_ms(model, sequences: int = 1) -> float:
    """Median ms of a step in which `sequences` sequences each decode a token."""
    from runtime.engine import Engine, Request
    steps: list[tuple[int, float]] = []
    engine = Engine(model, context_size=PROBE_CONTEXT, max_sequences=sequences)
    engine.on_step = lambda rows, seconds: steps.append((rows, seconds))
    for sequence in range(sequences):
        engine.submit(Request((300 + sequence, 301, 302), PROBE_TOKENS + PROBE_WARMUP + 1), lambda output: None)
    while engine.busy:
        engine.step()
    return 1000 * statistics.median([seconds for rows, seconds in steps if rows == sequences][PROBE_WARMUP:])


def _prompt_ms(model, rows: int) -> float:
    """Median ms of one sequence's step through a `rows`-token prompt."""
    from runtime.engine import Engine
    steps: list[float] = []
    engine = Engine(model, context_size=PROBE_CONTEXT)
    engine.on_step = lambda rows, seconds: steps.append(seconds)
    for _ in range(PROBE_WARMUP + PROBE_TOKENS // 4):
        for _ in engine.generate(range(300, 300 + rows), 1):
            pass
    return 1000 * statistics.median(steps[PROBE_WARMUP:])


@dataclass(frozen=True)
class Probed:
    """A probe's figures, how long each phase took, and why the figures are not final (none: they are)."""
    speed: MachineSpeed
    seconds: dict[str, float]  # phase (MATMULS, EXPERTS, ATTENTION, FIXED) -> seconds
    doubts: tuple[str, ...] = ()


MATMULS, EXPERTS, ATTENTION, FIXED = "matmul speeds", "routed experts' speed", "attention's speed", "fixed costs"
GPU = "GPU's speed"


def probe(cost: ModelCost, fixed: dict[str, float] | None = None, progress: bool = True,
          device: ComputeDevice | None = None) -> Probed:
    """This machine's figures for a model of this cost (its weight types, expert and attention shapes), and its
    GPU's where it has one (`device`). The runtime's fixed costs are the same for every model: measured too
    unless given (the longest phase: it starts Ray twice)."""
    types = model_types(cost)
    seconds: dict[str, float] = {}
    doubts: list[str] = []

    @contextmanager
    def phase(name: str, what: str, runs: int):
        load, started = OtherLoad(), time.perf_counter()
        with tqdm(total=runs, desc=f"probe: {name} ({what})", unit="run", disable=not progress,
                  file=sys.stderr) as bar:
            yield bar.update
        seconds[name] = time.perf_counter() - started
        if load.is_busy:
            doubts.append(f"other processes took {load.cores():.1f} of this machine's {len(load.cpus)} cores while "
                          f"the {name} were measured")

    with tempfile.TemporaryDirectory(prefix="kimi-probe-") as folder:
        with phase(MATMULS, ", ".join(sorted(types)), len(types)) as done:
            matmuls = matmul_speeds(types, Path(folder), done)
        with phase(EXPERTS, cost.expert_shape, len(PAIRS_PER_EXPERT)) as done:
            expert_gflops = expert_speeds(cost, Path(folder), done)
        with phase(ATTENTION, cost.attention_shape, 2) as done:
            attention_gflops = attention_speeds(cost, done)
        gpu = None
        if device is not None:
            with phase(GPU, device.info.name, len(head_types(cost)) + 4) as done:
                gpu = gpu_speeds(cost, device, Path(folder), done)
        if fixed is None:
            with phase(FIXED, "one process, then 1 and 2 local workers on Ray", FIXED_COST_RUNS) as done:
                fixed = fixed_costs(Path(folder), matmuls, done)
    speed = MachineSpeed(*matmuls, expert_gflops, cost.expert_shape, attention_gflops, cost.attention_shape, **fixed,
                         cores=len(os.sched_getaffinity(0)), gpu=gpu)
    doubts += [f"{name} came out as 0.0" for name, value in _figures(speed.to_dict()) if value == 0.0]
    return Probed(speed, seconds, tuple(doubts))


def _figures(figures: dict, prefix: str = "") -> list[tuple[str, float]]:
    """(name, value) of every number in MachineSpeed.to_dict()'s nested dicts, e.g. ('read_gbps.Q4_K', 31.2)."""
    found = []
    for name, value in figures.items():
        if isinstance(value, dict):
            found += _figures(value, f"{prefix}{name}.")
        elif isinstance(value, float):
            found.append((f"{prefix}{name}", value))
    return found
