"""How much context the head's memory holds beside its weights and its share of the experts.

The head keeps every sequence's KV cache (~70 KB a token at K2.6's size). Unless --context names a size, a
sequence gets the largest context the plan can hold for --max-sequences of them, up to the model's own
length, without costing the experts anything: each node keeps the share of them it has at the least
context (4,096), and they stay in memory if they were there. What the head has left after that is the KV
pool's too: the prompt cache keeps ended conversations in the pool, beside what the running sequences hold
(runtime/prompt_cache.py).
Pure data logic over byte sizes, as placement.py is.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.placement import (DEFAULT_RESERVE_BYTES, Inventory, NodeBudget, Placement, PlacementError, format_bytes,
                               plan)

LEAST_CONTEXT = 4096  # the context an automatic plan never goes below (unless the model's own is shorter)
CONTEXT_STEP = 1024  # automatic contexts are whole multiples of this (or the model's own length)


@dataclass(frozen=True)
class KVPlan:
    context: int  # tokens each sequence may hold, prompt and reply
    max_sequences: int
    bytes_per_token: int  # of KV cache, every layer
    pool_bytes: int  # the head's memory for KV: the running sequences' at full context and what the plan left
    automatic: bool  # the context is the largest that fits, not --context's

    @property
    def reserved_bytes(self) -> int:
        """What the running sequences may hold at full context."""
        return self.context * self.max_sequences * self.bytes_per_token

    def describe(self, model_context: int) -> str:
        how = (f"the most the head holds, up to the model's {model_context}; --context sets it" if self.automatic
               else "--context")
        return (f"{self.context} tokens of context ({how}) x {self.max_sequences} sequences, at "
                f"{format_bytes(self.bytes_per_token)} per token: {format_bytes(self.reserved_bytes)} of KV cache on "
                f"the head; kept prompts share its {format_bytes(self.pool_bytes)} of KV memory with them")


def plan_context(inventory: Inventory, nodes: list[NodeBudget], *, bytes_per_token: int, max_sequences: int,
                 model_context: int, context: int | None = None, **plan_args) -> tuple[Placement, KVPlan]:
    """The placement and the KV plan: for `context` tokens a sequence when given (refused if it does not fit),
    else for the largest context, from LEAST_CONTEXT up to model_context, that the head's memory left beside
    its share of the experts holds (before replicas: context comes first), the experts shared as at the least
    context and placed as well (in memory if they were, by speed if they were). plan_args go to
    placement.plan (reserve_bytes, allow_disk, replicas, heat)."""
    head = next(n.name for n in nodes if n.is_head)

    def attempt(tokens: int, **overrides) -> Placement:
        kv_cache = inventory.with_kv_cache(tokens * max_sequences * bytes_per_token)
        return plan(kv_cache, nodes, **{**plan_args, **overrides})

    if context is not None:
        chosen = min(context, model_context)
        placement = attempt(chosen)
    else:
        least = min(LEAST_CONTEXT, model_context)
        placement = attempt(least)  # refuses, as a plan does, when even the least does not fit
        bare = attempt(least, replicas="0")
        room = _left_on_head(bare, head) // (max_sequences * bytes_per_token)
        most = min(model_context, least + room)
        candidates = [least] + [c for c in range(0, most + 1, CONTEXT_STEP) if c > least]
        if most == model_context > candidates[-1]:
            candidates.append(model_context)
        # The experts keep the shares the least context gave them: a longer one takes the head's room, not theirs.
        shares = [bare.budgets[n.name] for n in nodes]
        chosen, placement = _largest(candidates, placement, lambda tokens: attempt(tokens, shares=shares))
    reserved = chosen * max_sequences * bytes_per_token
    return placement, KVPlan(chosen, max_sequences, bytes_per_token, reserved + _left_on_head(placement, head),
                             context is None)


def _left_on_head(placement: Placement, head: str) -> int:
    """The head's memory beside its weights, its KV cache and the experts it holds (none when it pages them)."""
    held = placement.bytes_per_node.get(head, 0) + placement.replica_bytes.get(head, 0)
    return max(0, placement.budgets[head] - held)


def _largest(candidates: list[int], least: Placement, attempt) -> tuple[int, Placement]:
    """The last candidate whose placement is as good as the first's (bisection: a larger context only takes
    memory away from the experts), and that placement."""
    def as_good(tokens: int) -> Placement | None:
        try:
            placement = attempt(tokens)
        except PlacementError:
            return None
        worse = (placement.disk_backed and not least.disk_backed) or (least.by_speed and not placement.by_speed)
        return None if worse else placement

    low, high, best = 0, len(candidates), least  # candidates[low] is as good; candidates[high:] are not known to be
    while high - low > 1:
        middle = (low + high) // 2
        placement = as_good(candidates[middle])
        if placement is None:
            high = middle
        else:
            low, best = middle, placement
    return candidates[low], best


def plan_here(inventory: Inventory, available_bytes: int, *, bytes_per_token: int, max_sequences: int,
              model_context: int, context: int | None = None) -> KVPlan:
    """The KV plan of one process on this machine, which holds every expert (read in place from the file where
    memory is short): as plan_context, from the memory this machine has free before loading."""
    here = NodeBudget("this machine", available_bytes, is_head=True)
    try:
        return plan_context(inventory, [here], bytes_per_token=bytes_per_token, max_sequences=max_sequences,
                            model_context=model_context, context=context, reserve_bytes=DEFAULT_RESERVE_BYTES,
                            allow_disk=True)[1]
    except PlacementError:  # not even the head's weights fit: the OS pages them from the file, as it can
        chosen = min(context or LEAST_CONTEXT, model_context)
        reserved = chosen * max_sequences * bytes_per_token
        return KVPlan(chosen, max_sequences, bytes_per_token, reserved, context is None)
