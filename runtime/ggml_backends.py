"""ggml's compute devices (a GPU through CUDA, Metal or Vulkan; the CPU), and the one the head computes on.

With a device, the head's weights (attention, norms, routers, shared experts, dense layers, output matrix) are
copied into its memory, while the token embeddings and the routed experts stay mapped from the file in host
memory. The step graphs then run through ggml's backend scheduler over [device, CPU]: each op runs where the
weights it reads live, and the scheduler copies hidden rows across where the graph crosses, as llama.cpp does
with `-ngl 99 -ot exps=CPU`.

Each sequence's KV cache lies on the device too while the device has room for it (DeviceLayers), else in host
memory as without a device.

The CPU can stand in for the device (`--gpu cpu`): its weights are then copied into the CPU backend's own
buffers and the graphs run through the same scheduler, so the code a GPU runs is the code tested without one.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np

from .ggml_ops import BufferWeight, DeviceWeight, Weight, ggml
from .kv_memory import LayerMemory, PlainLayers, layer_memory

_lib = ggml.lib
_DEVICE_KINDS = ("CPU", "GPU", "IGPU", "ACCEL", "META")  # enum ggml_backend_dev_type
# Device memory the head's weights leave free for the step graphs' buffers and the driver's own.
COMPUTE_RESERVE_BYTES = 1 << 30


@dataclass(frozen=True)
class DeviceInfo:
    index: int  # among all of ggml's devices
    name: str  # e.g. CUDA0, Metal, Vulkan0, CPU
    description: str
    kind: str  # CPU, GPU (own memory), IGPU (host memory), ACCEL
    free_bytes: int
    total_bytes: int

    @property
    def is_gpu(self) -> bool:
        return self.kind in ("GPU", "IGPU")

    def __str__(self) -> str:
        memory = f", {self.free_bytes / 2**30:.1f} of {self.total_bytes / 2**30:.1f} GiB free" if self.is_gpu else ""
        return f"{self.name} ({self.description}{memory})"


def devices() -> list[DeviceInfo]:
    """Every device ggml was built with, in its order (GPUs first)."""
    found = []
    for index in range(_lib.ggml_backend_dev_count()):
        dev = _lib.ggml_backend_dev_get(index)
        kind = _lib.ggml_backend_dev_type(dev)
        found.append(DeviceInfo(index, _lib.ggml_backend_dev_name(dev).decode(),
                                _lib.ggml_backend_dev_description(dev).decode().strip(),
                                _DEVICE_KINDS[kind] if kind < len(_DEVICE_KINDS) else str(kind), *_memory(dev)))
    return found


def _memory(dev: int) -> tuple[int, int]:
    """A device's free and total bytes, as its backend reports them now."""
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    _lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


class DeviceChoiceError(ValueError):
    """--gpu names a device this build lacks, or one without room for the head's weights."""


def choose_device(choice: str | int, head_bytes: int) -> tuple[DeviceInfo | None, str]:
    """The device the head computes on for --gpu `choice` and a head of head_bytes, and a line saying which
    and why. auto: the first GPU with room, else the CPU as before; N: GPU N, or a DeviceChoiceError saying
    what is missing; cpu: the CPU standing in for a GPU; none: no device."""
    found = devices()
    gpus = [d for d in found if d.is_gpu]
    have = "ggml's backends here: " + ", ".join(str(d) for d in found)
    need = head_bytes + COMPUTE_RESERVE_BYTES
    if choice == "none":
        return None, f"{have}; the head computes on the CPU (--gpu none)"
    if choice == "cpu":
        cpu = next(d for d in found if d.kind == "CPU")
        return cpu, f"{have}; the head computes through the device scheduler with the CPU standing in (--gpu cpu)"
    if choice == "auto":
        fitting = [d for d in gpus if d.free_bytes >= need]
        if fitting:
            return fitting[0], f"{have}; the head's weights ({head_bytes / 2**30:.1f} GiB) go on {fitting[0].name}"
        why = ("this build of ggml has no GPU backend (see the README to build it with CUDA, Metal or Vulkan)"
               if not gpus else f"no GPU has {need / 2**30:.1f} GiB free for the head's weights and buffers")
        return None, f"{have}; {why}, so the head computes on the CPU"
    if not gpus:
        raise DeviceChoiceError(f"--gpu {choice}: this build of ggml has no GPU backend ({have}); rebuild "
                                "ggml-python with CUDA, Metal or Vulkan (see the README), or use --gpu none")
    if choice >= len(gpus):
        raise DeviceChoiceError(f"--gpu {choice}: ggml has {len(gpus)} GPU(s), numbered from 0: "
                                + ", ".join(str(d) for d in gpus))
    gpu = gpus[choice]
    if gpu.free_bytes < need:
        raise DeviceChoiceError(f"--gpu {choice}: {gpu} lacks room for the head's weights ({head_bytes / 2**30:.1f} "
                                f"GiB, plus {COMPUTE_RESERVE_BYTES / 2**30:.0f} GiB for buffers); free memory on it "
                                "or use --gpu none")
    return gpu, f"{have}; the head's weights ({head_bytes / 2**30:.1f} GiB) go on {gpu.name}"


class ComputeDevice:
    """The backends the head's step graphs run on: the device's first, the CPU's last (the scheduler's order of
    preference), and the device's buffer type, which holds the weights placed on it."""

    def __init__(self, info: DeviceInfo):
        self.info = info
        dev = _lib.ggml_backend_dev_get(info.index)
        self.cpu = _lib.ggml_backend_cpu_init()
        self.backends = [self.cpu] if info.kind == "CPU" else [_lib.ggml_backend_dev_init(dev, None), self.cpu]
        if not all(self.backends):
            raise RuntimeError(f"ggml could not start a backend on {info}")
        self.buffer_type = _lib.ggml_backend_dev_buffer_type(dev)
        self.placed_bytes = 0

    def place(self, weight: Weight) -> DeviceWeight:
        """A copy of the weight in the device's memory."""
        placed = DeviceWeight(weight, self.buffer_type).write(weight)
        self.placed_bytes += placed.nbytes
        return placed

    def holds(self, weight: BufferWeight) -> bool:
        """Whether the weight lies in this device's memory."""
        return _lib.ggml_backend_buffer_get_type(weight.tensor.contents.buffer) == self.buffer_type

    def kv_layers(self, num_layers: int, shape: tuple[int, ...]) -> DeviceLayers | LayerMemory | PlainLayers:
        """A KV cache's layers (kv_cache.KVCache): on the device while it has room for them beside what the step
        graphs need, else in host memory."""
        free, _ = _memory(_lib.ggml_backend_dev_get(self.info.index))
        if free >= num_layers * math.prod(shape) * 2 + COMPUTE_RESERVE_BYTES:
            return DeviceLayers(num_layers, shape, self.buffer_type)
        return layer_memory(num_layers, shape)

    def set_cpu_threads(self, threads: int, row_invariant: bool) -> None:
        """Threads and kernels of the CPU's part of the next graph (see ggml_graph.PlannedGraph.plan)."""
        _lib.ggml_backend_cpu_set_n_threads(self.cpu, threads)
        _lib.ggml_backend_cpu_set_use_ref(self.cpu, row_invariant)

    def __del__(self):
        for backend in getattr(self, "backends", []):
            if backend:
                _lib.ggml_backend_free(backend)


class DeviceRows:
    """One layer of a KV cache in a device's memory: a float16 ggml tensor of numpy shape `shape` (rows first)
    that the step graphs write and read in place, and, for the host's copies of whole rows (prompt reuse, the
    prompt store), numpy's indexing of its leading axis: a[i], a[i:j] read rows into host memory, a[i:j] = rows
    writes them."""
    dtype = np.dtype(np.float16)

    def __init__(self, tensor, shape: tuple[int, ...]):
        self.tensor, self.shape = tensor, shape
        self.row_bytes = math.prod(shape[1:]) * 2

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def _rows(self, index: int | slice) -> range:
        rows = range(self.shape[0])[index if isinstance(index, slice) else slice(index, index + 1)]
        if rows.step != 1:
            raise IndexError("a KV cache on a device is read and written in runs of whole rows")
        return rows

    def __getitem__(self, index: int | slice) -> np.ndarray:
        rows = self._rows(index)
        out = np.empty((len(rows), *self.shape[1:]), np.float16)
        if len(rows):
            _lib.ggml_backend_tensor_get(self.tensor, out.ctypes.data, rows.start * self.row_bytes, out.nbytes)
        return out[0] if isinstance(index, int) else out

    def __setitem__(self, index: slice, value: np.ndarray) -> None:
        rows = self._rows(index)
        value = np.ascontiguousarray(np.broadcast_to(value, (len(rows), *self.shape[1:])), np.float16)
        if len(rows):
            _lib.ggml_backend_tensor_set(self.tensor, value.ctypes.data, rows.start * self.row_bytes, value.nbytes)


class DeviceLayers:
    """A KV cache's layers in one buffer of a device's memory, freed with the last of its arrays. Another cache's
    rows are copied in, not shared (kv_memory.LayerMemory shares host pages)."""

    def __init__(self, num_layers: int, shape: tuple[int, ...], buffer_type: int):
        self._ctx = ggml.ggml_init(ggml.ggml_init_params(mem_size=num_layers * ggml.ggml_tensor_overhead(),
                                                         mem_buffer=None, no_alloc=True))
        tensors = [ggml.ggml_new_tensor(self._ctx, ggml.GGML_TYPE_F16, len(shape),
                                        (ctypes.c_int64 * len(shape))(*reversed(shape))) for _ in range(num_layers)]
        self._buffer = _lib.ggml_backend_alloc_ctx_tensors_from_buft(self._ctx, buffer_type)
        if not self._buffer:
            ggml.ggml_free(self._ctx)
            raise MemoryError(f"ggml could not allocate a KV cache of {num_layers} x {list(shape)} on the device")
        _lib.ggml_backend_buffer_clear(self._buffer, 0)
        self.arrays = [DeviceRows(tensor, shape) for tensor in tensors]
        for rows in self.arrays:
            rows.owner = self  # the buffer lives while any layer's array does (a step's graph may hold one)

    def share(self, source, rows: int) -> int:
        return 0

    def __del__(self):
        if getattr(self, "_buffer", None):
            _lib.ggml_backend_buffer_free(self._buffer)
            ggml.ggml_free(self._ctx)
