"""A ggml graph built once and computed many times.

Building a graph from Python costs a few microseconds per op, and one compute call has a fixed cost of
tens of microseconds; at Kimi K2's depth both outweigh the math of a narrow model. A PlannedGraph is
therefore built once per step shape: its tensors live in a no-alloc context, its intermediates in one
buffer planned by ggml's graph allocator (memory is reused along the graph, not held op by op), its
inputs are numpy arrays that the caller rewrites before each compute, and its compute plan and work
buffer are kept. With a compute device (ggml_backends.py), ggml's backend scheduler places and runs the graphs
instead (ScheduledMemory); every tensor over host memory is then placed through a CPU buffer over its bytes.
"""
from __future__ import annotations

import ctypes
import os
import weakref

import numpy as np

from .ggml_backends import ComputeDevice, DeviceRows
from .ggml_ops import BufferWeight, GgmlRunner, Weight, ggml, host_buffer

_lib = ggml.lib
_CPU_BUFFER_TYPE = _lib.ggml_backend_cpu_buffer_type()
_TENSOR_OVERHEAD = ggml.ggml_tensor_overhead()
# With passive OpenMP threads (they sleep rather than spin when idle), graphs whose weights average fewer
# bytes than this run on one thread: every node of a graph ends in a barrier of all its threads, and
# waking a sleeping thread costs ~70 us here, so a graph of many narrow matmuls (K2's depth at small
# widths) ran 1.8x slower on two threads than on one. Spinning threads (the command line's choice) pay
# neither cost, and two of them were 10-20% faster on the same graph.
MIN_BYTES_PER_WEIGHT_FOR_THREADS = 512 << 10
_GGML_TYPES = {np.dtype(np.float32): ggml.GGML_TYPE_F32, np.dtype(np.float16): ggml.GGML_TYPE_F16,
               np.dtype(np.int32): ggml.GGML_TYPE_I32, np.dtype(np.int64): ggml.GGML_TYPE_I64}


class GraphMemory:
    """Intermediates and work buffer for graphs that run one after another and hand each other only copies
    (a step's pieces): one buffer, as large as the largest graph needs, serves them all, and ggml's CPU code
    computes them. Add every graph, then allocate once (ggml places a tensor only once, so the buffer must not
    move afterwards)."""

    def __init__(self):
        self._allocator = ggml.ggml_gallocr_new(_CPU_BUFFER_TYPE)
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> its compute plan
        self._work = np.empty(0, np.uint8)

    def add(self, graph: "PlannedGraph") -> None:
        plan = ggml.ggml_graph_plan(graph.cgraph, graph.threads, None)
        plan.use_ref = graph.row_invariant
        self._plans[graph] = plan

    def allocate(self) -> None:
        graphs = list(self._plans.keys())
        for graph in graphs:  # size the buffer for the largest first
            if not ggml.ggml_gallocr_reserve(self._allocator, graph.cgraph):
                raise MemoryError("ggml could not reserve the memory of a step's graph")
        self._work = np.empty(max((self._plans[g].work_size for g in graphs), default=0), np.uint8)
        for graph in graphs:
            if not ggml.ggml_gallocr_alloc_graph(self._allocator, graph.cgraph):
                raise MemoryError("ggml could not allocate the memory of a step's graph")
            if self._plans[graph].work_size:
                self._plans[graph].work_data = self._work.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))

    def compute(self, graph: "PlannedGraph") -> None:
        status = ggml.ggml_graph_compute(graph.cgraph, ctypes.byref(self._plans[graph]))
        if status != 0:
            raise RuntimeError(f"ggml graph computation failed with status {status}")

    def __del__(self):
        ggml.ggml_gallocr_free(self._allocator)


class ScheduledMemory:
    """The same for graphs run by ggml's backend scheduler over a device and the CPU (ggml_backends.py): each op
    runs where the weights it reads lie, and the scheduler keeps a buffer on each backend, as large as the
    largest graph needs there. It holds one graph's placement at a time: computing another graph places that
    one anew (its intermediates keep the addresses they were first given, as in GraphMemory)."""

    def __init__(self, device: ComputeDevice):
        self.device = device
        self._graphs: list[weakref.ref] = []  # the graphs own their memory, not the other way round
        self._sched = None
        self._placed: weakref.ref | None = None  # the graph whose splits the scheduler holds

    def add(self, graph: "PlannedGraph") -> None:
        self._graphs.append(weakref.ref(graph))

    def allocate(self) -> None:
        graphs = [g for g in (ref() for ref in self._graphs) if g is not None]
        backends = (ctypes.c_void_p * len(self.device.backends))(*self.device.backends)
        size = max(g.max_nodes + g.weights_read for g in graphs) + 64
        self._sched = _lib.ggml_backend_sched_new(backends, None, len(self.device.backends), size, False, True)
        for graph in graphs:
            if not _lib.ggml_backend_sched_reserve(self._sched, graph.cgraph):
                raise MemoryError(f"ggml could not reserve the memory of a step's graph on {self.device.info}")

    def compute(self, graph: "PlannedGraph") -> None:
        if self._placed is None or self._placed() is not graph:
            _lib.ggml_backend_sched_reset(self._sched)
            if not _lib.ggml_backend_sched_alloc_graph(self._sched, graph.cgraph):
                raise MemoryError(f"ggml could not allocate the memory of a step's graph on {self.device.info}")
            self._placed = weakref.ref(graph)
        self.device.set_cpu_threads(graph.threads, graph.row_invariant)
        status = _lib.ggml_backend_sched_graph_compute(self._sched, graph.cgraph)
        if status != 0:
            raise RuntimeError(f"ggml graph computation failed with status {status} on {self.device.info}")

    @property
    def splits(self) -> int:
        """How many runs on one backend the graph last placed was cut into."""
        return _lib.ggml_backend_sched_get_n_splits(self._sched)

    def __del__(self):
        if self._sched:
            _lib.ggml_backend_sched_free(self._sched)


class PlannedGraph:
    """Build with `ctx` and the tensor helpers, then `plan(outputs)`; afterwards write the inputs (the arrays
    in `inputs`, or those passed to `external`), `compute()`, and `read` the outputs.

    Graphs that share a memory (GraphMemory, or ScheduledMemory for a device) run one at a time, each read
    before the next runs, and can compute once its owner has allocated it; a graph with memory of its own is
    allocated by plan()."""

    def __init__(self, runner: GgmlRunner, max_tensors: int, memory: GraphMemory | ScheduledMemory | None = None):
        self.runner, self.max_nodes = runner, max_tensors
        self._owns_memory = memory is None
        self.memory = memory or GraphMemory()
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(
            mem_size=max_tensors * _TENSOR_OVERHEAD + ggml.ggml_graph_overhead_custom(max_tensors, False),
            mem_buffer=None, no_alloc=True))
        self.ctx = self._ctx
        self._keep: list[object] = []  # what external tensors point into, alive as long as the graph
        self._buffers: list[int] = []  # the host buffers that place them
        self.inputs: dict[str, np.ndarray] = {}
        self._outputs: dict[str, object] = {}
        self.weight_bytes, self.weights_read = 0, 0  # what one compute reads: narrow graphs run on one thread
        self.cgraph = None
        self.threads, self.row_invariant = runner.n_threads, True

    def weight(self, w: Weight | BufferWeight | np.ndarray, items_read: int | None = None):
        """A model weight: a ggml Weight (its cached header), a copy in a buffer (interleaved, or on a device),
        or a float32 vector. items_read: how many items of its last axis one compute reads (experts), if not all."""
        if isinstance(w, np.ndarray):
            return self.external(w)
        self.weight_bytes += w.nbytes if items_read is None else w.nbytes // w.ne[-1] * min(items_read, w.ne[-1])
        self.weights_read += 1
        self._keep.append(w)
        return w.tensor if isinstance(w, BufferWeight) else w.header.tensor

    def expert_weight(self, w: Weight | BufferWeight, expert: int):
        """One expert's matrix of a 3-D weight, as a 2-D tensor (see the weights' `experts`)."""
        self.weight_bytes += w.nbytes // w.ne[-1]
        self.weights_read += 1
        self._keep.append(w)
        return w.experts[expert]

    def external(self, array: np.ndarray):
        """A tensor over a contiguous numpy array (numpy shape reversed = ggml ne), read or written in place."""
        if not array.flags.c_contiguous:
            raise ValueError("external arrays must be contiguous")
        ne = tuple(int(n) for n in reversed(array.shape)) + (1,) * (4 - array.ndim)
        tensor = ggml.ggml_new_tensor_4d(self.ctx, _GGML_TYPES[array.dtype], *ne)
        self._buffers.append(host_buffer(tensor, array.ctypes.data, array.nbytes))
        self._keep.append(array)
        return tensor

    def cache_rows(self, rows: np.ndarray | DeviceRows):
        """A layer of a KV cache, read and written in place: in host memory, or on the device."""
        if isinstance(rows, np.ndarray):
            return self.external(rows)
        self._keep.append(rows)
        return rows.tensor

    def input(self, name: str, shape: tuple[int, ...], dtype=np.float32):
        """A tensor over a new zeroed array, inputs[name]: write it before each compute."""
        self.inputs[name] = np.zeros(shape, dtype)
        return self.external(self.inputs[name])

    def plan(self, outputs: dict[str, object], row_invariant: bool = True) -> None:
        """Fix the graph that computes `outputs` (name -> tensor) and plan its memory and threads once.

        row_invariant: ggml's reference kernels where it has several, so that flash attention computes each
        (row, head) alone, over the positions in order, as in a step of its own whatever else the step holds
        and however many threads run it. Its faster paths (tiles of 64 rows or more, a lone row's positions
        split across the threads) round otherwise: right for a prompt chunk, never for a decoding row."""
        self.cgraph = ggml.ggml_new_graph_custom(self.ctx, self.max_nodes, False)
        for name, tensor in outputs.items():
            if not ggml.ggml_is_contiguous(tensor):
                raise ValueError(f"graph output {name} must be contiguous")
            ggml.ggml_set_output(tensor)
            ggml.ggml_build_forward_expand(self.cgraph, tensor)
        self._outputs = dict(outputs)
        narrow = self.weight_bytes < MIN_BYTES_PER_WEIGHT_FOR_THREADS * max(1, self.weights_read)
        if narrow and os.environ.get("OMP_WAIT_POLICY") == "passive":
            self.threads = 1
        self.row_invariant = row_invariant
        self.memory.add(self)
        if self._owns_memory:
            self.memory.allocate()

    def compute(self) -> None:
        self.memory.compute(self)

    def read(self, name: str, ndim: int) -> np.ndarray:
        """A copy of an output, as a numpy array of its last `ndim` numpy axes (ggml's first ndim), wherever the
        output was computed."""
        tensor = self._outputs[name]
        shape = tuple(reversed(tensor.contents.ne[:ndim]))
        out = np.empty(shape, {ggml.GGML_TYPE_F32: np.float32, ggml.GGML_TYPE_I32: np.int32}[tensor.contents.type])
        _lib.ggml_backend_tensor_get(tensor, out.ctypes.data, 0, out.nbytes)
        return out

    def __del__(self):
        for buffer in self._buffers:
            _lib.ggml_backend_buffer_free(buffer)
        ggml.ggml_free(self._ctx)
