"""What the head knows and does when expert workers fail: which nodes are down and since when, who covers
their experts, and the head's last resort, computing a lost share itself from its own mapping of the GGUF.

Workers hold nothing but weights, so a lost worker's share of a layer can be computed anywhere that has
those experts: a replica on another worker, the head's own shard, or (HeadFallback) the file the head
already maps. RemoteExperts (transport.py) decides per share; FailoverState keeps the story for /health,
/metrics and the recovery loop that brings workers back, and tells the console as it happens.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from runtime.experts import ExpertShard
from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile

MEMORY_USE_FOR_COPIES = 0.8  # of the head's available memory, for interleaved copies of lost experts
EVENTS_KEPT = 200  # the dashboard's event list: failovers, rejoins and re-spreads, newest last


def available_memory_bytes() -> int:
    """What this machine can still give without swapping (MemAvailable)."""
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))


class HeadFallback:
    """Lost shares computed on the head, from the GGUF it maps anyway.

    Bit-equal answers need the kernels the worker used: where workers hold interleaved copies, so does the
    fallback (built per layer at first need, while the head's free memory allows), else it reads the
    experts in place, which the OS pages from disk when RAM is short."""

    def __init__(self, model_file: GGUFModelFile, runner: GgmlRunner, interleaved: bool, grouped: bool,
                 available_bytes: Callable[[], int] = available_memory_bytes):
        self.model_file, self.runner, self.interleaved, self.grouped = model_file, runner, interleaved, grouped
        self._available_bytes = available_bytes
        self._shards: dict[tuple[int, int], ExpertShard] = {}  # (share, layer) -> that share's experts
        self._lock = threading.Lock()

    def forward_pairs(self, share: int, layer: int, experts_of_share: np.ndarray, hidden: np.ndarray,
                      rows: np.ndarray, experts: np.ndarray, weights: np.ndarray) -> np.ndarray:
        with self._lock:
            shard = self._shards.get((share, layer))
            if shard is None:
                shard = self._shards[share, layer] = self._load(layer, experts_of_share)
        return shard.forward_pairs(layer, hidden, rows, experts, weights)

    def _load(self, layer: int, experts: np.ndarray) -> ExpertShard:
        owned = {layer: [int(e) for e in experts]}
        copy = self.interleaved and (self.model_file.routed_expert_bytes(owned)
                                     <= MEMORY_USE_FOR_COPIES * self._available_bytes())
        shard = ExpertShard.from_model_file(self.model_file, self.runner, owned, repack_experts=copy)
        shard.grouped = self.grouped
        return shard

    def drop(self, share: int) -> None:
        """The share's worker is back: free what was built for it."""
        with self._lock:
            for key in [key for key in self._shards if key[0] == share]:
                del self._shards[key]


@dataclass
class Outage:
    reason: str
    since: float = field(default_factory=time.monotonic)
    covered_by: set[str] = field(default_factory=set)  # who has computed its experts since


class FailoverState:
    """Nodes down now, and counts since start: failovers and rejoins per node, pairs the head's fallback
    computed, seconds with some node down. Written by the engine's thread, read by /health and /metrics;
    `announce` gets a line for each node that goes down or comes back (the console's, in `serve`)."""

    def __init__(self, announce: Callable[[str], None] = lambda line: None):
        self.announce = announce
        self.down: dict[str, Outage] = {}
        self.loading: set[str] = set()  # down nodes whose worker is back and loading its share
        self.loaded: dict[str, float] = {}  # of those, the share of its experts loaded so far (0..1)
        self.taking_over: dict[str, set[str]] = {}  # down node -> nodes loading its experts to compute them
        self.failovers: dict[str, int] = {}
        self.rejoins: dict[str, int] = {}
        self.fallback_pairs = 0
        self.replica_pairs = 0
        self._degraded_s = 0.0
        self._degraded_since = 0.0  # when the current run of outages began
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)  # {"time": unix s, "kind", "node", "text"}
        self._lock = threading.Lock()

    def _event(self, kind: str, node: str, text: str) -> None:
        """Keep it for the dashboard and tell the console."""
        self.events.append({"time": time.time(), "kind": kind, "node": node, "text": text})
        self.announce(text)

    def failed(self, node: str, reason: str) -> None:
        with self._lock:
            if node in self.down:
                return
            if not self.down:
                self._degraded_since = time.monotonic()
            self.down[node] = Outage(reason)
            self.failovers[node] = self.failovers.get(node, 0) + 1
        self._event("failover", node, f"{node} is down ({reason}); its experts are computed elsewhere until it is back")

    def covered(self, node: str, by: str, pairs: int, fallback: bool) -> None:
        with self._lock:
            if node in self.down:
                self.down[node].covered_by.add(by)
            if fallback:
                self.fallback_pairs += pairs
            else:
                self.replica_pairs += pairs

    def rejoined(self, node: str) -> None:
        with self._lock:
            outage = self.down.pop(node, None)
            self.loading.discard(node)
            self.loaded.pop(node, None)
            self.taking_over.pop(node, None)
            if outage is None:
                return
            self.rejoins[node] = self.rejoins.get(node, 0) + 1
            if not self.down:
                self._degraded_s += time.monotonic() - self._degraded_since
        self._event("rejoin", node, f"{node} is back after {time.monotonic() - outage.since:.1f} s and computes its "
                    "experts again")

    def reloading(self, node: str, loaded_bytes: int, shard_bytes: int) -> None:
        """The down node's worker is back and loading its share: this much of it so far."""
        with self._lock:
            self.loading.add(node)
            self.loaded[node] = loaded_bytes / shard_bytes if shard_bytes else 0.0

    def respread(self, node: str, targets: list[str], after_s: float) -> None:
        """Still down after `after_s`: `targets` load its experts to compute them."""
        with self._lock:
            self.taking_over.setdefault(node, set()).update(targets)
        self._event("respread", node, f"{node} is still down after {after_s:g} s: {', '.join(targets)} load its "
                    "experts to compute them")

    def degraded_seconds(self) -> float:
        """Seconds during which at least one node was down (overlapping outages counted once)."""
        with self._lock:
            return self._degraded_s + (time.monotonic() - self._degraded_since if self.down else 0.0)

    def report(self) -> dict[str, dict]:
        """Per down node: why, for how long, who covers its experts, whether its worker is loading again,
        and which nodes are loading its experts to take them over."""
        with self._lock:
            now = time.monotonic()
            return {node: {"reason": o.reason, "down_s": round(now - o.since, 1), "covered_by": sorted(o.covered_by),
                           "loading": node in self.loading, "loaded": round(self.loaded.get(node, 0.0), 3),
                           "taken_over_by": sorted(self.taking_over.get(node, ()))}
                    for node, o in self.down.items()}
