"""The Ray that kimi-cluster starts for itself: started again when Ray gives up on it, with what the failed
start left running stopped; its expert workers reachable from this machine only."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import psutil
import ray

from cluster.config import ClusterConfig
from cluster.head import ExpertCluster
from cluster.transport import WorkerClient

RAY_TIMEOUT = "The current node timed out during startup. This could happen because some of the raylet failed"


def test_a_start_that_times_out_is_tried_again_and_its_leftovers_stopped(make_tiny, monkeypatch):
    """Ray's raylet now and then misses its 30 s to register on a loaded 2-core machine (seen in CI). The first
    start here stands in for such a one: it leaves a process under its session folder and raises Ray's error."""
    real_init, leftovers = ray.init, []

    def times_out_once(**options):
        if not leftovers:
            leftovers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                                               options["_temp_dir"]]))
            raise Exception(RAY_TIMEOUT)
        return real_init(**options)
    monkeypatch.setattr(ray, "init", times_out_once)
    path = make_tiny("Q4_K_M")
    with ExpertCluster(path, ClusterConfig.from_dict({"model": str(path)}), local_workers=1, progress=False) as cluster:
        assert [node.name for node in cluster.nodes()] == ["head", "worker-1"] and ray.is_initialized()
        assert leftovers[0].wait(timeout=10) == -9, "the failed start's process was stopped"
    assert not ray.is_initialized()


def test_local_workers_listen_on_loopback_only(make_tiny):
    """--workers and demo run every worker beside the head: their gRPC ports are bound to 127.0.0.1, not to the
    machine's LAN address, and the head reaches them there."""
    path = make_tiny("Q4_K_M")
    with ExpertCluster(path, ClusterConfig.from_dict({"model": str(path)}), local_workers=2, progress=False) as cluster:
        cluster.start()
        for actor in cluster.actors.values():
            address = ray.get(actor.address.remote())
            host, port = address.rsplit(":", 1)
            pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
            bound = {ipv4(c.laddr.ip) for c in psutil.Process(pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)}
            assert host == "127.0.0.1" and bound == {"127.0.0.1"}, (address, bound)
            assert WorkerClient("head", address, cluster.token, 10.0).health().ready


def ipv4(ip: str) -> str:
    """gRPC listens on an IPv6 socket: 127.0.0.1 shows as ::ffff:127.0.0.1."""
    address = ipaddress.ip_address(ip)
    return str(getattr(address, "ipv4_mapped", None) or address)
