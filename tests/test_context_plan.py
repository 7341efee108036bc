"""The context the head's memory holds (cluster/context_plan.py): by default the largest that what the head has
left beside its share of the experts holds, never at the experts' cost; --context exactly, or refused."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.context_plan import CONTEXT_STEP, LEAST_CONTEXT, plan_context, plan_here
from cluster.placement import GiB, Inventory, NodeBudget, PlacementError, plan

PER_TOKEN = 70_000  # about K2.6's KV bytes per token
MODEL_CONTEXT = 262_144


def inventory(expert_gib: int = 300, head_gib: int = 12) -> Inventory:
    sizes = np.full((60, 384), expert_gib * GiB // (60 * 384), dtype=np.int64)
    return Inventory(sizes, tuple(range(60)), head_gib * GiB, 0)


def four_desktops(gib: int = 128) -> list[NodeBudget]:
    return [NodeBudget("head", gib * GiB, is_head=True)] + [NodeBudget(f"w{i}", gib * GiB) for i in (1, 2, 3)]


def kv_plan(nodes, sequences=16, context=None, **plan_args):
    plan_args = {"reserve_bytes": 4 * GiB, **plan_args}
    return plan_context(inventory(), nodes, bytes_per_token=PER_TOKEN, max_sequences=sequences,
                        model_context=MODEL_CONTEXT, context=context, **plan_args)


def test_the_context_takes_what_the_head_has_left_beside_its_experts():
    placement, kv = kv_plan(four_desktops())
    at_least = plan(inventory().with_kv_cache(LEAST_CONTEXT * 16 * PER_TOKEN), four_desktops(), 4 * GiB)
    left = at_least.budgets["head"] - at_least.bytes_per_node["head"]
    assert kv.automatic and kv.context == LEAST_CONTEXT + left // (16 * PER_TOKEN) // CONTEXT_STEP * CONTEXT_STEP
    assert kv.reserved_bytes == kv.context * 16 * PER_TOKEN
    # Every expert stays where the least context put it, in memory.
    assert placement.experts == at_least.experts and not placement.disk_backed
    # The KV pool: the running sequences' full context and what the head has left after it.
    assert kv.pool_bytes == kv.reserved_bytes + placement.budgets["head"] - placement.bytes_per_node["head"]


def test_fewer_sequences_get_more_context_up_to_the_model_s():
    contexts = [kv_plan(four_desktops(), sequences)[1].context for sequences in (16, 4, 1)]
    assert contexts[0] < contexts[1] and contexts[2] == MODEL_CONTEXT


def test_an_explicit_context_is_planned_as_given_or_refused():
    placement, kv = kv_plan(four_desktops(), context=8192)
    assert (kv.context, kv.automatic) == (8192, False)
    assert kv_plan(four_desktops(), 1, context=10**6)[1].context == MODEL_CONTEXT  # the model's own at most
    with pytest.raises(PlacementError, match="lower context / max_sequences"):
        kv_plan(four_desktops(96), context=200_000)


def test_context_comes_before_second_copies():
    without = kv_plan(four_desktops())[1]
    placement, with_copies = kv_plan(four_desktops(), replicas="auto")
    assert with_copies.context == without.context and placement.replica_count > 0


def test_a_pool_that_pages_experts_from_disk_keeps_the_least_context():
    _, kv = kv_plan(four_desktops(80), allow_disk=True)
    assert kv.context == LEAST_CONTEXT


def test_one_process_plans_from_this_machine_s_free_memory():
    small = inventory(expert_gib=8, head_gib=2)
    roomy = plan_here(small, 64 * GiB, bytes_per_token=PER_TOKEN, max_sequences=4, model_context=MODEL_CONTEXT)
    assert LEAST_CONTEXT < roomy.context <= (64 - 2 - 10) * GiB // (4 * PER_TOKEN)
    # Too little memory even for the head's weights: they are paged from the file, at the least context.
    tight = plan_here(small, 4 * GiB, bytes_per_token=PER_TOKEN, max_sequences=4, model_context=MODEL_CONTEXT)
    assert tight.context == LEAST_CONTEXT


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(40, 200), min_size=1, max_size=5), st.integers(1, 16), st.booleans())
def test_the_automatic_context_never_costs_the_experts(memory_gib, sequences, allow_disk):
    nodes = [NodeBudget(f"n{i}", gib * GiB, is_head=i == 0) for i, gib in enumerate(memory_gib)]
    try:
        least = plan(inventory().with_kv_cache(LEAST_CONTEXT * sequences * PER_TOKEN), nodes, 4 * GiB, allow_disk)
    except PlacementError:
        with pytest.raises(PlacementError):
            kv_plan(nodes, sequences, allow_disk=allow_disk)
        return
    placement, kv = kv_plan(nodes, sequences, allow_disk=allow_disk)
    assert LEAST_CONTEXT <= kv.context <= MODEL_CONTEXT
    assert kv.context % CONTEXT_STEP == 0 or kv.context == MODEL_CONTEXT
    assert placement.disk_backed <= least.disk_backed
    assert kv.pool_bytes >= kv.reserved_bytes
    if not least.by_speed and not least.disk_backed:
        assert placement.experts == least.experts
