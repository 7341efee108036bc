"""A cluster config's `nodes:` list on a real multi-node Ray cluster whose nodes have addresses of their own
(127.0.0.1, .2 and .3: every 127.x address is this machine's loopback): nodes matched by address,
budgets per node, a node without the model file, workers listening on their node's address."""
from __future__ import annotations

import socket
import time

import pytest
import ray

from cluster.config import ClusterConfig
from cluster.head import ExpertCluster
from runtime.engine import Engine
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel
from tests.ray_clusters import add_node, start_cluster

pytestmark = pytest.mark.slow
ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
PROMPT = [2638, 1923, 2652, 51, 68, 315, 829, 997]


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = start_cluster(num_cpus=1, node_ip_address=ADDRESSES[0])
    for address in ADDRESSES[1:]:
        add_node(cluster, num_cpus=1, node_ip_address=address)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False, _node_ip_address=ADDRESSES[0])
    cluster.wait_for_nodes(timeout=120)  # generous: CI machines can be slow to start raylets
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nodes_config(path, nodes: list[dict], **more) -> ClusterConfig:
    return ClusterConfig.from_dict({"model": str(path), "nodes": nodes, "reserve_gb": 0, "deadline_s": 5,
                                    "port": free_port(), **more}, "nodes.yaml")


def test_nodes_are_matched_by_address_with_their_own_budgets_and_paths(ray_cluster, make_tiny):
    path = make_tiny("Q4_K_M")
    expected = list(Engine(KimiModel(GGUFModelFile(path)), context_size=64).generate(PROMPT, 12))
    nodes = [{"name": "big", "address": "127.0.0.1", "memory_gb": 1, "head": True},
             {"name": "medium", "address": "127.0.0.2", "memory_gb": 2},
             {"name": "small", "address": "127.0.0.3", "memory_gb": 1}]
    config = nodes_config(path, nodes, model_paths={"small": None})
    with ExpertCluster(path, config, progress=False) as cluster:
        model = cluster.start()
        assert list(Engine(model, context_size=64).generate(PROMPT, 12)) == expected
        counts = {node: sum(len(e) for e in layers.values()) for node, layers in cluster.placement.experts.items()}
        assert counts["medium"] > counts["small"]  # twice the memory, a bigger share
        addresses = {name: ray.get(actor.address.remote()) for name, actor in cluster.actors.items()}
        assert addresses == {"medium": f"127.0.0.2:{config.port}", "small": f"127.0.0.3:{config.port}"}
        # "small" has no model path: its experts came from the head over gRPC.
        assert ray.get(cluster.actors["small"].progress.remote())["loaded_bytes"] > 0


def test_idle_workers_on_their_own_machines_do_not_spin(ray_cluster, make_tiny, monkeypatch):
    """Workers on other machines get the head's spinning OpenMP threads (fast between ops), but only briefly:
    an idle worker must not keep a core busy."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")  # as `kimi-cluster serve` runs
    path = make_tiny("Q4_K_M")
    nodes = [{"name": "head", "address": "127.0.0.1", "memory_gb": 1, "head": True},
             {"name": "worker", "address": "127.0.0.2", "memory_gb": 1}]
    with ExpertCluster(path, nodes_config(path, nodes, threads=2), progress=False) as cluster:
        model = cluster.start()
        list(Engine(model, context_size=64).generate(PROMPT, 8))
        worker = cluster.actors["worker"]
        cpu_seconds = lambda: ray.get(worker.__ray_call__.remote(lambda self: time.process_time()))  # noqa: E731
        before = cpu_seconds()
        time.sleep(2)
        assert cpu_seconds() - before < 0.5


def test_a_config_whose_head_is_another_machine_is_refused(ray_cluster, make_tiny):
    path = make_tiny("Q4_K_M")
    nodes = [{"name": "a", "address": "127.0.0.2", "memory_gb": 1, "head": True},
             {"name": "b", "address": "127.0.0.1", "memory_gb": 1}]
    with ExpertCluster(path, nodes_config(path, nodes), progress=False) as cluster:
        with pytest.raises(RuntimeError, match=r"makes 'a' \(127.0.0.2\) the head, but this command runs on 127.0.0.1"):
            cluster.start()


def test_a_listed_node_missing_from_ray_is_named(ray_cluster, make_tiny):
    path = make_tiny("Q4_K_M")
    nodes = [{"name": "here", "address": "127.0.0.1", "memory_gb": 1},
             {"name": "gone", "address": "127.0.0.9", "memory_gb": 1}]
    with ExpertCluster(path, nodes_config(path, nodes), progress=False) as cluster:
        with pytest.raises(RuntimeError, match=r"nodes \['gone'\] from nodes.yaml are not in the Ray cluster"):
            cluster.start()
