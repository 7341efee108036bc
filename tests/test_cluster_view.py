"""The dashboard's view of a cluster, from its placement and failover state, without starting one."""
from __future__ import annotations

import numpy as np

from cluster.cluster_view import heat_map, node_state, node_view, placement_grid
from cluster.failover import FailoverState
from cluster.placement import Placement

PLACEMENT = Placement(experts={"head": {1: (0, 1), 2: (0,)}, "w1": {1: (2, 3), 2: (1, 2, 3)}},
                      bytes_per_node={"head": 300, "w1": 500}, budgets={"head": 1000, "w1": 2000},
                      disk_backed=False, head_node="head", replicas={"w1": {1: (0,)}}, replica_bytes={"w1": 100},
                      head_weight_bytes=40, kv_cache_bytes=60)
HEALTHY = {"workers": {"w1": "ok"}, "down": {}}


def test_a_node_shows_its_memory_experts_and_replicas():
    head, worker = (node_view(PLACEMENT, name, "box", HEALTHY) for name in ("head", "w1"))
    assert head == {"name": "head", "role": "head", "machine": "box", "budget_bytes": 1000, "expert_bytes": 300,
                    "replica_bytes": 0, "free_bytes": 700, "tier": "RAM", "experts": 3, "replicas": 0,
                    "head_bytes": 100, "state": "ok"}
    assert worker["free_bytes"] == 1400 and worker["experts"] == 5 and worker["replicas"] == 1
    assert "head_bytes" not in worker


def test_a_down_node_is_degraded_with_why_who_covers_it_and_how_far_it_has_loaded_again():
    state = FailoverState()
    state.failed("w1", "UNAVAILABLE")
    state.covered("w1", "head (from its file)", pairs=3, fallback=True)
    assert node_state("w1", {"workers": {}, "down": state.report()}) == {
        "state": "degraded", "reason": "UNAVAILABLE", "down_s": 0.0, "covered_by": ["head (from its file)"],
        "taken_over_by": [], "loaded": None}
    state.reloading("w1", 50, 200)
    assert node_state("w1", {"workers": {}, "down": state.report()})["loaded"] == 0.25
    not_answering = {"workers": {"w1": "expert worker on node w1 does not answer: UNAVAILABLE"}, "down": {}}
    assert node_state("w1", not_answering) == {"state": "degraded", "reason": not_answering["workers"]["w1"]}


def test_the_placement_grid_has_each_layers_share_per_node():
    assert placement_grid(PLACEMENT, ["head", "w1"]) == {"layers": [1, 2], "nodes": ["head", "w1"],
                                                         "experts": [[2, 2], [1, 3]], "replicas": [[0, 1], [0, 0]]}


def test_the_heat_map_adds_the_counts_kept_from_earlier_runs():
    routed = np.zeros((3, 4), np.int64)
    routed[1, 2] = 5
    kept = np.ones((3, 4), np.int64)
    heat = heat_map(PLACEMENT, routed, kept)
    assert heat["layers"] == [1, 2] and heat["counts"] == [[1, 1, 6, 1], [1, 1, 1, 1]]
    assert heat["this_run"] == 5 and heat["earlier_runs"] == 12
    assert heat_map(PLACEMENT, routed, np.ones((2, 4), np.int64))["earlier_runs"] == 0  # another model's shape
    assert heat_map(PLACEMENT, None, kept) is None  # every expert on the head: nothing routed remotely
