"""Single ops on a compute device, planned once and run again and again: what the cost model's probe times on
a GPU (cluster/cost_model/probe.py), as the step graphs run them there: weights and the KV cache in the
device's memory, inputs copied in from host memory and outputs back by ggml's backend scheduler."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .ggml_backends import ComputeDevice, DeviceLayers
from .ggml_graph import PlannedGraph, ScheduledMemory
from .ggml_ops import GgmlRunner, Weight, flash_attention, ggml, matmul_attention


def _planned(device: ComputeDevice, build: Callable[[PlannedGraph], object]) -> Callable[[], None]:
    """A graph of what `build` returns, placed on the device: its compute call."""
    memory = ScheduledMemory(device)
    graph = PlannedGraph(GgmlRunner(), 64, memory)
    graph.plan({"out": build(graph)})
    memory.allocate()
    return graph.compute


def matmul_on(device: ComputeDevice, weight: Weight, rows: int) -> Callable[[], None]:
    """`rows` rows of ones times a copy of the weight in the device's memory."""
    placed = device.place(weight)
    x = np.ones((rows, weight.ne[0]), np.float32)
    return _planned(device, lambda g: ggml.ggml_mul_mat(g.ctx, g.weight(placed), g.external(x)))


def attention_on(device: ComputeDevice, heads: int, width: int, values: int, rows: int, positions: int,
                 flash: bool) -> Callable[[], None]:
    """One layer's attention of `rows` query rows over `positions` cached positions in the device's memory, as
    the step graphs attend (flash attention for decoding rows, matmuls for a prompt's)."""
    cache = DeviceLayers(1, (positions, 1, width), device.buffer_type).arrays[0]
    queries, mask = np.ones((rows, heads, width), np.float32), np.zeros((rows, positions), np.float16)

    def build(g: PlannedGraph):
        keys = g.cache_rows(cache)
        k = ggml.ggml_view_3d(g.ctx, keys, width, positions, 1, keys.contents.nb[1], 2 * width, 0)
        v = ggml.ggml_view_3d(g.ctx, keys, values, positions, 1, keys.contents.nb[1], 2 * values, 0)
        q = ggml.ggml_permute(g.ctx, g.external(queries), 0, 2, 1, 3)  # [width, rows, heads]
        attend = flash_attention if flash else matmul_attention
        return ggml.ggml_cont(g.ctx, attend(g.ctx, q, k, v, g.external(mask), 1.0))
    return _planned(device, build)


def round_trip_on(device: ComputeDevice, floats: int) -> Callable[[], None]:
    """Copy `floats` float32 values into the device's memory and back: what a step pays where its graph crosses
    between the device and the CPU (the hidden rows to the routed experts and their sum back)."""
    cache = DeviceLayers(1, (1, 1, 2 * floats), device.buffer_type).arrays[0]
    rows = np.ones((1, 1, 2 * floats), np.float16)

    def there_and_back() -> None:
        cache[0:1] = rows
        cache[0:1]
    return there_and_back
