"""Starting a real multi-node Ray cluster on this machine (ray.cluster_utils) for the slow tests."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Callable, TypeVar

import ray
from ray.cluster_utils import Cluster

from tests.processes import live_descendants

ATTEMPTS = 3
T = TypeVar("T")


def start_cluster(**head_node_args) -> Cluster:
    """A Cluster whose head node is up. Now and then a head's raylet fails to register within Ray's 30 s
    on a loaded 2-core machine (seen right after another test module's cluster shut down, the raylet
    having written no log at all); the next attempt starts cleanly, so try again before giving up. The
    failed head's other processes (GCS, dashboard, monitors) are not the Cluster's to stop: kill them."""
    for attempt in range(1, ATTEMPTS + 1):
        before = set(live_descendants())
        cluster = Cluster()
        try:
            cluster.add_node(**head_node_args)  # the first node added is the head
            return cluster
        except Exception:
            cluster.shutdown()
            for pid in set(live_descendants()) - before:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if attempt == ATTEMPTS:
                raise
            time.sleep(5)


def add_node(cluster: Cluster, **node_args) -> None:
    """cluster.add_node, tried again when the node's raylet fails to register in time (as start_cluster's
    head does, seen in CI for a second node too), after killing what the failed start left behind. If it
    still fails, the whole cluster is stopped before the error goes on."""
    for attempt in range(1, ATTEMPTS + 1):
        before = set(live_descendants())
        try:
            cluster.add_node(**node_args)
            return
        except Exception:
            for pid in set(live_descendants()) - before:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if attempt == ATTEMPTS:
                cluster.shutdown()
                raise
            time.sleep(5)


def startup_timed_out(error: Exception) -> bool:
    """Whether Ray gave up waiting for its raylet to register or for its GCS to write its port."""
    message = str(error)
    return "timed out during startup" in message or "Timed out waiting for file" in message


def retry_ray_start(call: Callable[[], T]) -> T:
    """call(), which starts a Ray of its own, once more if that Ray's node failed to start in time (the
    same hiccup as above), after stopping what the failed start left behind."""
    for attempt in range(1, ATTEMPTS + 1):
        before = set(live_descendants())
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for it
            if not startup_timed_out(e) or attempt == ATTEMPTS:
                raise
            ray.shutdown()
            for pid in set(live_descendants()) - before:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(5)
    raise AssertionError("unreachable")
