"""Prompt reuse: the KV of sequences that ended, kept by the tokens it holds, so that a request whose prompt
starts the same way (a coding agent's next turn resends the whole conversation) computes only the rest.

A new sequence starts from the longest common prefix of its prompt with a kept cache, a running sequence's
cache (its rows before its current length never change) or, with a store (prompt_store.py), a file on disk.
When its prompt goes on from all a kept cache holds (a conversation's next turn) and the cache has room, it
takes that cache; otherwise a cache of its own begins with the matching rows, the source's very pages as far
as whole pages go (kv_memory.py: both read the same memory, nothing is copied) and a copy of the few rows
after them, and the source stays whole for others. The match goes token by token and stops where the
tokens differ (a chat template that re-renders earlier turns otherwise), and one short of the prompt: the
prompt's last token is always computed, its logits give the first token. Caches are kept within a byte
budget, least recently used out; one whose tokens begin another kept cache's is dropped, the longer one
holds it all. The budget may be the head's whole KV memory, shared with the running sequences: what they
may grow to is then left to them.

A row's keys and values do not depend on how its prompt was split into steps (each row's math is its own, and
caches are whole blocks: model.new_cache), so a reply that reuses them is the reply a cold run gives: bit for
bit with `--deterministic`'s kernels, within the rounding of a repacked head otherwise.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .kv_cache import KVCache
from .prompt_store import PromptStore, common_prefix


@dataclass
class KeptCache:
    tokens: np.ndarray  # int32: the tokens whose KV the cache's first len(tokens) rows hold
    cache: KVCache


@dataclass(frozen=True)
class PromptCacheStats:
    kept: int  # caches kept
    kept_tokens: int
    kept_bytes: int
    evictions: int  # caches dropped for room
    loaded: int  # prompts read from the store on disk
    stored_bytes: int  # the store's files
    rows_shared: int  # reused rows a new cache reads from the source's own memory (no copy)
    rows_copied: int  # reused rows copied (past the last whole page shared, or taken from disk)


class PromptCache:
    """Kept KV caches within `budget_bytes`, at `bytes_per_token` each row (every layer)."""

    def __init__(self, budget_bytes: int, bytes_per_token: int, store: PromptStore | None = None,
                 shares_with_running: bool = False):
        """store: where kept caches are also written, and looked for when memory has less (--prompt-cache-dir).
        shares_with_running: the budget holds the running sequences' caches too (make_room says how much)."""
        self.budget_bytes, self.bytes_per_token, self.store = budget_bytes, bytes_per_token, store
        self.shares_with_running = shares_with_running
        self._running_bytes = 0  # what the running sequences may hold, when they share the budget
        self._kept: OrderedDict[int, KeptCache] = OrderedDict()  # by cache serial, least recently used first
        self._evictions = self._loaded = self._rows_shared = self._rows_copied = 0

    def start(self, prompt: Sequence[int], capacity: int, new_cache: Callable[[int], KVCache],
              running: Iterable[tuple[Sequence[int], KVCache]] = ()) -> tuple[KVCache, int]:
        """A cache of `capacity` rows for a sequence with this prompt, its first rows filled from the longest
        match among the kept caches, the `running` sequences' (tokens, cache) and the store; returns (cache,
        rows reused)."""
        wanted = np.asarray(prompt[:-1], np.int32)
        best, reused, whole = self._longest_in_memory(wanted, running)
        if self.store is not None:
            stored, matched = self.store.longest(wanted)
            if matched > reused:
                cache = new_cache(capacity)
                if self.store.load(stored, cache, matched):
                    self._loaded += 1
                    self._rows_copied += matched
                    cache.length = matched
                    return cache, matched
        if best is None:
            return new_cache(capacity), 0
        if best.serial in self._kept:
            self._kept.move_to_end(best.serial)
            if whole and best.capacity >= capacity:  # the prompt goes on from all it holds: take it, no copy
                del self._kept[best.serial]
                best.length = reused
                return best, reused
        cache = new_cache(capacity)
        shared = cache.begin_as(best, reused)
        self._rows_shared += shared
        self._rows_copied += reused - shared
        return cache, reused

    def keep(self, tokens: Sequence[int], cache: KVCache) -> None:
        """Keep an ended sequence's cache; `tokens`: what its first cache.length rows hold (and maybe more)."""
        held = np.asarray(tokens[:cache.length], np.int32)
        if len(held) == 0 or len(held) * self.bytes_per_token > self.budget_bytes:
            return
        for serial, kept in list(self._kept.items()):
            common = common_prefix(kept.tokens, held)
            if common == len(kept.tokens):  # it holds a beginning of this one
                del self._kept[serial]
            elif common == len(held):  # this one is a beginning of a kept one
                return
        self._kept[cache.serial] = KeptCache(held, cache)
        if self.store is not None:
            self.store.save(held, cache)
        self._evict()

    def make_room(self, running_tokens: int) -> None:
        """The running sequences may now hold this many rows (their caches' capacities): when they share the
        budget, kept caches go, least recently used first, until both fit."""
        if self.shares_with_running:
            self._running_bytes = running_tokens * self.bytes_per_token
            self._evict()

    def _evict(self) -> None:
        held = self._kept_tokens() * self.bytes_per_token
        while self._kept and held > self.budget_bytes - self._running_bytes:
            _, dropped = self._kept.popitem(last=False)
            held -= len(dropped.tokens) * self.bytes_per_token
            self._evictions += 1

    def stats(self) -> PromptCacheStats:
        tokens = self._kept_tokens()
        return PromptCacheStats(len(self._kept), tokens, tokens * self.bytes_per_token, self._evictions,
                                self._loaded, self.store.total_bytes() if self.store is not None else 0,
                                self._rows_shared, self._rows_copied)

    def _kept_tokens(self) -> int:
        return sum(len(k.tokens) for k in self._kept.values())

    def _longest_in_memory(self, wanted: np.ndarray, running: Iterable[tuple[Sequence[int], KVCache]]
                           ) -> tuple[KVCache | None, int, bool]:
        """(cache, rows matched, whether the match is all it holds); a kept cache wins a tie (it may be taken)."""
        best, reused, whole = None, 0, False
        sources = [(kept.tokens, kept.cache) for kept in self._kept.values()]
        sources += [(np.asarray(tokens[:cache.length], np.int32), cache) for tokens, cache in running]
        for tokens, cache in sources:
            matched = common_prefix(tokens, wanted)
            if matched > reused:
                best, reused, whole = cache, matched, matched == len(tokens)
        return best, reused, whole

