"""What the dashboard shows of a running cluster, as plain data: every node (its machine, memory, experts and
state), how each layer's experts are shared among the nodes, how often the router picked each expert, and
what happened (failovers, rejoins, re-spreads). Read from the cluster's state; nothing here acts on it.
"""
from __future__ import annotations

import platform

import numpy as np

from cluster.placement import Placement


def cluster_view(cluster) -> dict:
    """cluster: an ExpertCluster, started or starting. Asks every worker for its health (a short deadline each)."""
    placement = cluster.placement
    if placement is None:  # not planned yet: Ray is starting
        return {}
    bringing_up = cluster.remote is None
    status = {"workers": {}, "down": {}} if bringing_up else cluster.status()
    # Local workers (--workers) run on the head's machine; others are known by the address Ray sees.
    machines = {name: platform.node() if cluster.local_workers else node.address
                for name, node in cluster.workers.items()}
    nodes = [node_view(placement, name, machines.get(name, platform.node()), status)
             for name in [placement.head_node, *cluster.workers]]
    if bringing_up:
        for node in nodes:
            node.update(state="loading", loaded=cluster.load_progress.get(node["name"]))
    routed = cluster.remote.routed if cluster.remote is not None else None
    return {"nodes": nodes, "placement": placement_grid(placement, [n["name"] for n in nodes]),
            "heat": heat_map(placement, routed, cluster.kept_routing), "events": list(cluster.failover.events)}


def single_process_view(model_file) -> dict:
    """`serve` without a cluster: the head alone, holding every expert."""
    return {"nodes": [{"name": "head", "role": "head", "machine": platform.node(), "state": "ok",
                       "expert_bytes": model_file.routed_expert_bytes(), "tier": "RAM"}],
            "placement": None, "heat": None, "events": []}


def node_view(placement: Placement, name: str, machine: str, status: dict) -> dict:
    budget = placement.budgets.get(name, 0)
    held_bytes = placement.bytes_per_node.get(name, 0) + placement.replica_bytes.get(name, 0)
    view = {"name": name, "role": "head" if name == placement.head_node else "worker", "machine": machine,
            "budget_bytes": budget, "expert_bytes": placement.bytes_per_node.get(name, 0),
            "replica_bytes": placement.replica_bytes.get(name, 0), "free_bytes": max(0, budget - held_bytes),
            "tier": "RAM" if placement.in_memory(name) else "disk",
            "experts": _count(placement.experts.get(name, {})), "replicas": _count(placement.replicas.get(name, {}))}
    if view["role"] == "head":
        view["head_bytes"] = placement.head_weight_bytes + placement.kv_cache_bytes  # weights and KV cache
    return {**view, **node_state(name, status)}


def node_state(name: str, status: dict) -> dict:
    """ok, or degraded with why: down (who computes its experts, who is taking them over, how far its
    worker has loaded them again: `loaded`) or not answering its health check."""
    outage = status["down"].get(name)
    if outage is not None:
        return {"state": "degraded", "reason": outage["reason"], "down_s": outage["down_s"],
                "covered_by": outage["covered_by"], "taken_over_by": outage["taken_over_by"],
                "loaded": outage["loaded"] if outage["loading"] else None}
    health = status["workers"].get(name, "ok")  # the head is not in it: it serves as long as this answers
    return {"state": "ok"} if health == "ok" else {"state": "degraded", "reason": health}


def placement_grid(placement: Placement, nodes: list[str]) -> dict:
    """Per MoE layer and node (in `nodes` order): the experts it owns and the replicas it holds."""
    layers = sorted({layer for per_layer in placement.experts.values() for layer in per_layer})

    def counts(section: dict) -> list[list[int]]:
        return [[len(section.get(node, {}).get(layer, ())) for node in nodes] for layer in layers]
    return {"layers": layers, "nodes": nodes, "experts": counts(placement.experts),
            "replicas": counts(placement.replicas)}


def heat_map(placement: Placement, routed: np.ndarray | None, kept: np.ndarray | None) -> dict | None:
    """Times the router picked each expert of each MoE layer: this run's counts plus earlier runs' kept ones."""
    if routed is None:
        return None
    layers = sorted({layer for per_layer in placement.experts.values() for layer in per_layer})
    if kept is None or kept.shape != routed.shape:  # none kept, or for layers this run does not route
        kept = np.zeros_like(routed)
    return {"layers": layers, "counts": (routed + kept)[layers].tolist(), "this_run": int(routed.sum()),
            "earlier_runs": int(kept.sum())}


def _count(per_layer: dict) -> int:
    return sum(len(ids) for ids in per_layer.values())
