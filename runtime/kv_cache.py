"""The KV cache of one sequence, and the segments that tie a step's rows to their caches.

Absorbed MLA: the cache holds, per token, the normalised latent c (kv_lora_rank) and the shared rope key
k_pe (rope_dim) in float16, as llama.cpp's default F16 cache does; the attention itself is built in
ggml_forward.py. Legacy files (attn_kv_b) cache expanded per-head keys and values instead. A cache's memory
can be shared with caches that begin as it does (kv_memory.py).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .config import ModelConfig
from .kv_memory import LayerMemory, PlainLayers, layer_memory

_cache_serials = itertools.count()


def bytes_per_token(config: ModelConfig) -> int:
    """A cache's bytes per position, every layer: float16 latent and rope key (absorbed MLA), or per-head keys
    and values (legacy files)."""
    values = config.kv_cache_width if config.is_mla else config.num_heads * (config.head_dim_qk + config.head_dim_v)
    return 2 * values * config.num_layers


@dataclass
class KVCache:
    """One sequence's float16 cache, as llama.cpp's default F16 cache holds it; `length` positions filled.

    Absorbed MLA: keys[layer] is [capacity, 1, L + R] (latent | rope key), whose first L columns are the values
    (`values` is empty). Legacy attn_kv_b files: keys[layer] is [capacity, H, N + R] and values[layer] is
    [capacity, H, V]. They are numpy arrays in host memory, or a compute device's (ggml_backends.DeviceRows).
    """
    config: ModelConfig
    capacity: int
    keys: list[np.ndarray] = field(init=False)
    values: list[np.ndarray] = field(init=False)
    _memory: list[LayerMemory | PlainLayers] = field(init=False, repr=False)
    length: int = 0
    # Where its layers' memory comes from: host memory that other caches can share, or a device's.
    memory_for: Callable[[int, tuple[int, ...]], LayerMemory | PlainLayers] = field(default=layer_memory, repr=False)
    # Graphs are planned for particular caches (they point into their arrays): a serial names each cache.
    serial: int = field(init=False, default_factory=lambda: next(_cache_serials))

    def __post_init__(self):
        c, n = self.config, self.capacity
        if c.is_mla:
            self._memory = [self.memory_for(c.num_layers, (n, 1, c.kv_cache_width))]
            self.keys, self.values = self._memory[0].arrays, []
        else:
            self._memory = [self.memory_for(c.num_layers, (n, c.num_heads, c.head_dim_qk)),
                            self.memory_for(c.num_layers, (n, c.num_heads, c.head_dim_v))]
            self.keys, self.values = self._memory[0].arrays, self._memory[1].arrays

    def begin_as(self, source: KVCache, rows: int) -> int:
        """Start with source's first `rows` rows (their tokens' KV): the source's pages themselves as far as
        whole pages go, copies of the rows after them. Returns the rows shared without a copy."""
        shared = rows
        for mine, theirs in zip(self._memory, source._memory):
            done = mine.share(theirs, rows)
            for a, b in zip(theirs.arrays, mine.arrays):
                b[done:rows] = a[done:rows]
            shared = min(shared, done)
        self.length = rows
        return shared


@dataclass(frozen=True)
class Segment:
    """The rows [start, start + count) of a step's flat batch that belong to one sequence's cache; the step
    returns the logits of its last `logits` rows (a prompt chunk needs its last; drafted tokens need all)."""
    cache: KVCache
    start: int
    count: int
    logits: int = 1
