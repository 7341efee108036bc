"""The processes a test run has started, found through /proc (for leftover checks and clean-ups)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def live_descendants() -> dict[int, str]:
    """pid -> command line of every live process below this one (zombies are reaped, not counted)."""
    parents, names, zombies = {}, {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            names[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        parents[int(entry.name)] = int(ppid)
        if state == "Z":
            zombies.add(int(entry.name))
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    for pid in found & zombies:
        if parents[pid] == os.getpid():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    return {pid: names[pid][:200] for pid in sorted(found - zombies)}
