"""Bringing lost expert workers back while the cluster serves.

A worker that failed is covered by others (transport.RemoteExperts); this loop watches each down worker
until it can serve its planned share again, then hands it back between layers. It comes back because
Ray restarts its actor (the process died), because it answers again (it was stopped or cut off), or
because its node's Ray returns (a new actor is started there). A restarted worker loads its share from
its own copy of the file, or the head streams it again; generation goes on meanwhile.

A worker still down after respread_after_s has its experts re-spread: survivors with memory left load
them in the background and take them over, so the head stops computing them from its file.
"""
from __future__ import annotations

import threading
import time

import ray

from cluster.placement import respread
from cluster.transport import RemoteExperts, WorkerClient, WorkerFailed

CHECK_INTERVAL_S = 0.5


class WorkerRecovery:
    def __init__(self, cluster, remote: RemoteExperts):
        """cluster: the ExpertCluster (its actors, how to reach, respawn and stream to a worker)."""
        self.cluster, self.remote = cluster, remote
        self._probes: dict[str, ray.ObjectRef] = {}  # node -> pending progress() of its actor
        self._streaming: dict[str, threading.Thread] = {}
        self._respread: set[str] = set()  # down nodes whose experts survivors are taking over (or took)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="worker-recovery")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                self._mark_lost_nodes()
            except Exception as e:  # noqa: BLE001 - Ray's view is a hint; requests still find dead workers
                self.cluster.recovery_error = f"{type(e).__name__}: {e}"
            for index in sorted(self.remote.down):
                if self.remote.rejoining(index):
                    continue
                try:
                    self._respread_if_due(index)
                    self._check(index)
                except Exception as e:  # noqa: BLE001 - one bad check must not end recovery for everyone
                    node = self.remote.workers[index].node
                    self.remote.state.loading.discard(node)
                    self.remote.state.loaded.pop(node, None)
                    self._probes.pop(self.remote.workers[index].node, None)
                    self.cluster.recovery_error = f"{type(e).__name__}: {e}"

    def _mark_lost_nodes(self) -> None:
        """Workers on nodes Ray reports dead are down now, before a request waits out its deadline on them."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for index, client in enumerate(self.remote.workers):
            if index not in self.remote.down and self.cluster.workers[client.node].ray_node_id not in alive:
                self.remote.mark_down(index, WorkerFailed(client.node, "Ray reports its node dead"))

    def _check(self, index: int) -> None:
        node = self.remote.workers[index].node
        actor = self.cluster.actors[node]
        probe = self._probes.get(node)
        if probe is None:
            self._probes[node] = actor.progress.remote()
            return
        if not ray.wait([probe], timeout=0)[0]:
            # Restarting, stopped, or far away: ask again when it answers. But an actor whose node is gone
            # never restarts: start it again where that node now is, if anywhere.
            if self.cluster.respawn(node):
                del self._probes[node]
            return
        del self._probes[node]
        try:
            progress = ray.get(probe)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError):
            self.cluster.respawn(node)  # died while answering: Ray restarts it, unless its node is gone
            return
        if progress["error"]:
            return
        if not progress["ready"]:
            self.remote.state.reloading(node, progress["loaded_bytes"], progress["shard_bytes"])
            self._stream_if_needed(node)
            return
        client = self.cluster.connect(node)
        if client.state() != "ok":
            client.close()
            return
        self.remote.rejoin(index, client)
        self.cluster.forget_copies_of(node)
        self._respread.discard(node)  # should it fail again, what covers it then is worked out anew

    def _respread_if_due(self, index: int) -> None:
        node = self.remote.workers[index].node
        outage = self.remote.state.down.get(node)
        if (outage is None or node in self._respread
                or time.monotonic() - outage.since < self.cluster.config.respread_after_s):
            return
        self._respread.add(node)
        up = [w.node for i, w in enumerate(self.remote.workers) if i not in self.remote.down]
        copies, _ = respread(self.cluster.placement, self.cluster.inventory(), node, up)
        if copies:
            self.remote.state.respread(node, sorted(copies), self.cluster.config.respread_after_s)
        for target, per_layer in copies.items():
            threading.Thread(target=self._take_over, args=(node, target, per_layer), daemon=True,
                             name=f"take-over-{target}").start()

    def _take_over(self, lost: str, target: str, per_layer: dict[int, tuple[int, ...]]) -> None:
        try:
            self.cluster.take_over(target, per_layer)
        except Exception as e:  # noqa: BLE001 - the target failed too: try again while the node is down
            self.cluster.recovery_error = f"{target} could not take over experts of {lost}: {type(e).__name__}: {e}"
            self._respread.discard(lost)
        finally:
            self.remote.state.taking_over.get(lost, set()).discard(target)

    def _stream_if_needed(self, node: str) -> None:
        """A restarted worker without its own copy of the file waits for its experts from the head."""
        running = self._streaming.get(node)
        if not self.cluster.streams_to(node) or (running is not None and running.is_alive()):
            return
        client = self.cluster.connect(node)
        self._streaming[node] = threading.Thread(target=self._stream, args=(client,), daemon=True)
        self._streaming[node].start()

    def _stream(self, client: WorkerClient) -> None:
        try:
            self.cluster.stream_shard(client)
        except Exception as e:  # noqa: BLE001 - said in /health's recovery_error; tried again next time
            self.cluster.recovery_error = f"streaming {client.node} its experts failed: {type(e).__name__}: {e}"
        finally:
            client.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
