"""Memory for KV caches that other caches can share without a copy.

Each cache's layers live in a file in memory of its own (Linux memfd), mapped into one array per layer. A new
cache whose prompt begins as another cache's maps that cache's pages over its own for the rows they have in
common, in whole pages, instead of copying them: both then read the same memory. That is safe because a
cache never writes a row below its length again, and the rows shared lie below both caches' lengths. A file
lives as long as some cache maps it; when its own cache is dropped, the rows nobody else maps are given back
at once. Elsewhere than Linux caches are plain arrays, and shared rows are copied (see share_rows).
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import weakref

import numpy as np

SHARING = hasattr(os, "memfd_create")  # Linux
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_libc = ctypes.CDLL(None, use_errno=True) if SHARING else None
if _libc is not None:
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class _MemoryFile:
    """A memfd holding one cache's layers, `layer_bytes` apart; closed when no cache refers to it."""

    def __init__(self, num_layers: int, layer_bytes: int, row_bytes: int):
        self.fd = os.memfd_create("kimi-kv-cache", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, num_layers * layer_bytes)
        self.num_layers, self.layer_bytes, self.row_bytes = num_layers, layer_bytes, row_bytes
        self.mapped_rows = 0  # the most rows other caches map from it

    def give_back_beyond(self, rows: int) -> None:
        """Free the pages of every layer's rows from `rows` on (they read as zeros afterwards)."""
        start = -(-rows * self.row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        for layer in range(self.num_layers):
            if _libc.fallocate(self.fd, _PUNCH_HOLE, layer * self.layer_bytes + start, self.layer_bytes - start):
                raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE) failed on a KV cache's memory")

    def __del__(self):
        os.close(self.fd)


class LayerMemory:
    """num_layers float16 arrays of `shape` (rows first) in one mapping of a memory file of their own; the first
    rows of all layers may instead be mapped from other caches' files (share)."""

    def __init__(self, num_layers: int, shape: tuple[int, ...]):
        self.row_bytes = math.prod(shape[1:]) * 2
        self.layer_bytes = -(-shape[0] * self.row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.file = _MemoryFile(num_layers, self.layer_bytes, self.row_bytes)
        self._mapping = mmap.mmap(self.file.fd, num_layers * self.layer_bytes, mmap.MAP_SHARED)
        # The arrays hold the mapping: it stays while anything (a step's graph) still reads them.
        self.arrays = [np.frombuffer(self._mapping, np.float16, math.prod(shape), layer * self.layer_bytes)
                       .reshape(shape) for layer in range(num_layers)]
        self._address = self.arrays[0].ctypes.data
        self.sources: list[tuple[int, _MemoryFile]] = [(shape[0], self.file)]  # (end row, file), in row order
        # The rows nobody else maps go back when this cache is dropped, even while others keep the file.
        weakref.finalize(self, _give_back, self.file)

    @property
    def rows_per_page_run(self) -> int:
        """Rows are shared in runs of this many: the fewest that fill whole pages."""
        return mmap.PAGESIZE // math.gcd(mmap.PAGESIZE, self.row_bytes)

    def share(self, source: LayerMemory, rows: int) -> int:
        """Map source's first rows (as many of `rows` as fill whole pages) over this cache's own; returns how many.
        The source's rows must not change afterwards (rows below a cache's length never do)."""
        shared = rows // self.rows_per_page_run * self.rows_per_page_run
        if shared == 0 or source.row_bytes != self.row_bytes:
            return 0
        start, sources = 0, []
        for end, file in source.sources:
            end = min(end, shared)
            if end > start:
                self._map(file, start, end)
                file.mapped_rows = max(file.mapped_rows, end)
                sources.append((end, file))
            start = end
            if start == shared:
                break
        self.sources = sources + [(end, file) for end, file in self.sources if end > shared]
        return shared

    def _map(self, file: _MemoryFile, start: int, end: int) -> None:
        length = (end - start) * self.row_bytes
        for layer in range(file.num_layers):
            target = self._address + layer * self.layer_bytes + start * self.row_bytes
            offset = layer * file.layer_bytes + start * self.row_bytes
            got = _libc.mmap(target, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
                             file.fd, offset)
            if got != target:
                raise OSError(ctypes.get_errno(), "mmap(MAP_FIXED) of a shared KV cache range failed")


class PlainLayers:
    """Where memory files are not to be had: plain arrays, which share nothing (their rows are copied)."""

    def __init__(self, num_layers: int, shape: tuple[int, ...]):
        self.arrays = [np.zeros(shape, np.float16) for _ in range(num_layers)]

    def share(self, source, rows: int) -> int:
        return 0


def layer_memory(num_layers: int, shape: tuple[int, ...]) -> LayerMemory | PlainLayers:
    return LayerMemory(num_layers, shape) if SHARING else PlainLayers(num_layers, shape)


_MAP_FIXED = 0x10


def _give_back(file: _MemoryFile) -> None:
    if file.mapped_rows == 0:
        return  # nobody else maps it: it goes whole with the last reference
    file.give_back_beyond(file.mapped_rows)
