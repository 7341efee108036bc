"""How much of this process's cores other processes took while the probe measured: a figure measured while
something else computes is slow by however much that was, so the probe says so instead of keeping it."""
from __future__ import annotations

import os
import time

BUSY_SHARE = 0.1  # of the cores this process may use, on average: more than idle machines' daemons take


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
    """CPU seconds of this process's threads and of its children that have ended (Ray's, once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """Started when made; `cores()` says how many of this process's cores others used, on average, since."""

    def __init__(self):
        self.cpus = os.sched_getaffinity(0)
        self._started = time.perf_counter(), _busy_seconds(self.cpus), _own_seconds()

    def cores(self) -> float:
        wall, busy, own = self._started
        elapsed = time.perf_counter() - wall
        others = (_busy_seconds(self.cpus) - busy) - (_own_seconds() - own)
        return max(0.0, others / elapsed) if elapsed > 0 else 0.0

    @property
    def is_busy(self) -> bool:
        return self.cores() > BUSY_SHARE * len(self.cpus)
