"""The only module that touches ggml: quantized matmuls over memory-mapped GGUF bytes, without copies.

Each op builds a small ggml graph, points its weight tensors at the mapped file and its inputs at numpy
arrays, computes it on the CPU and returns numpy. ggml quantizes activations to Q8_0/Q8_K before
quantized dot products, exactly as llama.cpp does, so results agree with llama.cpp to float rounding.

Optionally a weight is copied into ggml's CPU "repack" buffer, which interleaves rows for faster
kernels (what llama.cpp does by default on x86): 1.3-2x faster, at the cost of a private copy.
"""
from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# libgomp reads these when ggml loads; a passive wait keeps idle servers from burning a core.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import ggml  # noqa: E402

Q = GGMLQuantizationType
COMPUTABLE_TYPES = frozenset({
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0,
    Q.TQ2_0, Q.MXFP4,
})
_TENSOR_OVERHEAD = ggml.ggml_tensor_overhead()
_GRAPH_OVERHEAD = ggml.ggml_graph_overhead()
_TENSOR_ALIGNMENT = 32  # ggml-backend-impl.h's TENSOR_ALIGNMENT


def _declare_backend_functions():
    """ggml-python 0.0.45 declares some backend functions' pointer results so that ctypes truncates
    them to 32 bits; declare the ones used here with full-width pointers, in one place."""
    p, size = ctypes.c_void_p, ctypes.c_size_t
    for name, restype, argtypes in (
            ("ggml_backend_cpu_reg", p, []), ("ggml_backend_reg_dev_get", p, [p, size]),
            ("ggml_backend_reg_get_proc_address", p, [p, ctypes.c_char_p]),
            ("ggml_backend_buft_name", ctypes.c_char_p, [p]),
            ("ggml_backend_buft_get_alloc_size", size, [p, p]),
            ("ggml_backend_buft_alloc_buffer", p, [p, size]), ("ggml_backend_buffer_get_base", p, [p]),
            ("ggml_backend_buffer_free", None, [p]), ("ggml_backend_tensor_alloc", ctypes.c_int, [p, p, p]),
            ("ggml_backend_tensor_set", None, [p, p, size, size]),
            ("ggml_backend_tensor_get", None, [p, p, size, size]),
            ("ggml_backend_cpu_buffer_from_ptr", p, [p, size]),
            ("ggml_backend_buffer_set_usage", None, [p, ctypes.c_int]), ("ggml_backend_buffer_get_type", p, [p]),
            ("ggml_backend_buffer_clear", None, [p, ctypes.c_uint8]),
            ("ggml_backend_alloc_ctx_tensors_from_buft", p, [p, p]),
            ("ggml_backend_dev_count", size, []), ("ggml_backend_dev_get", p, [size]),
            ("ggml_backend_dev_name", ctypes.c_char_p, [p]), ("ggml_backend_dev_description", ctypes.c_char_p, [p]),
            ("ggml_backend_dev_type", ctypes.c_int, [p]),
            ("ggml_backend_dev_memory", None, [p, ctypes.POINTER(size), ctypes.POINTER(size)]),
            ("ggml_backend_dev_init", p, [p, ctypes.c_char_p]), ("ggml_backend_dev_buffer_type", p, [p]),
            ("ggml_backend_free", None, [p]), ("ggml_backend_cpu_init", p, []),
            ("ggml_backend_cpu_set_n_threads", None, [p, ctypes.c_int]),
            ("ggml_backend_cpu_set_use_ref", None, [p, ctypes.c_bool]),
            ("ggml_backend_sched_new", p, [ctypes.POINTER(p), ctypes.POINTER(p), ctypes.c_int, size, ctypes.c_bool,
                                           ctypes.c_bool]),
            ("ggml_backend_sched_free", None, [p]), ("ggml_backend_sched_reset", None, [p]),
            ("ggml_backend_sched_reserve", ctypes.c_bool, [p, p]),
            ("ggml_backend_sched_alloc_graph", ctypes.c_bool, [p, p]),
            ("ggml_backend_sched_graph_compute", ctypes.c_int, [p, p]),
            ("ggml_backend_sched_get_n_splits", ctypes.c_int, [p]), ("ggml_backend_cpu_buffer_type", p, [])):
        function = getattr(ggml.lib, name)
        function.restype, function.argtypes = restype, argtypes
    return ggml.lib


_lib = _declare_backend_functions()


def _repack_buffer_type() -> int | None:
    """ggml's CPU_REPACK buffer type, if this CPU has repacked kernels."""
    reg = _lib.ggml_backend_cpu_reg()
    get_extra = _lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not get_extra:
        return None
    bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(get_extra)(
        _lib.ggml_backend_reg_dev_get(reg, 0))
    i = 0
    while bufts[i]:
        if _lib.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


_REPACK_BUFFER_TYPE = _repack_buffer_type()


@ggml.ggml_log_callback
def _log_warnings_only(level, text, user_data):
    # ggml logs every repacked tensor at debug level; keep warnings and errors.
    if level >= ggml.GGML_LOG_LEVEL_WARN and text:
        os.write(2, text)


ggml.ggml_log_set(_log_warnings_only, None)


@dataclass(frozen=True)
class Weight:
    """A weight tensor as ggml sees it: type, ggml shape (ne0 first) and the bytes that back it."""
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]
    data: np.ndarray  # contiguous bytes (usually a view of the mapped file); kept alive by this object

    def __post_init__(self):
        if self.ggml_type not in COMPUTABLE_TYPES:
            raise ValueError(f"ggml type {self.ggml_type.name} cannot be computed by this build")
        if not self.data.flags.c_contiguous:
            raise ValueError("weight bytes must be contiguous")
        if self.data.nbytes != self.nbytes:
            raise ValueError(f"{self.ggml_type.name} {list(self.ne)} needs {self.nbytes} bytes, got {self.data.nbytes}")

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.ne)) // block_size * type_size

    def slice_outer(self, start: int, stop: int) -> "Weight":
        """Items [start, stop) of the slowest axis (e.g. a run of experts), still without copying."""
        per_item = self.nbytes // self.ne[-1]
        raw = self.data.reshape(-1)[start * per_item: stop * per_item]
        return Weight(self.ggml_type, self.ne[:-1] + (stop - start,), raw)

    @cached_property
    def header(self) -> "_TensorHeader":
        """The ggml tensor over these bytes, made once: making it anew for every graph cost about as much
        as a small matmul itself."""
        return _TensorHeader(int(self.ggml_type), self.ne, self.data.ctypes.data, self.nbytes)

    @cached_property
    def experts(self) -> "_ExpertMatrices":
        """Each item of a 3-D (expert) weight as a 2-D tensor over its own bytes."""
        return _ExpertMatrices(int(self.ggml_type), self.ne, self.data.ctypes.data, self.nbytes // self.ne[2])


class _TensorHeader:
    """A ggml tensor header over external bytes, in a context of its own that lives as long as it does. Its bytes
    are also wrapped as a CPU buffer of weights, so that ggml's backend scheduler runs the ops that read it on
    the CPU (and can copy it to a device for a prompt-sized op)."""

    def __init__(self, ggml_type: int, ne: tuple[int, ...], address: int, nbytes: int):
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=_TENSOR_OVERHEAD, mem_buffer=None, no_alloc=True))
        self.tensor = ggml.ggml_new_tensor_4d(self._ctx, ggml_type, *(tuple(int(n) for n in ne) + (1,) * (4 - len(ne))))
        self._buffer = host_buffer(self.tensor, address, nbytes, weights=True)

    def __del__(self):
        _lib.ggml_backend_buffer_free(self._buffer)
        ggml.ggml_free(self._ctx)


def host_buffer(tensor, address: int, nbytes: int, weights: bool = False) -> int:
    """Place `tensor` at `address` (nbytes of host memory that outlive it) through a CPU buffer over those bytes,
    which the caller frees: the scheduler places every tensor by its buffer. (A buffer must begin at a multiple
    of ggml's tensor alignment; the tensor itself need not.)"""
    base = address - address % _TENSOR_ALIGNMENT
    buffer = _lib.ggml_backend_cpu_buffer_from_ptr(base, max(address + nbytes - base, 1))
    if weights:
        _lib.ggml_backend_buffer_set_usage(buffer, ggml.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
    _lib.ggml_backend_tensor_alloc(buffer, tensor, address)
    return buffer


class _ExpertMatrices:
    """experts[e]: the 2-D tensor of item e of a 3-D weight [in, out, experts] whose items lie `stride` bytes
    apart; repacked weights pass their buffer and kernel traits (extra) on. One context holds them all."""

    def __init__(self, ggml_type: int, ne: tuple[int, ...], address: int, stride: int, buffer=None, extra=None):
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=ne[2] * _TENSOR_OVERHEAD, mem_buffer=None,
                                                         no_alloc=True))
        self._tensors = []
        for e in range(ne[2]):
            tensor = ggml.ggml_new_tensor_2d(self._ctx, ggml_type, ne[0], ne[1])
            tensor.contents.data = ctypes.c_void_p(address + e * stride)
            tensor.contents.buffer, tensor.contents.extra = buffer, extra
            self._tensors.append(tensor)

    def __getitem__(self, expert: int):
        return self._tensors[expert]

    def __del__(self):
        ggml.ggml_free(self._ctx)


class BufferWeight:
    """A weight's place in a buffer of a ggml buffer type (a device's memory, or the CPU's interleaved layout):
    same type and shape, private bytes, which `write` copies in."""

    def __init__(self, w: Weight, buffer_type: int):
        self.ggml_type, self.ne = w.ggml_type, w.ne
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=_TENSOR_OVERHEAD, mem_buffer=None, no_alloc=True))
        self.tensor = ggml.ggml_new_tensor_4d(self._ctx, int(w.ggml_type), *(tuple(w.ne) + (1,) * (4 - len(w.ne))))
        size = _lib.ggml_backend_buft_get_alloc_size(buffer_type, self.tensor)
        self._buffer = _lib.ggml_backend_buft_alloc_buffer(buffer_type, size)
        if not self._buffer:
            ggml.ggml_free(self._ctx)
            where = _lib.ggml_backend_buft_name(buffer_type).decode()
            raise MemoryError(f"ggml could not allocate {size} bytes of {where} for a {w.ggml_type.name} weight "
                              f"{list(w.ne)}")
        _lib.ggml_backend_buffer_set_usage(self._buffer, ggml.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
        _lib.ggml_backend_tensor_alloc(self._buffer, self.tensor, _lib.ggml_backend_buffer_get_base(self._buffer))

    def write(self, w: Weight) -> "BufferWeight":
        _lib.ggml_backend_tensor_set(self.tensor, w.data.ctypes.data, 0, w.nbytes)
        return self

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.ne)) // block_size * type_size

    def __del__(self):
        if getattr(self, "_buffer", None):
            _lib.ggml_backend_buffer_free(self._buffer)
            ggml.ggml_free(self._ctx)


class DeviceWeight(BufferWeight):
    """A weight in a compute device's memory (a GPU's, or the CPU's standing in for one)."""


class RepackedWeight(BufferWeight):
    """A weight copied into ggml's CPU repack buffer: its rows interleaved for faster kernels."""

    @property
    def interleaved(self) -> bool:
        """Whether this CPU has interleaved kernels for its type and shape (ggml then gave it kernel traits)."""
        return bool(self.tensor.contents.extra)

    @cached_property
    def experts(self) -> _ExpertMatrices:
        """Each item of a 3-D (expert) weight as a 2-D tensor of its own over the same interleaved bytes, so
        that one expert's rows run the dense interleaved GEMM. Rows are interleaved in groups of at most 8
        within each expert's matrix (its row count is a multiple of 8), so expert e starts at e * nb[2]."""
        if len(self.ne) != 3 or self.ne[1] % 8:
            raise ValueError(f"a repacked weight of shape {list(self.ne)} has no per-expert matrices")
        parent = self.tensor.contents
        return _ExpertMatrices(int(self.ggml_type), self.ne, parent.data, parent.nb[2], parent.buffer, parent.extra)


def repack(w: Weight) -> Weight | RepackedWeight:
    """Copy w into the CPU repack buffer when this CPU has interleaved kernels for its type and shape
    (e.g. Q4_0, Q4_K, Q6_K, IQ4_NL, Q8_0 with rows in multiples of 8); otherwise return w unchanged.
    Repacked 2-D weights serve matmul and ffn; repacked 3-D (expert) weights serve expert_ffn only."""
    if _REPACK_BUFFER_TYPE is None or len(w.ne) not in (2, 3):
        return w
    packed = RepackedWeight(w, _REPACK_BUFFER_TYPE)
    return packed.write(w) if packed.interleaved else w


class _Graph:
    """One computation: a no-alloc context for tensors over external memory, an arena for the rest. Both
    contexts belong to the calling thread and are reset, not made anew, for each graph."""

    def __init__(self, runner: "GgmlRunner", arena_bytes: int):
        self.runner = runner
        self._keep: list[object] = []
        self.refs, self.ctx = runner.contexts(arena_bytes + 256 * _TENSOR_OVERHEAD + _GRAPH_OVERHEAD)

    def __enter__(self) -> "_Graph":
        return self

    def __exit__(self, *exc) -> None:
        self.runner.release_contexts()

    def _external(self, ggml_type: int, ne: tuple[int, ...], address: int, owner: object):
        ne = tuple(int(n) for n in ne) + (1,) * (4 - len(ne))
        t = ggml.ggml_new_tensor_4d(self.refs, ggml_type, *ne)
        t.contents.data = ctypes.c_void_p(address)
        self._keep.append(owner)
        return t

    def weight(self, w: Weight | BufferWeight):
        self._keep.append(w)
        return w.tensor if isinstance(w, BufferWeight) else w.header.tensor

    def input(self, array: np.ndarray):
        """A float32 or int32 numpy array as a ggml tensor (numpy shape reversed = ggml ne)."""
        dtype = {np.dtype(np.float32): ggml.GGML_TYPE_F32, np.dtype(np.int32): ggml.GGML_TYPE_I32,
                 np.dtype(np.float16): ggml.GGML_TYPE_F16}[array.dtype]
        array = np.ascontiguousarray(array)
        return self._external(dtype, tuple(reversed(array.shape)), array.ctypes.data, array)

    def compute(self, out, ndim: int) -> np.ndarray:
        """Run the graph and copy `out` into a new float32 array of `ndim` dimensions."""
        graph = ggml.ggml_new_graph(self.ctx)
        ggml.ggml_build_forward_expand(graph, out)
        plan = ggml.ggml_graph_plan(graph, self.runner.n_threads, None)
        plan.use_ref = True  # as the step graphs plan attention (PlannedGraph.plan)
        if plan.work_size:
            plan.work_data = self.runner.work_buffer(plan.work_size).ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        status = ggml.ggml_graph_compute(graph, ctypes.byref(plan))
        if status != 0:
            raise RuntimeError(f"ggml graph computation failed with status {status}")
        shape = tuple(reversed(out.contents.ne[:ndim]))
        buf = (ctypes.c_float * int(np.prod(shape))).from_address(ggml.ggml_get_data(out))
        return np.ctypeslib.as_array(buf).reshape(shape).copy()


class _ThreadContexts:
    """One thread's ggml contexts, reset for each graph rather than made anew (which cost ~10 us a graph)."""

    def __init__(self, arena_bytes: int):
        self.arena = np.empty(arena_bytes, np.uint8)
        self.refs = ggml.ggml_init(ggml.ggml_init_params(mem_size=64 * _TENSOR_OVERHEAD, mem_buffer=None,
                                                         no_alloc=True))
        self.ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=self.arena.nbytes, mem_buffer=self.arena.ctypes.data,
                                                        no_alloc=False))
        self.in_use = False

    def take(self):
        if self.in_use:
            raise RuntimeError("a ggml graph is already being built on this thread")
        self.in_use = True
        ggml.ggml_reset(self.refs)
        ggml.ggml_reset(self.ctx)
        return self.refs, self.ctx

    def __del__(self):
        ggml.ggml_free(self.refs)
        ggml.ggml_free(self.ctx)


class GgmlRunner:
    """Runs ggml graphs with a fixed thread count, reusing an arena and a work buffer between calls
    (one pair per calling thread, so a server's threads can share a runner)."""

    def __init__(self, n_threads: int | None = None):
        self.n_threads = n_threads or len(os.sched_getaffinity(0))
        self._buffers = threading.local()

    def _buffer(self, kind: str, nbytes: int) -> np.ndarray:
        buffer = getattr(self._buffers, kind, None)
        if buffer is None or buffer.nbytes < nbytes:
            buffer = np.empty(nbytes, np.uint8)
            setattr(self._buffers, kind, buffer)
        return buffer

    def contexts(self, arena_bytes: int):
        """(refs, ctx) for one graph on this thread: a no-alloc context for tensors over external memory and
        one over the arena, both emptied. One graph at a time per thread."""
        contexts = getattr(self._buffers, "contexts", None)
        if contexts is None or contexts.arena.nbytes < arena_bytes:
            contexts = self._buffers.contexts = _ThreadContexts(arena_bytes)
        return contexts.take()

    def release_contexts(self) -> None:
        self._buffers.contexts.in_use = False

    def work_buffer(self, nbytes: int) -> np.ndarray:
        return self._buffer("work", nbytes)

    def matmul(self, w: Weight, x: np.ndarray) -> np.ndarray:
        """x: [..., K] float32 -> [..., M] with w of ggml shape [K, M, (batch)]: numpy's w @ x per row."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        # ggml aborts the process on mismatched shapes; refuse them here instead.
        if x.shape[-1] != w.ne[0] or (len(w.ne) == 3 and (x.ndim != 3 or x.shape[0] % w.ne[2])):
            raise ValueError(f"cannot multiply a weight of ggml shape {list(w.ne)} with input of shape {x.shape}")
        if isinstance(w, RepackedWeight) and len(w.ne) == 3:
            raise ValueError("repacked 3-D weights serve expert_ffn only; keep batched matmul weights mapped")
        out_bytes = x.size // w.ne[0] * w.ne[1] * 4
        with _Graph(self, out_bytes) as g:
            return g.compute(ggml.ggml_mul_mat(g.ctx, g.weight(w), g.input(x)), x.ndim)

    def get_rows(self, w: Weight, ids: np.ndarray) -> np.ndarray:
        """Rows of a (quantized) table, dequantized to float32: [len(ids), ne0]."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= w.ne[1]):
            raise ValueError(f"row ids must lie in [0, {w.ne[1]}), got {ids.min()}..{ids.max()}")
        with _Graph(self, len(ids) * w.ne[0] * 4) as g:
            return g.compute(ggml.ggml_get_rows(g.ctx, g.weight(w), g.input(ids)), 2)

    def attention(self, cache: np.ndarray, queries: np.ndarray, mask: np.ndarray, values: int, scale: float,
                  flash: bool) -> np.ndarray:
        """Absorbed MLA attention over one layer's cache as the runtime computes it: cache [S, Dk] float16 (each
        position's keys, its first `values` numbers its values), queries [H, rows, Dk] float32, mask
        [rows, S] float16 (0 or -inf) -> [H, rows, values] float32; flash attention or matmuls."""
        positions, dim_k = cache.shape
        heads, rows, _ = queries.shape
        if queries.shape[2] != dim_k or mask.shape != (rows, positions) or not 0 < values <= dim_k:
            raise ValueError(f"attention of queries {queries.shape} over a cache {cache.shape} with a mask "
                             f"{mask.shape} and {values} values: the shapes do not agree")
        with _Graph(self, 4 * (2 * heads * rows * (values + positions) + positions * values)) as g:
            keys = g.input(np.ascontiguousarray(cache, np.float16))
            k = ggml.ggml_view_3d(g.ctx, keys, dim_k, positions, 1, keys.contents.nb[1], 2 * dim_k, 0)
            v = ggml.ggml_view_3d(g.ctx, keys, values, positions, 1, keys.contents.nb[1], 2 * values, 0)
            attend = flash_attention if flash else matmul_attention
            out = attend(g.ctx, g.input(queries.astype(np.float32)), k, v, g.input(mask.astype(np.float16)), scale)
            return g.compute(ggml.ggml_cont(g.ctx, out), 3)

    def expert_ffn(self, gate: Weight | None, up: Weight | None, down: Weight, x: np.ndarray, ids: np.ndarray,
                   weights: np.ndarray, gate_up: Weight | None = None) -> np.ndarray:
        """Routed SwiGLU experts as llama.cpp's build_moe_ffn computes them.

        x: [T, D] float32; ids: [T, k] int32 indices into the weights' expert axis; weights: [T, k].
        Returns [T, D] = sum over j of weights[t, j] * down[ids[t, j]] @ (silu(gate @ x) * (up @ x)),
        summed in slot order j = 0..k-1.
        """
        num_tokens, k = ids.shape
        n_embd, n_ff = down.ne[1], down.ne[0]
        if ids.size and (ids.min() < 0 or ids.max() >= down.ne[2]):
            raise ValueError(f"expert ids must lie in [0, {down.ne[2]}), got {ids.min()}..{ids.max()}")
        if x.shape != (num_tokens, n_embd) or weights.shape != ids.shape:
            raise ValueError(f"expert inputs disagree: x {x.shape}, ids {ids.shape}, weights {weights.shape}, "
                             f"n_embd {n_embd}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(num_tokens, k, 1)
        arena = 4 * num_tokens * k * (4 * n_ff + 3 * n_embd) + 4 * num_tokens * n_embd * k
        with _Graph(self, arena) as g:
            tensor = lambda w: None if w is None else g.weight(w)  # noqa: E731
            return g.compute(moe_subgraph(g.ctx, tensor(gate), tensor(up), tensor(down), tensor(gate_up), g.input(x),
                                          g.input(ids), g.input(weights)), 2)


FLOAT_WEIGHT_TYPES = frozenset(int(t) for t in (GGMLQuantizationType.F32, GGMLQuantizationType.F16,
                                                   GGMLQuantizationType.BF16))


def mul_mat(ctx, w, x, rows_alone: bool = False):
    """w [K, M] or [K, M, H] times x [K, T] or [K, T, H] -> [M, T] or [M, T, H].

    rows_alone: each of x's rows gets the bits it would get by itself. ggml multiplies a float weight by several
    rows at once with other kernels (tinyBLAS), whose sums round otherwise; quantized weights go row by row
    anyway. A float weight then multiplies x as T batches of one row each."""
    ne, wne = x.contents.ne, w.contents.ne
    if not rows_alone or ne[1] == 1 or w.contents.type not in FLOAT_WEIGHT_TYPES:
        return ggml.ggml_mul_mat(ctx, w, x)
    if not ggml.ggml_is_contiguous(x):
        x = ggml.ggml_cont(ctx, x)
    out = ggml.ggml_mul_mat(ctx, ggml.ggml_reshape_4d(ctx, w, wne[0], wne[1], 1, wne[2]),
                            ggml.ggml_reshape_4d(ctx, x, ne[0], 1, ne[1], ne[2]))  # [M, 1, T, H]
    return ggml.ggml_reshape_3d(ctx, out, wne[1], ne[1], ne[2]) if ne[2] > 1 else \
        ggml.ggml_reshape_2d(ctx, out, wne[1], ne[1])


def flash_attention(ctx, q, k, v, mask, scale: float):
    """q [Dk, rows, H] float32, k [Dk, S, Hk] and v [Dv, S, Hk] float16, mask [S, rows] float16 -> [Dv, rows, H]
    (a view): ggml's flash attention, as llama.cpp's default on the CPU. Under the reference kernels (a graph
    planned row-invariant) each (row, head) is computed alone over the positions in order, the masked ones
    skipped, and the cache is read as it lies."""
    out = ggml.ggml_flash_attn_ext(ctx, q, k, v, mask, scale, 0.0, 0.0)  # [Dv, H, rows]
    ggml.ggml_flash_attn_ext_set_prec(out, ggml.GGML_PREC_F32)
    return ggml.ggml_permute(ctx, out, 0, 2, 1, 3)


def matmul_attention(ctx, q, k, v, mask, scale: float):
    """The same as flash_attention with matmuls (llama.cpp without flash attention): scores for every position,
    masked ones too, and the values transposed for their product, which many rows share."""
    scores = ggml.ggml_mul_mat(ctx, k, q)  # [S, rows, H]
    ggml.ggml_mul_mat_set_prec(scores, ggml.GGML_PREC_F32)
    probs = ggml.ggml_soft_max_ext(ctx, scores, mask, scale, 0.0)
    return ggml.ggml_mul_mat(ctx, ggml.ggml_cont(ctx, ggml.ggml_transpose(ctx, v)), probs)


def swiglu_subgraph(ctx, gate, up, down, x, rows_alone: bool = False):
    """Dense SwiGLU ops: x [D, T] -> down @ (silu(gate @ x) * (up @ x)), with ggml's own silu."""
    act = ggml.ggml_swiglu_split(ctx, mul_mat(ctx, gate, x, rows_alone), mul_mat(ctx, up, x, rows_alone))
    return mul_mat(ctx, down, act, rows_alone)


def moe_subgraph(ctx, gate, up, down, gate_up, x, ids, weights):
    """Routed SwiGLU expert ops as llama.cpp's build_moe_ffn adds them: x [D, T], ids [k, T] (int32) and
    weights [1, k, T] -> [D, T] = sum over slots j = 0..k-1, in that order, of weights[j] * expert_ids[j](x).
    Gate and up come as two tensors or one fused gate_up [D, 2F, E]."""
    n_embd, k, num_tokens = x.contents.ne[0], ids.contents.ne[0], ids.contents.ne[1]
    x = ggml.ggml_reshape_3d(ctx, x, n_embd, 1, num_tokens)
    if gate_up is not None:
        n_ff = gate_up.contents.ne[1] // 2
        fused = ggml.ggml_mul_mat_id(ctx, gate_up, x, ids)  # [2F, k, T]
        nb1, nb2 = fused.contents.nb[1], fused.contents.nb[2]
        g_out = ggml.ggml_view_3d(ctx, fused, n_ff, k, num_tokens, nb1, nb2, 0)
        u_out = ggml.ggml_view_3d(ctx, fused, n_ff, k, num_tokens, nb1, nb2, n_ff * 4)
    else:
        u_out = ggml.ggml_mul_mat_id(ctx, up, x, ids)  # [F, k, T]
        g_out = ggml.ggml_mul_mat_id(ctx, gate, x, ids)
    experts = ggml.ggml_mul_mat_id(ctx, down, ggml.ggml_swiglu_split(ctx, g_out, u_out), ids)  # [D, k, T]
    experts = ggml.ggml_mul(ctx, experts, weights)
    nb1, nb2 = experts.contents.nb[1], experts.contents.nb[2]
    total = ggml.ggml_view_2d(ctx, experts, n_embd, num_tokens, nb2, 0)
    for j in range(1, k):
        total = ggml.ggml_add(ctx, total, ggml.ggml_view_2d(ctx, experts, n_embd, num_tokens, nb2, j * nb1))
    return ggml.ggml_cont(ctx, total) if k == 1 else total


def quantize(values: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """ggml's own quantizer: float32 rows [..., n] -> the type's bytes [..., row_bytes] (for tests and demos).

    Types that need an importance matrix get a flat one, as llama-quantize does without --imatrix data.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    n_per_row = values.shape[-1]
    nrows = values.size // n_per_row
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if n_per_row % block_size:  # ggml would write past the end of `out`
        raise ValueError(f"{ggml_type.name} quantizes rows in blocks of {block_size} values; a row of {n_per_row} "
                         f"is not a multiple of {block_size}")
    out = np.zeros(values.shape[:-1] + (n_per_row // block_size * type_size,), np.uint8)
    imatrix = np.ones(n_per_row, np.float32) if ggml.ggml_quantize_requires_imatrix(int(ggml_type)) else None
    ggml.ggml_quantize_chunk(int(ggml_type), values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                             out.ctypes.data, 0, nrows, n_per_row,
                             None if imatrix is None else imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    return out
