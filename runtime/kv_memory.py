"""Memory for KV caches that other caches can share without a copy.

Each cache's layers live in a file in memory of its own (Linux memfd, closed at once: the mapping keeps it),
mapped into one array per layer. A new cache whose prompt begins as another cache's maps that cache's pages
over its own for the rows they have in common, in whole pages, instead of copying them (mremap of the
source's range: whatever pages it maps, its own or those it shares itself): both then read the same memory.
That is safe because a cache never writes a row below its length again, and the rows shared lie below both
caches' lengths. When a cache is dropped, its rows that nobody else maps go back at once; the others go
with the last cache that maps them. Elsewhere than Linux caches are plain arrays, and shared rows are copied.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import weakref

import numpy as np

SHARING = hasattr(os, "memfd_create")  # Linux
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_MADV_REMOVE = 9  # free the range's pages and their backing store
_libc = ctypes.CDLL(None, use_errno=True) if SHARING else None
if _libc is not None:
    _libc.mremap.restype = ctypes.c_void_p
    _libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class LayerMemory:
    """num_layers float16 arrays of `shape` (rows first) in one shared mapping of a memory file of their own;
    their first rows may instead be mapped from another cache's (share)."""

    def __init__(self, num_layers: int, shape: tuple[int, ...]):
        self.row_bytes = math.prod(shape[1:]) * 2
        self.layer_bytes = -(-shape[0] * self.row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = os.memfd_create("kimi-kv-cache", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, num_layers * self.layer_bytes)
            mapping = _map_shared(fd, num_layers * self.layer_bytes)
        finally:
            os.close(fd)  # the mapping holds the file (Python's mmap would keep a descriptor a cache)
        # The arrays hold the mapping: it stays while anything (a step's graph) still reads them.
        self.arrays = [np.frombuffer(mapping, np.float16, math.prod(shape), layer * self.layer_bytes).reshape(shape)
                       for layer in range(num_layers)]
        self.runs = [0]  # the rows where each mapping of the arrays' pages begins (one, until it shares)
        # [the most rows other caches map from this one, the first row of its own pages]: the finalizer reads it
        self.extent = [0, 0]
        weakref.finalize(self, _give_back, mapping, self.arrays[0].ctypes.data, num_layers, self.layer_bytes,
                         self.row_bytes, self.extent)

    @property
    def rows_per_page_run(self) -> int:
        """Rows are shared in runs of this many: the fewest that fill whole pages."""
        return mmap.PAGESIZE // math.gcd(mmap.PAGESIZE, self.row_bytes)

    def share(self, source, rows: int) -> int:
        """Map source's first rows (as many of `rows` as fill whole pages) over this cache's own, when it is host
        memory of this kind too; returns how many. The source's rows must not change afterwards (rows below a
        cache's length never do)."""
        shared = rows // self.rows_per_page_run * self.rows_per_page_run
        if shared == 0 or not isinstance(source, LayerMemory) or source.row_bytes != self.row_bytes:
            return 0
        # mremap copies one mapping's pages at a time: the source's own, or those it maps from others.
        starts = [row for row in source.runs if row < shared]
        for start, end in zip(starts, starts[1:] + [shared]):
            for mine, theirs in zip(self.arrays, source.arrays):
                target = mine.ctypes.data + start * self.row_bytes
                got = _libc.mremap(theirs.ctypes.data + start * self.row_bytes, 0, (end - start) * self.row_bytes,
                                   _MREMAP_MAYMOVE | _MREMAP_FIXED, target)
                if got != target:
                    raise OSError(ctypes.get_errno(), "mremap of a shared KV cache range failed")
        self.runs = starts + [shared]
        self.extent[1] = shared
        source.extent[0] = max(source.extent[0], shared)
        return shared


class _Unmap:
    """Unmaps a range when the last array over it is gone."""

    def __init__(self, address: int, size: int):
        self.address, self.size = address, size

    def __del__(self):
        _libc.munmap(self.address, self.size)


def _map_shared(fd: int, size: int) -> ctypes.Array:
    """A shared read-write mapping of the file, as a buffer that unmaps itself when nothing uses it."""
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap of a KV cache's memory failed")
    buffer = (ctypes.c_char * size).from_address(address)
    buffer.unmap = _Unmap(address, size)
    return buffer


class PlainLayers:
    """Where memory files are not to be had: plain arrays, which share nothing (their rows are copied)."""

    def __init__(self, num_layers: int, shape: tuple[int, ...]):
        self.arrays = [np.zeros(shape, np.float16) for _ in range(num_layers)]

    def share(self, source, rows: int) -> int:
        return 0


def layer_memory(num_layers: int, shape: tuple[int, ...]) -> LayerMemory | PlainLayers:
    return LayerMemory(num_layers, shape) if SHARING else PlainLayers(num_layers, shape)


def _give_back(mapping: ctypes.Array, address: int, num_layers: int, layer_bytes: int, row_bytes: int,
               extent: list[int]) -> None:
    """A cache is dropped: free its own rows beyond those other caches map (its file lives on for those). Rows
    it maps from another cache are that cache's to free."""
    mapped, own = extent
    if mapped == 0:
        return  # nobody else maps it: file and pages go with the mapping
    start = -(-max(mapped, own) * row_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
    for layer in range(num_layers):
        if _libc.madvise(address + layer * layer_bytes + start, layer_bytes - start, _MADV_REMOVE):
            raise OSError(ctypes.get_errno(), "madvise(MADV_REMOVE) failed on a KV cache's memory")
