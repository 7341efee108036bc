"""A ggml graph built once and computed many times.

Building a graph from Python costs a few microseconds per op, and one compute call has a fixed cost of
tens of microseconds; at Kimi K2's depth both outweigh the math of a narrow model. A PlannedGraph is
therefore built once per step shape: its tensors live in a no-alloc context, its intermediates in one
buffer planned by ggml's graph allocator (memory is reused along the graph, not held op by op), its
inputs are numpy arrays that the caller rewrites before each compute, and its compute plan and work
buffer are kept.
"""
from __future__ import annotations

import ctypes
import os
import weakref

import numpy as np

from .ggml_ops import GgmlRunner, RepackedWeight, Weight, ggml

_lib = ggml.lib
_lib.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p  # ggml-python's declaration truncates it
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
    (a step's pieces): one buffer, as large as the largest graph needs, serves them all. Add every graph,
    then allocate once (ggml places a tensor only once, so the buffer must not move afterwards)."""

    def __init__(self):
        self._allocator = ggml.ggml_gallocr_new(_CPU_BUFFER_TYPE)
        self._graphs: list[weakref.ref] = []  # the graphs own their memory, not the other way round
        self._work = np.empty(0, np.uint8)

    def add(self, graph: "PlannedGraph") -> None:
        self._graphs.append(weakref.ref(graph))

    def allocate(self) -> None:
        graphs = [g for g in (ref() for ref in self._graphs) if g is not None]
        for graph in graphs:  # size the buffer for the largest first
            if not ggml.ggml_gallocr_reserve(self._allocator, graph.cgraph):
                raise MemoryError("ggml could not reserve the memory of a step's graph")
        self._work = np.empty(max((g.work_size for g in graphs), default=0), np.uint8)
        for graph in graphs:
            if not ggml.ggml_gallocr_alloc_graph(self._allocator, graph.cgraph):
                raise MemoryError("ggml could not allocate the memory of a step's graph")
            graph.placed(self._work)

    @property
    def nbytes(self) -> int:
        return int(ggml.ggml_gallocr_get_buffer_size(self._allocator, 0)) + self._work.nbytes

    def __del__(self):
        ggml.ggml_gallocr_free(self._allocator)


class PlannedGraph:
    """Build with `ctx` and the tensor helpers, then `plan(outputs)`; afterwards write the inputs (the arrays
    in `inputs`, or those passed to `external`), `compute()`, and `read` the outputs.

    Graphs that share a GraphMemory run one at a time, each read before the next runs, and can compute once
    its owner has allocated it; a graph with memory of its own is allocated by plan()."""

    def __init__(self, runner: GgmlRunner, max_tensors: int, memory: GraphMemory | None = None):
        self.runner, self.max_nodes = runner, max_tensors
        self._owns_memory = memory is None
        self.memory = memory or GraphMemory()
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(
            mem_size=max_tensors * _TENSOR_OVERHEAD + ggml.ggml_graph_overhead_custom(max_tensors, False),
            mem_buffer=None, no_alloc=True))
        self.ctx = self._ctx
        self._keep: list[object] = []  # what external tensors point into, alive as long as the graph
        self.inputs: dict[str, np.ndarray] = {}
        self._output_tensors: dict[str, object] = {}
        self._outputs: dict[str, np.ndarray] = {}
        self.weight_bytes, self.weights_read = 0, 0  # what one compute reads: narrow graphs run on one thread
        self.cgraph = self._plan = None

    def weight(self, w: Weight | RepackedWeight | np.ndarray, items_read: int | None = None):
        """A model weight: a ggml Weight (its cached header), its repacked copy, or a float32 vector.
        items_read: how many items of its last axis one compute reads (experts), if not all."""
        if isinstance(w, np.ndarray):
            return self.external(w)
        self.weight_bytes += w.nbytes if items_read is None else w.nbytes // w.ne[-1] * min(items_read, w.ne[-1])
        self.weights_read += 1
        self._keep.append(w)
        return w.tensor if isinstance(w, RepackedWeight) else w.header.tensor

    def expert_weight(self, w: Weight | RepackedWeight, expert: int):
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
        tensor.contents.data = ctypes.c_void_p(array.ctypes.data)
        self._keep.append(array)
        return tensor

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
        self._output_tensors = dict(outputs)
        narrow = self.weight_bytes < MIN_BYTES_PER_WEIGHT_FOR_THREADS * max(1, self.weights_read)
        threads = 1 if narrow and os.environ.get("OMP_WAIT_POLICY") == "passive" else self.runner.n_threads
        self._plan = ggml.ggml_graph_plan(self.cgraph, threads, None)
        self._plan.use_ref = row_invariant
        self.memory.add(self)
        if self._owns_memory:
            self.memory.allocate()

    @property
    def work_size(self) -> int:
        return self._plan.work_size

    def placed(self, work: np.ndarray) -> None:
        """Called once the memory placed this graph: view the outputs where they lie, point at the work buffer."""
        if self._plan.work_size:
            self._plan.work_data = work.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        for name, tensor in self._output_tensors.items():
            shape = tuple(reversed(tensor.contents.ne[:4]))
            dtype = np.dtype({ggml.GGML_TYPE_F32: np.float32, ggml.GGML_TYPE_I32: np.int32}[tensor.contents.type])
            buffer = (ctypes.c_uint8 * (int(np.prod(shape)) * dtype.itemsize)).from_address(ggml.ggml_get_data(tensor))
            self._outputs[name] = np.frombuffer(buffer, dtype).reshape(shape)

    def compute(self) -> None:
        status = ggml.ggml_graph_compute(self.cgraph, ctypes.byref(self._plan))
        if status != 0:
            raise RuntimeError(f"ggml graph computation failed with status {status}")

    def read(self, name: str, ndim: int) -> np.ndarray:
        """A copy of an output, as a numpy array of its last `ndim` numpy axes (ggml's first ndim)."""
        output = self._outputs[name]
        return output.reshape(output.shape[4 - ndim:]).copy()

    def __del__(self):
        ggml.ggml_free(self._ctx)
