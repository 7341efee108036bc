"""The placement planner: properties over random inventories and budgets, errors, and sizes from a real file."""
from __future__ import annotations

import dataclasses
import re

import msgpack
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cluster.placement import GiB, Inventory, NodeBudget, Placement, PlacementError, plan, respread, with_copies
from runtime.config import ModelConfig
from runtime.gguf_file import GGUFModelFile

RESERVE = 1000
HEAD_BYTES = 5000


@st.composite
def inventories(draw) -> Inventory:
    num_dense = draw(st.integers(0, 1))
    num_moe = draw(st.integers(1, 4))
    num_experts = draw(st.integers(4, 64))
    # Unsloth files mix quant types per layer, so expert sizes differ from layer to layer.
    sizes = draw(st.lists(st.integers(1000, 10_000), min_size=num_moe, max_size=num_moe))
    expert_bytes = np.zeros((num_dense + num_moe, num_experts), dtype=np.int64)
    expert_bytes[num_dense:] = np.array(sizes)[:, None]
    return Inventory(expert_bytes, tuple(range(num_dense, num_dense + num_moe)), HEAD_BYTES, 1000)


@st.composite
def pools(draw, inventory: Inventory) -> list[NodeBudget]:
    """1-6 nodes whose usable bytes range from nothing to 1.5x the experts (per mille of the total)."""
    num_nodes = draw(st.integers(1, 6))
    head = draw(st.integers(0, num_nodes - 1))
    total = inventory.total_expert_bytes
    return [NodeBudget(f"node{n}", RESERVE + (inventory.head_bytes if n == head else 0) + total * permille // 1000,
                       is_head=n == head)
            for n, permille in enumerate(draw(st.lists(st.integers(0, 1500), min_size=num_nodes,
                                                       max_size=num_nodes)))]


@st.composite
def problems(draw):
    inventory = draw(inventories())
    return inventory, draw(pools(inventory)), draw(st.booleans())


def counts(placement: Placement, inventory: Inventory) -> dict[str, np.ndarray]:
    """node -> experts held per MoE layer."""
    return {node: np.array([len(per_layer.get(layer, ())) for layer in inventory.moe_layers])
            for node, per_layer in placement.experts.items()}


@settings(max_examples=300, deadline=None)
@given(problems())
def test_plan_properties(problem):
    assert_plan_properties(*problem)


@pytest.fixture(scope="module")
def replica_inventory(replica) -> Inventory:
    model_file = GGUFModelFile(replica)
    return Inventory.from_model(model_file, ModelConfig.from_metadata(model_file.metadata), context=4096,
                                max_sequences=8)


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_plan_properties_at_kimi_k2_6s_size(replica_inventory, data):
    """The same properties with the real model's 23,040 (layer, expert) pairs and sizes."""
    assert replica_inventory.expert_bytes[list(replica_inventory.moe_layers)].size == 23_040
    assert_plan_properties(replica_inventory, data.draw(pools(replica_inventory)), data.draw(st.booleans()))


def assert_plan_properties(inventory: Inventory, nodes: list[NodeBudget], allow_disk: bool) -> None:
    total = inventory.total_expert_bytes
    try:
        placement = plan(inventory, nodes, reserve_bytes=RESERVE, allow_disk=allow_disk)
    except PlacementError:
        assert not allow_disk
        available = sum(n.memory_bytes - RESERVE - inventory.head_bytes * n.is_head for n in nodes)
        # Fails only when the pool is short, or so nearly full that whole experts cannot be fitted.
        assert total > available - len(nodes) * int(inventory.expert_bytes.max())
        return
    usable = placement.budgets
    assert usable == {n.name: n.memory_bytes - RESERVE - inventory.head_bytes * n.is_head for n in nodes}

    for layer in range(inventory.expert_bytes.shape[0]):
        held = sorted(e for per_layer in placement.experts.values() for e in per_layer.get(layer, ()))
        expected = list(range(inventory.expert_bytes.shape[1])) if layer in inventory.moe_layers else []
        assert held == expected, "every expert of every MoE layer placed exactly once"
        for expert in expected:
            assert len(placement.owners(layer, expert)) == 1

    for node, per_layer in placement.experts.items():
        assert placement.bytes_per_node[node] == sum(int(inventory.expert_bytes[layer, list(ids)].sum())
                                                     for layer, ids in per_layer.items())
        assert all(list(ids) == sorted(ids) for ids in per_layer.values())
    if not placement.disk_backed:
        assert all(placement.bytes_per_node[n] <= usable[n] for n in usable)
    else:
        assert allow_disk

    # With an expert's worth of room beyond its proportional bytes on every node, no byte correction is
    # forced: every share is within +-1 of proportional, so a node owed >= 1 expert per layer has one.
    # Closer to full, fitting the budgets comes first and moved experts may leave these bounds.
    total_usable = sum(usable.values())
    max_size = int(inventory.expert_bytes.max())
    has_room = total_usable > 0 and all(u - total * u / total_usable >= max_size for u in usable.values() if u > 0)
    event(f"room for byte corrections: {has_room}")
    if has_room:
        num_experts = inventory.expert_bytes.shape[1]
        for node, held_per_layer in counts(placement, inventory).items():
            proportional = num_experts * usable[node] / total_usable
            assert np.all(np.abs(held_per_layer - proportional) < 1), node
            if proportional >= 1:
                assert held_per_layer.min() >= 1, f"{node} has a meaningful budget but misses a layer"

    assert plan(inventory, nodes, reserve_bytes=RESERVE, allow_disk=allow_disk) == placement, "deterministic"


@st.composite
def timed_problems(draw):
    """A problem whose nodes all have an expert speed, from 1 to 50 GB/s, and whose experts fit."""
    inventory, nodes, _ = draw(problems())
    speeds = draw(st.lists(st.floats(1, 50), min_size=len(nodes), max_size=len(nodes)))
    return inventory, [dataclasses.replace(n, expert_gbps=speed) for n, speed in zip(nodes, speeds)]


def slowest_ms(placement: Placement, inventory: Inventory, speeds: dict[str, float]) -> float:
    """The time a step spends in routed experts if every expert is read once: per layer, the slowest node."""
    return sum(max(int(inventory.expert_bytes[layer, list(per_layer.get(layer, ()))].sum()) / speeds[node]
                   for node, per_layer in placement.experts.items()) for layer in inventory.moe_layers)


@settings(max_examples=300, deadline=None)
@given(timed_problems())
def test_shares_follow_speed_as_far_as_memory_allows(problem):
    inventory, nodes = problem
    by_memory_nodes = [dataclasses.replace(n, expert_gbps=None) for n in nodes]
    try:
        by_memory = plan(inventory, by_memory_nodes, reserve_bytes=RESERVE)
    except PlacementError:
        event("the experts do not fit")
        return
    placement = plan(inventory, nodes, reserve_bytes=RESERVE)
    assert not by_memory.by_speed
    if not placement.by_speed:  # whole experts could not meet the speed shares node by node: memory's shares
        event("by memory: the speed shares did not fit")
        assert placement.experts == by_memory.experts
        return
    for layer in inventory.moe_layers:
        held = sorted(e for per_layer in placement.experts.values() for e in per_layer.get(layer, ()))
        assert held == list(range(inventory.expert_bytes.shape[1])), "every expert placed exactly once"
    assert all(placement.bytes_per_node[n] <= placement.budgets[n] for n in placement.budgets)

    speeds = {n.name: n.expert_gbps for n in nodes}
    # Whole experts round each node's share by up to one expert per layer, either way.
    rounding = sum(int(inventory.expert_bytes[layer].max()) / min(speeds.values()) for layer in inventory.moe_layers)
    assert slowest_ms(placement, inventory, speeds) <= slowest_ms(by_memory, inventory, speeds) + rounding

    # Where every node has room for its speed's share and an expert more, counts follow speed to +-1.
    num_experts, total_speed = inventory.expert_bytes.shape[1], sum(speeds.values())
    total, max_size = inventory.total_expert_bytes, int(inventory.expert_bytes.max())
    has_room = all(placement.budgets[n] - total * speeds[n] / total_speed >= max_size for n in speeds)
    event(f"room for every speed share: {has_room}")
    if has_room:
        for node, held_per_layer in counts(placement, inventory).items():
            assert np.all(np.abs(held_per_layer - num_experts * speeds[node] / total_speed) < 1), node


def test_a_fast_node_takes_more_of_each_layer_until_its_memory_is_full():
    inventory = uniform_inventory(expert_bytes=16 * 2**20)  # 4 layers of 64 experts of 16 MiB: 4 GiB
    head = NodeBudget("head", 64 * GiB, is_head=True, expert_gbps=10.0)
    placement = plan(inventory, [head, NodeBudget("fast", 64 * GiB, expert_gbps=30.0)])
    assert {node: sorted(set(c.tolist())) for node, c in counts(placement, inventory).items()} == \
        {"head": [16], "fast": [48]}, "3x the speed, 3x the experts"
    assert "shared by each node's measured expert speed" in placement.format_table()
    # With 1 GiB usable, the fast node holds its memory's worth, 16 experts a layer; the head the rest.
    placement = plan(inventory, [head, NodeBudget("fast", 3 * GiB, expert_gbps=30.0)])
    assert {node: sorted(set(c.tolist())) for node, c in counts(placement, inventory).items()} == \
        {"head": [48], "fast": [16]}
    # A node without figures: every share goes by memory.
    placement = plan(inventory, [head, NodeBudget("fast", 64 * GiB)])
    assert not placement.by_speed and "shared by usable memory" in placement.format_table()


@settings(max_examples=50, deadline=None)
@given(problems())
def test_placement_survives_msgpack(problem):
    inventory, nodes, _ = problem
    placement = plan(inventory, nodes, reserve_bytes=RESERVE, allow_disk=True)
    assert Placement.from_dict(msgpack.unpackb(msgpack.packb(placement.to_dict()))) == placement


def uniform_inventory(num_layers=4, num_experts=64, expert_bytes=GiB // 64, head_bytes=10 * GiB) -> Inventory:
    sizes = np.full((num_layers, num_experts), expert_bytes, dtype=np.int64)
    return Inventory(sizes, tuple(range(num_layers)), head_bytes, GiB)


def test_too_small_pool_raises_a_table_naming_each_node():
    inventory = uniform_inventory()  # 4 GiB of experts, 10 GiB on the head
    nodes = [NodeBudget("atlas", 13 * GiB, is_head=True), NodeBudget("borealis", 3 * GiB),
             NodeBudget("cirrus", 3 * GiB)]
    with pytest.raises(PlacementError) as error:
        plan(inventory, nodes, reserve_bytes=2 * GiB)
    message = str(error.value)
    assert "need 4.0 GiB" in message and "3.0 GiB usable" in message
    lines = message.splitlines()
    for name in ("atlas (head)", "borealis", "cirrus", "total"):
        assert any(line.startswith(name) for line in lines), name
    assert "allow_disk: true" in message

    placement = plan(inventory, nodes, reserve_bytes=2 * GiB, allow_disk=True)
    assert placement.disk_backed
    assert "disk-backed" in placement.format_table()


def test_head_budget_is_reduced_by_head_bytes():
    inventory = uniform_inventory()
    nodes = [NodeBudget("worker", 64 * GiB), NodeBudget("head", 64 * GiB, is_head=True)]
    placement = plan(inventory, nodes, reserve_bytes=2 * GiB)
    assert placement.head_node == "head"
    assert placement.budgets == {"worker": 62 * GiB, "head": 52 * GiB}
    held = counts(placement, inventory)
    assert held["head"].sum() < held["worker"].sum()  # proportional to 52 : 62
    assert placement.nodes_for_layer(0) == ("worker", "head")


def test_first_node_is_head_when_none_is_marked():
    placement = plan(uniform_inventory(), [NodeBudget("a", 32 * GiB), NodeBudget("b", 32 * GiB)])
    assert placement.head_node == "a"
    assert placement.budgets["a"] == placement.budgets["b"] - 10 * GiB


def test_head_without_room_for_head_bytes_says_what_it_needs():
    with pytest.raises(PlacementError, match=r"head node 'small' needs 10.0 GiB .* offers 6.0 GiB"):
        plan(uniform_inventory(), [NodeBudget("small", 8 * GiB, is_head=True), NodeBudget("big", 512 * GiB)])


@pytest.mark.parametrize("nodes, message", [
    ([], "no nodes"),
    ([NodeBudget("a", 64 * GiB), NodeBudget("a", 64 * GiB)], "repeated: a"),
    ([NodeBudget("a", 64 * GiB, True), NodeBudget("b", 64 * GiB, True)], "only one node can be the head"),
])
def test_bad_node_lists_are_refused(nodes, message):
    with pytest.raises(PlacementError, match=message):
        plan(uniform_inventory(), nodes)


def test_mixed_layer_sizes_are_corrected_by_moving_experts_to_nodes_with_room():
    # Layers of 3- and 5-byte experts: the proportional spread gives a 38 and b 42 of 80 bytes, one over
    # b's 41; moving one 3-byte expert to a fits both, at the cost of one layer's +-1 share.
    sizes = np.array([[3] * 5, [5] * 5, [3] * 5, [5] * 5], dtype=np.int64)
    inventory = Inventory(sizes, (0, 1, 2, 3), 0, 0)
    placement = plan(inventory, [NodeBudget("a", 41), NodeBudget("b", 41)], reserve_bytes=0)
    assert placement.bytes_per_node == {"a": 41, "b": 39}
    assert not placement.disk_backed
    for held in counts(placement, inventory).values():
        assert held.min() >= 1 and held.max() <= 4

    with pytest.raises(PlacementError, match="not node by node"):
        plan(inventory, [NodeBudget("a", 40), NodeBudget("b", 40)], reserve_bytes=0)


def test_format_table_shows_spans_per_node():
    inventory = uniform_inventory(num_experts=10)
    placement = plan(inventory, [NodeBudget("h", 24 * GiB, True), NodeBudget("w1", 12 * GiB),
                                 NodeBudget("w2", 12 * GiB)], reserve_bytes=2 * GiB)
    table = placement.format_table()
    assert table.splitlines()[0] == "4 MoE layers over 3 nodes, shared by usable memory"
    assert "experts/layer" in table and "share of layer" in table
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    assert rows["h"][2] == "3-4" and rows["total"][1] == "10"


def test_the_table_shows_what_the_head_holds_beside_its_experts():
    inventory = uniform_inventory()  # 10 GiB on the head, 1 GiB of it KV cache
    placement = plan(inventory, [NodeBudget("h", 24 * GiB, True), NodeBudget("w", 12 * GiB)], reserve_bytes=2 * GiB)
    header, *rows = placement.format_table().splitlines()[1:]
    assert header.split()[:7] == ["node", "experts/layer", "experts", "head", "weights", "KV", "cache"]
    # The head's row: its experts, then 9 GiB of weights and 1 GiB of KV cache, then the 12 GiB left for experts.
    assert re.match(r"h \(head\) +\S+ +[\d.]+ GiB +9\.0 GiB +1\.0 GiB +12\.0 GiB ", rows[0]), rows[0]
    assert re.match(r"w +\S+ +[\d.]+ GiB +10\.0 GiB ", rows[1]), "a worker holds no head weights: " + rows[1]
    assert re.match(r"total +\S+ +4\.0 GiB +9\.0 GiB +1\.0 GiB +22\.0 GiB ", rows[2]), rows[2]
    assert Placement.from_dict(msgpack.unpackb(msgpack.packb(placement.to_dict()))) == placement


def test_one_node_is_one_node():
    inventory = uniform_inventory()  # 4 GiB of experts, 10 GiB on the head
    placement = plan(inventory, [NodeBudget("h", 24 * GiB, True)], reserve_bytes=2 * GiB)
    assert placement.format_table().splitlines()[0] == "4 MoE layers over 1 node, shared by usable memory"
    with pytest.raises(PlacementError) as refusal:
        plan(inventory, [NodeBudget("h", 14 * GiB, True)], reserve_bytes=2 * GiB)
    message = str(refusal.value)
    assert message.startswith("the routed experts need 4.0 GiB but 1 node has 2.0 GiB usable for them:"), message
    assert re.search(r"h \(head\) +14\.0 GiB +2\.0 GiB +9\.0 GiB +1\.0 GiB +2\.0 GiB", message), message


def test_inventory_from_a_real_file(make_tiny):
    model_file = GGUFModelFile(make_tiny("Q4_K_M"))
    config = ModelConfig.from_metadata(model_file.metadata)
    inventory = Inventory.from_model(model_file, config, context=512, max_sequences=3)

    assert inventory.moe_layers == tuple(config.moe_layers)
    assert inventory.expert_bytes.shape == (config.num_layers, config.num_experts)
    for layer in range(config.num_layers):
        for expert in range(config.num_experts):
            expected = model_file.expert_bytes(layer, expert) if config.is_moe_layer(layer) else 0
            assert inventory.expert_bytes[layer, expert] == expected
    assert inventory.kv_cache_bytes == 2 * config.kv_cache_width * config.num_layers * 512 * 3
    all_tensor_bytes = sum(t.nbytes for t in model_file.tensors.values())
    assert inventory.head_bytes + inventory.total_expert_bytes == all_tensor_bytes + inventory.kv_cache_bytes


def test_inventory_kv_cache_of_a_legacy_attention_file(make_tiny):
    model_file = GGUFModelFile(make_tiny(legacy=True))
    config = ModelConfig.from_metadata(model_file.metadata)
    inventory = Inventory.from_model(model_file, config, context=100, max_sequences=1)
    per_token_layer = config.num_heads * (config.head_dim_qk + config.head_dim_v)
    assert inventory.kv_cache_bytes == 2 * per_token_layer * config.num_layers * 100


def test_a_small_model_plan_shows_its_sizes_in_units_that_show_them():
    inventory = uniform_inventory(num_layers=2, num_experts=16, expert_bytes=640 * 1024, head_bytes=30 * 2**20)
    placement = plan(inventory, [NodeBudget("head", GiB, is_head=True), NodeBudget("worker", GiB)], reserve_bytes=0)
    table = placement.format_table()
    assert "10.0 MiB" in table and "20.0 MiB" in table and "0.0 GiB" not in table  # 16 experts of 640 KiB per node
    with pytest.raises(PlacementError, match=r"needs 30.0 MiB .* offers 20.0 MiB"):
        plan(inventory, [NodeBudget("head", 20 * 2**20, is_head=True)], reserve_bytes=0)


@settings(max_examples=200, deadline=None)
@given(problems(), st.sampled_from(["1", "auto"]), st.booleans())
def test_replicas_are_second_copies_elsewhere_within_budgets(problem, mode, hot):
    inventory, nodes, _ = problem
    try:
        primary = plan(inventory, nodes, reserve_bytes=RESERVE)
    except PlacementError:
        return
    heat = np.arange(inventory.expert_bytes.size).reshape(inventory.expert_bytes.shape) if hot else None
    try:
        placement = plan(inventory, nodes, reserve_bytes=RESERVE, replicas=mode, heat=heat)
    except PlacementError as e:
        assert mode == "1" and "replicas: 1" in str(e) and "replicas: auto" in str(e)
        event("replicas: 1 refused")
        return
    assert placement.experts == primary.experts  # replicas never move an expert's own place
    head = placement.head_node
    for node, per_layer in placement.replicas.items():
        for layer, ids in per_layer.items():
            for expert in ids:
                assert node not in primary.owners(layer, expert) and head not in primary.owners(layer, expert)
    for node in placement.budgets:  # own share plus copies within the node's usable memory
        assert placement.bytes_per_node[node] + placement.replica_bytes.get(node, 0) <= placement.budgets[node]
        held = placement.held(node)
        assert sum(int(inventory.expert_bytes[layer, list(ids)].sum()) for layer, ids in held.items()) == \
            placement.bytes_per_node[node] + placement.replica_bytes.get(node, 0)
    copied = {(layer, e) for per_layer in placement.replicas.values() for layer, ids in per_layer.items() for e in ids}
    workers_experts = {(layer, e) for node, per_layer in primary.experts.items() if node != head
                       for layer, ids in per_layer.items() for e in ids}
    if mode == "1":
        assert copied == workers_experts
    elif hot and copied:  # the most routed are copied first: any expert left out fits nowhere or is colder
        smallest = min(int(heat[layer, e]) for layer, e in copied)
        left_out = workers_experts - copied
        assert all(int(heat[layer, e]) < smallest or _fits_nowhere(placement, inventory, layer, e)
                   for layer, e in left_out)
    assert Placement.from_dict(msgpack.unpackb(msgpack.packb(placement.to_dict()))) == placement


def _fits_nowhere(placement: Placement, inventory: Inventory, layer: int, expert: int) -> bool:
    size = inventory.expert_bytes[layer, expert]
    owner = placement.owners(layer, expert)[0]
    return all(placement.budgets[n] - placement.bytes_per_node[n] - placement.replica_bytes.get(n, 0) < size
               for n in placement.budgets if n != owner)


def test_replicas_keep_each_workers_layer_share_on_one_node_and_show_in_the_plan():
    inventory = uniform_inventory()
    nodes = [NodeBudget("atlas", 20 * GiB, is_head=True), NodeBudget("borealis", 8 * GiB),
             NodeBudget("cirrus", 8 * GiB)]
    placement = plan(inventory, nodes, reserve_bytes=GiB, replicas="1")
    for worker in ("borealis", "cirrus"):
        for layer, ids in placement.experts[worker].items():
            holders = {node for node, per_layer in placement.replicas.items() if set(ids) & set(per_layer.get(layer, ()))}
            assert len(holders) == 1 and worker not in holders
    table = placement.format_table()
    assert "replicas" in table.splitlines()[1] and f"{placement.replica_count} (" in table
    assert placement.replica_count == sum(len(ids) for node in ("borealis", "cirrus")
                                          for ids in placement.experts[node].values())


def test_replicas_that_do_not_fit_are_refused_or_fill_what_is_left():
    inventory = uniform_inventory()  # 4 GiB of experts
    nodes = [NodeBudget("atlas", 12 * GiB, is_head=True), NodeBudget("borealis", 3 * GiB),
             NodeBudget("cirrus", 3 * GiB)]
    with pytest.raises(PlacementError, match=r"replicas: 1 needs .* use replicas: auto"):
        plan(inventory, nodes, reserve_bytes=GiB, replicas="1")
    placement = plan(inventory, nodes, reserve_bytes=GiB, replicas="auto")
    assert 0 < placement.replica_count < 4 * 64
    for node in placement.budgets:
        assert placement.bytes_per_node[node] + placement.replica_bytes.get(node, 0) <= placement.budgets[node]


def test_a_lost_workers_experts_are_respread_to_survivors_with_room_unless_copied_already():
    inventory = uniform_inventory()
    nodes = [NodeBudget("atlas", 20 * GiB, is_head=True), NodeBudget("borealis", 8 * GiB),
             NodeBudget("cirrus", 8 * GiB), NodeBudget("dione", 1500 * 2**20)]
    placement = plan(inventory, nodes, reserve_bytes=GiB)
    lost = placement.experts["borealis"]
    copies, copy_bytes = respread(placement, inventory, "borealis", ["cirrus", "dione"])
    assert set(copies) == {"cirrus"}  # dione has no room left after its own share
    assert copies["cirrus"] == lost and copy_bytes["cirrus"] == placement.bytes_per_node["borealis"]
    grown = with_copies(placement, copies, copy_bytes)
    assert grown.held("cirrus") == {layer: tuple(sorted(set(placement.experts["cirrus"][layer]) | set(lost[layer])))
                                    for layer in lost}
    # Lost again later: its experts have a copy on an up node now, so nothing more is loaded.
    assert respread(grown, inventory, "borealis", ["cirrus", "dione"]) == ({}, {})
    # What fits nowhere stays with the head's fallback.
    copies, copy_bytes = respread(grown, inventory, "cirrus", ["dione"])
    room = grown.budgets["dione"] - grown.bytes_per_node["dione"]
    assert set(copies) == {"dione"} and 0 < copy_bytes["dione"] <= room
    assert copy_bytes["dione"] < grown.bytes_per_node["cirrus"]


def test_with_allow_disk_a_lost_workers_experts_are_shared_out_on_disk():
    inventory = uniform_inventory()  # 4 GiB of experts over nodes with 2 GiB for them in all: paged from disk
    nodes = [NodeBudget("atlas", 11 * GiB, is_head=True), NodeBudget("borealis", 1536 * 2**20),
             NodeBudget("cirrus", 1536 * 2**20), NodeBudget("dione", 1536 * 2**20)]
    placement = plan(inventory, nodes, reserve_bytes=GiB, allow_disk=True)
    assert placement.disk_backed
    copies, copy_bytes = respread(placement, inventory, "borealis", ["cirrus", "dione"])
    assert set(copies) == {"cirrus", "dione"}
    assert sum(copy_bytes.values()) == placement.bytes_per_node["borealis"]
    assert max(copy_bytes.values()) - min(copy_bytes.values()) <= 2 * int(inventory.expert_bytes.max())
