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


def memory_file_of(array: np.ndarray) -> int:
    """A descriptor of the memory file whose pages the array's first row is (through /proc/self/map_files)."""
    address = array.ctypes.data
    with open("/proc/self/maps") as maps:
        for line in maps:
            span = line.split()[0]
            low, high = (int(end, 16) for end in span.split("-"))
            if low <= address < high:
                return os.open(f"/proc/self/map_files/{span}", os.O_RDONLY)
    raise LookupError("the array is not mapped")


def allocated_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_a_cache_that_begins_as_another_reads_the_same_pages():
    source, reader = filled(1), LayerMemory(LAYERS, (ROWS, 1, WIDTH))
    shared = reader.share(source, 100)
    assert shared == 96 == 3 * reader.rows_per_page_run  # whole pages only: 32 rows of 1152 bytes are 9 pages
    for a, b in zip(source.arrays, reader.arrays):
        assert np.array_equal(a[:shared], b[:shared])
    assert os.path.samestat(os.fstat(memory_file_of(reader.arrays[0])), os.fstat(memory_file_of(source.arrays[0])))
    source.arrays[1][5] = 7.0  # (a cache never rewrites such a row: this shows the memory is one)
    assert (reader.arrays[1][5] == 7.0).all()
    reader.arrays[2][300] = 3.0  # its own rows stay its own
    assert not (source.arrays[2][300] == 3.0).any()


def test_a_chain_of_caches_maps_the_first_one_s_pages():
    first, second, third = filled(2), LayerMemory(LAYERS, (ROWS, 1, WIDTH)), LayerMemory(LAYERS, (ROWS, 1, WIDTH))
    second.share(first, 128)
    second.arrays[0][128:192] = 1.0  # rows of its own after the shared ones
    assert third.share(second, 192) == 192
    first.arrays[0][3] = 5.0
    assert (third.arrays[0][3] == 5.0).all(), "the first cache's own page"
    assert (third.arrays[0][128:192] == 1.0).all()


def test_a_dropped_cache_gives_back_the_rows_nobody_else_maps():
    source, reader = filled(3), LayerMemory(LAYERS, (ROWS, 1, WIDTH))
    reader.share(source, ROWS // 4)
    file = memory_file_of(reader.arrays[0])  # the source's file, which the reader maps in part
    try:
        whole = allocated_bytes(file)
        assert whole == LAYERS * ROWS * WIDTH * 2
        del source
        gc.collect()
        assert allocated_bytes(file) == whole // 4, "the rows the reader does not map went back"
        assert np.array_equal(reader.arrays[2][:ROWS // 4], filled(3).arrays[2][:ROWS // 4]), "its rows stay whole"
    finally:
        os.close(file)


def test_a_dropped_cache_leaves_the_rows_it_maps_from_another_to_that_one():
    first, second, third = filled(5), LayerMemory(LAYERS, (ROWS, 1, WIDTH)), LayerMemory(LAYERS, (ROWS, 1, WIDTH))
    second.share(first, 96)
    third.share(second, 64)  # fewer rows than second maps from first
    del second
    gc.collect()
    assert np.array_equal(first.arrays[1][:96], filled(5).arrays[1][:96]), "first's rows 64-95 are whole"


def test_caches_hold_no_descriptor():
    """A server keeps thousands of ended requests' caches: a descriptor each would run out (ulimit -n)."""
    before = len(os.listdir("/proc/self/fd"))
    kept = [filled(4)]
    for round_ in range(50):
        kept.append(LayerMemory(LAYERS, (ROWS, 1, WIDTH)))
        kept[-1].share(kept[0], 32 * (round_ % 8))
    assert len(os.listdir("/proc/self/fd")) == before


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
