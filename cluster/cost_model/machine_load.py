"""How much of this process's cores other processes took while the probe measured: a figure measured while
something else computes is slow by however much that was, so the probe says so instead of keeping it."""
from __future__ import annotations

import os
import threading
import time

import psutil

BUSY_SHARE = 0.1  # of the cores this process may use, on average: more than idle machines' daemons take
NOTE_EVERY_S = 0.25  # how often the CPU time of this process's descendants is read while they may end


def _busy_seconds(cpus: set[int]) -> float:
    """CPU seconds every process has spent on `cpus` since boot (/proc/stat; steal counts: the hypervisor gave
    that time to other machines)."""
    total = 0
    with open("/proc/stat") as stat:
        for line in stat:
            name, *ticks = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, ticks[:8])
                total += user + nice + system + irq + softirq + steal
    return total / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process's threads (its children's are read while they live: see OtherLoad)."""
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """Started when made; `cores()` says how many of this process's cores others used, on average, since.

    The probe's own work includes the processes it starts (Ray's, and the workers they start), which it may
    never reap: their CPU time is read while they live, every NOTE_EVERY_S by a thread of its own, until `cores()`
    is asked."""

    def __init__(self):
        self.cpus = os.sched_getaffinity(0)
        self._descendants: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds when last seen
        self._cores: float | None = None
        self._note()
        self._started = time.perf_counter(), _busy_seconds(self.cpus), self._own_seconds()
        self._stopped = threading.Event()
        self._noting = threading.Thread(target=self._note_until_stopped, daemon=True)
        self._noting.start()

    def _note_until_stopped(self) -> None:
        while not self._stopped.wait(NOTE_EVERY_S):
            self._note()

    def _note(self) -> None:
        """Read the CPU time of this process's descendants now (those ending later keep what was read)."""
        for child in psutil.Process().children(recursive=True):
            try:
                with child.oneshot():
                    t = child.cpu_times()
                    self._descendants[child.pid, child.create_time()] = t.user + t.system
            except psutil.Error:  # it ended meanwhile
                pass

    def _own_seconds(self) -> float:
        return _own_seconds() + sum(self._descendants.values())

    def cores(self) -> float:
        """Taken once, when first asked. The kernel counts CPU time in ticks: a tick or two per core either way
        is the count's own error, which in a phase of a fraction of a second would read as cores taken."""
        if self._cores is None:
            self._stopped.set()
            self._noting.join()
            self._note()
            wall, busy, own = self._started
            elapsed = time.perf_counter() - wall
            others = (_busy_seconds(self.cpus) - busy) - (self._own_seconds() - own)
            others -= 2 * len(self.cpus) / os.sysconf("SC_CLK_TCK")
            self._cores = max(0.0, others / elapsed) if elapsed > 0 else 0.0
        return self._cores

    @property
    def is_busy(self) -> bool:
        return self.cores() > BUSY_SHARE * len(self.cpus)
