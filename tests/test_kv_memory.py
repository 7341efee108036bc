"""KV caches that share rows without a copy (runtime/kv_memory.py): a cache that begins as another maps the
other's pages, so both read the same memory; the rows nobody else maps go back when a cache is dropped, and
nothing (memory files, descriptors) outlives the caches."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest

from runtime.gguf_file import GGUFModelFile
from runtime.kv_cache import KVCache
from runtime.kv_memory import SHARING, LayerMemory
from runtime.model import checked_config

pytestmark = pytest.mark.skipif(not SHARING, reason="memory files are Linux's")
LAYERS, ROWS, WIDTH = 3, 512, 576  # K2.6's cache row: 512 latent + 64 rope, float16


def filled(seed: int) -> LayerMemory:
    memory = LayerMemory(LAYERS, (ROWS, 1, WIDTH))
    for layer, array in enumerate(memory.arrays):
        array[...] = np.random.default_rng(seed + layer).standard_normal(array.shape)
    return memory


def allocated_bytes(memory: LayerMemory) -> int:
    return os.fstat(memory.file.fd).st_blocks * 512


def test_a_cache_that_begins_as_another_reads_the_same_pages():
    source, reader = filled(1), LayerMemory(LAYERS, (ROWS, 1, WIDTH))
    shared = reader.share(source, 100)
    assert shared == 96 == 3 * reader.rows_per_page_run  # whole pages only: 32 rows of 1152 bytes are 9 pages
    for a, b in zip(source.arrays, reader.arrays):
        assert np.array_equal(a[:shared], b[:shared])
    source.arrays[1][5] = 7.0  # (a cache never rewrites such a row: this shows the memory is one)
    assert (reader.arrays[1][5] == 7.0).all()
    reader.arrays[2][300] = 3.0  # its own rows stay its own
    assert not (source.arrays[2][300] == 3.0).any()
    assert allocated_bytes(reader) == 4096, "one page of its own (the row it wrote); the shared ones cost nothing"


def test_a_chain_of_caches_maps_the_first_one_s_pages():
    first, second, third = filled(2), LayerMemory(LAYERS, (ROWS, 1, WIDTH)), LayerMemory(LAYERS, (ROWS, 1, WIDTH))
    second.share(first, 128)
    second.arrays[0][128:192] = 1.0  # rows of its own after the shared ones
    assert third.share(second, 192) == 192
    assert np.array_equal(third.arrays[0][:128], first.arrays[0][:128])
    assert (third.arrays[0][128:192] == 1.0).all()
    assert [file for _, file in third.sources][:2] == [first.file, second.file]


def test_a_dropped_cache_gives_back_the_rows_nobody_else_maps():
    source, reader = filled(3), LayerMemory(LAYERS, (ROWS, 1, WIDTH))
    reader.share(source, 256)
    file, whole = source.file, allocated_bytes(source)
    del source
    gc.collect()
    assert os.fstat(file.fd).st_blocks * 512 == whole // 2, "rows 256-511 of every layer went back"
    assert np.array_equal(reader.arrays[0][:256], filled(3).arrays[0][:256]), "the shared rows stay whole"


def test_caches_leave_no_memory_file_behind():
    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = descriptors()
    kept = filled(4)
    for round_ in range(200):
        reader = LayerMemory(LAYERS, (ROWS, 1, WIDTH))
        reader.share(kept, 64 * (round_ % 8))
        del reader
    del kept
    gc.collect()
    assert descriptors() == before


def test_kv_caches_begin_as_another_sharing_whole_pages_and_copying_the_rest(make_tiny):
    config = checked_config(GGUFModelFile(make_tiny("Q4_K_M")))
    source = KVCache(config, 256)
    for keys in source.keys:
        keys[...] = np.random.default_rng(5).standard_normal(keys.shape)
    cache = KVCache(config, 256)
    shared = cache.begin_as(source, 100)
    assert 0 < shared < 100 and cache.length == 100
    for a, b in zip(source.keys, cache.keys):
        assert np.array_equal(a[:100], b[:100]) and not b[100:].any()
