"""Which node holds which routed experts: a pure planner over byte sizes and node memory budgets.

Inventory (bytes of every (layer, expert) and of everything the head holds, from GGUF tensor infos) +
NodeBudgets (from the cluster config or Ray) -> plan() -> Placement, printable as a table. Every MoE
layer is spread over every node, so each layer's expert work runs on all machines at once: in proportion
to each node's measured expert speed when every node has one and memory allows (the slowest node sets
the pace of every layer), else to its usable memory. Replicas (second copies of workers' experts, for
failover) go into the memory left over. No ray, grpc or ggml here: this is data logic, tested on its own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.kv_cache import bytes_per_token

if TYPE_CHECKING:
    from runtime.config import ModelConfig
    from runtime.gguf_file import GGUFModelFile

GiB = 1 << 30
DEFAULT_RESERVE_BYTES = 2 * GiB
REPLICA_MODES = ("0", "1", "auto")
ALLOW_DISK_HINT = "add memory or a node, or set allow_disk: true to let workers page experts from their local disk"


class PlacementError(ValueError):
    """No valid placement: says what was needed, what is available, and what to do."""


@dataclass(frozen=True, eq=False)
class Inventory:
    expert_bytes: np.ndarray  # [num_layers, num_experts] int64; rows of dense layers are 0
    moe_layers: tuple[int, ...]
    head_bytes: int  # every non-expert tensor plus the KV cache
    kv_cache_bytes: int

    def __post_init__(self):
        expert_bytes = np.array(self.expert_bytes, dtype=np.int64)
        if expert_bytes.ndim != 2:
            raise ValueError(f"expert_bytes must be [num_layers, num_experts], not shape {expert_bytes.shape}")
        expert_bytes.setflags(write=False)
        object.__setattr__(self, "expert_bytes", expert_bytes)
        object.__setattr__(self, "moe_layers", tuple(int(layer) for layer in self.moe_layers))

    @classmethod
    def from_model(cls, model_file: GGUFModelFile, config: ModelConfig, context: int = 0,
                   max_sequences: int = 1) -> Inventory:
        """Sizes from the tensor index only: no tensor data is read. With no context, no KV cache (the context
        planner sizes it: with_kv_cache)."""
        if context < 0 or max_sequences < 1:
            raise ValueError(f"context ({context}) must not be negative and max_sequences ({max_sequences}) must "
                             "be at least 1")
        expert_bytes = np.zeros((config.num_layers, config.num_experts), dtype=np.int64)
        expert_tensors = set()
        for layer in config.moe_layers:
            for kind in model_file.expert_kinds(layer):
                # Experts are the slowest axis of each tensor, so all experts of a layer have the same size.
                expert_bytes[layer] += model_file.expert_range(layer, 0, kind).nbytes
                expert_tensors.add(f"blk.{layer}.ffn_{kind}_exps.weight")
        non_expert_bytes = sum(t.nbytes for name, t in model_file.tensors.items() if name not in expert_tensors)
        kv_cache_bytes = bytes_per_token(config) * context * max_sequences
        return cls(expert_bytes, tuple(config.moe_layers), non_expert_bytes + kv_cache_bytes, kv_cache_bytes)

    def with_kv_cache(self, kv_cache_bytes: int) -> Inventory:
        """The same weights with a KV cache of another size on the head."""
        return dataclasses.replace(self, head_bytes=self.head_bytes - self.kv_cache_bytes + kv_cache_bytes,
                                   kv_cache_bytes=kv_cache_bytes)

    @property
    def total_expert_bytes(self) -> int:
        return int(self.expert_bytes.sum())


@dataclass(frozen=True)
class NodeBudget:
    name: str
    memory_bytes: int  # all the node offers; plan() subtracts the reserve (and head bytes on the head)
    is_head: bool = False
    expert_gbps: float | None = None  # GB/s of routed experts it computes (from `kimi-cluster probe`), if known

    def __post_init__(self):
        if not self.name:
            raise ValueError("a node needs a non-empty name")
        if self.memory_bytes < 0:
            raise ValueError(f"node '{self.name}' has negative memory ({self.memory_bytes} bytes)")
        if self.expert_gbps is not None and not self.expert_gbps > 0:
            raise ValueError(f"node '{self.name}' has an expert speed of {self.expert_gbps} GB/s; it must be positive")


@dataclass(frozen=True)
class Placement:
    experts: dict[str, dict[int, tuple[int, ...]]]  # node -> MoE layer -> sorted expert ids
    bytes_per_node: dict[str, int]  # routed expert bytes each node holds
    budgets: dict[str, int]  # usable bytes: memory - reserve, and - head bytes on the head
    disk_backed: bool  # experts exceed some node's budget; workers page them from disk
    head_node: str
    # node -> MoE layer -> sorted ids of other nodes' experts it also holds (second copies, for failover)
    replicas: dict[str, dict[int, tuple[int, ...]]] = field(default_factory=dict)
    replica_bytes: dict[str, int] = field(default_factory=dict)  # bytes of the replicas each node holds
    by_speed: bool = False  # shares follow the nodes' expert speeds (else their memory)
    head_weight_bytes: int = 0  # what the head holds besides experts: every non-expert tensor ...
    kv_cache_bytes: int = 0  # ... and the KV cache

    def held(self, node: str) -> dict[int, tuple[int, ...]]:
        """Every expert the node loads: its own and its replicas, per layer."""
        own, copies = self.experts.get(node, {}), self.replicas.get(node, {})
        return {layer: tuple(sorted(set(own.get(layer, ())) | set(copies.get(layer, ()))))
                for layer in sorted(set(own) | set(copies))}

    def in_memory(self, node: str) -> bool:
        """Whether all the node holds fits its budget; else it pages some experts from disk (allow_disk)."""
        return self.bytes_per_node.get(node, 0) + self.replica_bytes.get(node, 0) <= self.budgets.get(node, 0)

    @property
    def replica_count(self) -> int:
        return sum(len(ids) for per_layer in self.replicas.values() for ids in per_layer.values())

    @cached_property
    def _owners(self) -> dict[tuple[int, int], tuple[str, ...]]:
        owners: dict[tuple[int, int], tuple[str, ...]] = {}
        for node, per_layer in self.experts.items():
            for layer, ids in per_layer.items():
                for expert in ids:
                    owners[layer, expert] = owners.get((layer, expert), ()) + (node,)
        return owners

    def owners(self, layer: int, expert: int) -> tuple[str, ...]:
        try:
            return self._owners[layer, expert]
        except KeyError:
            raise ValueError(f"expert {expert} of layer {layer} is not in the placement") from None

    def nodes_for_layer(self, layer: int) -> tuple[str, ...]:
        return tuple(node for node, per_layer in self.experts.items() if per_layer.get(layer))

    def format_table(self) -> str:
        layers = sorted({layer for per_layer in self.experts.values() for layer in per_layer})
        experts_in_layer = {layer: sum(len(p.get(layer, ())) for p in self.experts.values()) for layer in layers}
        on_head = [format_bytes(self.head_weight_bytes), format_bytes(self.kv_cache_bytes)]
        rows = []
        for node, per_layer in self.experts.items():
            counts = [len(per_layer.get(layer, ())) for layer in layers]
            shares = [100 * c / experts_in_layer[layer] for c, layer in zip(counts, layers)]
            rows.append([_node_label(node, self.head_node), _span(counts, "{}"),
                         format_bytes(self.bytes_per_node[node]), *(on_head if node == self.head_node else ["", ""]),
                         format_bytes(self.budgets[node]), _span(shares, "{:.1f}%")])
            if self.replicas:
                rows[-1].insert(3, f"{sum(len(ids) for ids in self.replicas.get(node, {}).values())} "
                                   f"({format_bytes(self.replica_bytes.get(node, 0))})")
        rows.append(["total", _span(list(experts_in_layer.values()), "{}"),
                     format_bytes(sum(self.bytes_per_node.values())), *on_head,
                     format_bytes(sum(self.budgets.values())), "100%" if layers else ""])
        header = ["node", "experts/layer", "experts", "head weights", "KV cache", "usable", "share of layer"]
        if self.replicas:
            rows[-1].insert(3, f"{self.replica_count} ({format_bytes(sum(self.replica_bytes.values()))})")
            header.insert(3, "replicas")
        shares = "by each node's measured expert speed, memory allowing" if self.by_speed else "by usable memory"
        lines = [f"{len(layers)} MoE layers over {count_of(len(self.experts), 'node')}, shared {shares}",
                 _render(header, rows)]
        if self.disk_backed:
            lines.append("disk-backed: experts exceed some nodes' memory; those workers page them from local disk")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (msgpack's default map keys are strings, so layers go in [layer, ids] pairs)."""
        return {"experts": {node: [[layer, list(ids)] for layer, ids in per_layer.items()]
                            for node, per_layer in self.experts.items()},
                "bytes_per_node": dict(self.bytes_per_node), "budgets": dict(self.budgets),
                "disk_backed": self.disk_backed, "head_node": self.head_node,
                "replicas": {node: [[layer, list(ids)] for layer, ids in per_layer.items()]
                             for node, per_layer in self.replicas.items()},
                "replica_bytes": dict(self.replica_bytes), "by_speed": self.by_speed,
                "head_weight_bytes": self.head_weight_bytes, "kv_cache_bytes": self.kv_cache_bytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placement:
        def per_node(section):
            return {node: {int(layer): tuple(int(e) for e in ids) for layer, ids in pairs}
                    for node, pairs in section.items()}
        return cls(per_node(data["experts"]), {k: int(v) for k, v in data["bytes_per_node"].items()},
                   {k: int(v) for k, v in data["budgets"].items()}, bool(data["disk_backed"]), str(data["head_node"]),
                   per_node(data.get("replicas", {})), {k: int(v) for k, v in data.get("replica_bytes", {}).items()},
                   bool(data.get("by_speed", False)), int(data.get("head_weight_bytes", 0)),
                   int(data.get("kv_cache_bytes", 0)))


def plan(inventory: Inventory, nodes: list[NodeBudget], reserve_bytes: int = DEFAULT_RESERVE_BYTES,
         allow_disk: bool = False, replicas: str = "0", heat: np.ndarray | None = None,
         shares: list[int] | None = None) -> Placement:
    """Spread every MoE layer's experts over all nodes, each expert placed exactly once: by expert speed
    when every node has one and the experts fit in memory, else by usable memory. Then replicas: "0"
    none; "1" a second copy of every worker's expert on another node, refused if it does not fit; "auto"
    as many second copies as the memory left over holds, the most routed first (heat: [num_layers,
    num_experts] routing counts, when known). shares: bytes per node to share the experts by when not by
    speed, instead of the usable memory (context_plan.py keeps the shares a shorter context gave)."""
    if replicas not in REPLICA_MODES:
        raise PlacementError(f"replicas must be one of {', '.join(REPLICA_MODES)}, not {replicas!r}")
    head = _head_node(nodes)
    if reserve_bytes < 0:
        raise PlacementError(f"reserve_bytes must not be negative, not {reserve_bytes}")
    if head.memory_bytes - reserve_bytes < inventory.head_bytes:
        raise PlacementError(
            f"head node '{head.name}' needs {format_bytes(inventory.head_bytes)} for attention, dense layers, shared "
            f"experts, embeddings and the KV cache ({format_bytes(inventory.kv_cache_bytes)} of it), but offers "
            f"{format_bytes(head.memory_bytes - reserve_bytes)} after the {format_bytes(reserve_bytes)} reserve; give it "
            "more memory, make a bigger machine the head, or lower context / max_sequences")
    usable = [max(0, n.memory_bytes - reserve_bytes - (inventory.head_bytes if n is head else 0)) for n in nodes]
    total, available = inventory.total_expert_bytes, sum(usable)
    by_speed = total <= available and all(n.expert_gbps is not None for n in nodes)
    if by_speed:
        weights = _speed_shares(total, usable, [n.expert_gbps for n in nodes])
    else:  # with no memory left anywhere (only possible with allow_disk), share the disk paging equally
        weights = (shares or usable) if available > 0 else [1] * len(nodes)
    owner = _spread(inventory, weights)
    fits = total <= available and _fit_to_budgets(owner, inventory, weights, usable)
    if by_speed and not fits:  # whole experts cannot meet the speed shares node by node; memory's shares may
        by_speed, weights = False, shares or usable
        owner = _spread(inventory, weights)
        fits = _fit_to_budgets(owner, inventory, weights, usable)
    if not fits and not allow_disk:
        why = (f"the routed experts need {format_bytes(total)} but {count_of(len(nodes), 'node')} "
               f"{'has' if len(nodes) == 1 else 'have'} {format_bytes(available)} usable for them"
               if total > available else
               "the routed experts fit in total but not node by node, whole experts being too coarse for the "
               "room left")
        raise PlacementError(_shortfall(inventory, nodes, head, reserve_bytes, usable, owner, why))
    placement = dataclasses.replace(_placement(inventory, nodes, head, usable, owner, disk_backed=not fits),
                                    by_speed=by_speed)
    if replicas == "0" or not fits:  # disk-backed: no memory is left over to copy into
        return placement
    copies, copy_bytes = _replicas(inventory, nodes, nodes.index(head), owner, usable, replicas == "1", heat)
    return dataclasses.replace(placement, replicas=copies, replica_bytes=copy_bytes)


def _replicas(inventory: Inventory, nodes: list[NodeBudget], head: int, owner: np.ndarray, usable: list[int],
              every_expert: bool, heat: np.ndarray | None) -> tuple[dict, dict]:
    """Second copies of the workers' experts (the head's own need none: it cannot fail alone) in the room
    each node has left. A worker's share of a layer goes whole to one other node where it can, so that
    node can take the share over as one request; what does not fit there goes to the node with the most room."""
    spare = [u - b for u, b in zip(usable, _bytes_per_node(owner, inventory, len(nodes)))]
    layers, experts = np.nonzero((owner >= 0) & (owner != head))
    if every_expert:
        needed = int(inventory.expert_bytes[layers, experts].sum())
        if needed > sum(max(0, s) for s in spare):
            raise PlacementError(f"replicas: 1 needs {format_bytes(needed)} for a second copy of every worker's "
                                 f"experts, but the nodes have {format_bytes(sum(max(0, s) for s in spare))} left "
                                 "after their own share; use replicas: auto (as many as fit) or add memory")
    else:  # the most routed first; without counts, each layer's first experts before any layer's later ones
        rank = np.zeros_like(owner) if heat is None else -np.asarray(heat)
        within = np.array([np.count_nonzero(owner[layer, :expert] == owner[layer, expert])
                           for layer, expert in zip(layers, experts)], dtype=np.int64)
        order = np.lexsort((experts, layers, within, rank[layers, experts]))
        layers, experts = layers[order], experts[order]
    return _place_copies(inventory, layers, experts, owner[layers, experts], [n.name for n in nodes], spare,
                         every_expert)


def _place_copies(inventory: Inventory, layers: np.ndarray, experts: np.ndarray, sources: np.ndarray,
                  names: list[str], spare: list[int], strict: bool) -> tuple[dict, dict]:
    """Copies of (layer, expert) pairs, in the order given, each on a node other than its source (index into
    names) with room: the node already taking that source's share of the layer while it has room, else the
    one with the most. Pairs that fit nowhere are left out, or refused when strict (replicas: 1)."""
    copies: list[dict[int, list[int]]] = [{} for _ in names]
    taken: dict[tuple[int, int], int] = {}  # (source node, layer) -> the node holding that share's copies
    for layer, expert, source in zip(layers.tolist(), experts.tolist(), sources.tolist()):
        size = int(inventory.expert_bytes[layer, expert])
        target = taken.get((source, layer))
        if target is None or spare[target] < size:
            room = [n for n in range(len(names)) if n != source and spare[n] >= size]
            if not room:
                if strict:
                    raise PlacementError(f"replicas: 1 does not fit node by node: no node other than "
                                         f"'{names[source]}' has {format_bytes(size)} left for a copy of its "
                                         f"expert {expert} of layer {layer}; use replicas: auto or add memory")
                continue
            target = max(room, key=lambda n: (spare[n], -n))
            taken[source, layer] = target
        copies[target].setdefault(layer, []).append(expert)
        spare[target] -= size
    replicas = {names[n]: {layer: tuple(sorted(ids)) for layer, ids in sorted(per_layer.items())}
                for n, per_layer in enumerate(copies) if per_layer}
    replica_bytes = {names[n]: sum(int(inventory.expert_bytes[layer, ids].sum()) for layer, ids in per_layer.items())
                     for n, per_layer in enumerate(copies) if per_layer}
    return replicas, replica_bytes


def respread(placement: Placement, inventory: Inventory, lost: str, up: list[str]) -> tuple[dict, dict]:
    """Where a lost node's experts go while it is away: copies on the `up` nodes (workers that answer) in
    the room left after their own share and copies (with allow_disk, where experts are paged from disk,
    an even part each), each layer's part whole on one node where it fits.
    Experts with a copy on an up node or on the head need none; what fits nowhere stays with the head's
    fallback. Returns (copies, their bytes) per node, to add to placement.replicas."""
    covered = {(layer, e) for node in [*up, placement.head_node]
               for layer, ids in placement.held(node).items() for e in ids}
    pairs = [(layer, e) for layer, ids in placement.experts.get(lost, {}).items() for e in ids
             if (layer, e) not in covered]
    names = [lost, *up]
    spare = [0] + [placement.budgets[n] - placement.bytes_per_node[n] - placement.replica_bytes.get(n, 0) for n in up]
    layers = np.array([layer for layer, _ in pairs], np.int64)
    experts = np.array([e for _, e in pairs], np.int64)
    if placement.disk_backed and up:  # experts are paged from disk anyway: room on disk, shared evenly
        sizes = inventory.expert_bytes[layers, experts]
        even = int(sizes.sum()) // len(up) + int(sizes.max(initial=0))
        spare = [0] + [max(room, even) for room in spare[1:]]
    return _place_copies(inventory, layers, experts, np.zeros(len(pairs), np.int64), names, spare, strict=False)


def with_copies(placement: Placement, copies: dict, copy_bytes: dict) -> Placement:
    """The placement with more second copies (from respread) added to its replicas."""
    replicas = {node: dict(per_layer) for node, per_layer in placement.replicas.items()}
    for node, per_layer in copies.items():
        for layer, ids in per_layer.items():
            mine = replicas.setdefault(node, {})
            mine[layer] = tuple(sorted(set(mine.get(layer, ())) | set(ids)))
    replica_bytes = dict(placement.replica_bytes)
    for node, nbytes in copy_bytes.items():
        replica_bytes[node] = replica_bytes.get(node, 0) + nbytes
    return dataclasses.replace(placement, replicas=replicas, replica_bytes=replica_bytes)


def _head_node(nodes: list[NodeBudget]) -> NodeBudget:
    if not nodes:
        raise PlacementError("no nodes to place experts on; list nodes in the cluster config or start Ray workers")
    names = [n.name for n in nodes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PlacementError(f"node names must be unique; repeated: {', '.join(duplicates)}")
    heads = [n for n in nodes if n.is_head]
    if len(heads) > 1:
        raise PlacementError(f"only one node can be the head; marked: {', '.join(n.name for n in heads)}")
    return heads[0] if heads else nodes[0]  # unmarked: the first node is the head


def _speed_shares(total: int, usable: list[int], speeds: list[float]) -> list[int]:
    """Bytes of experts for each node in proportion to its speed, none past its memory: a node that would
    overflow keeps its memory's worth, and what it cannot take goes to the others by their speed.
    total <= sum(usable), so every byte finds a node."""
    shares = [0] * len(usable)
    open_nodes, left = set(range(len(usable))), total
    while open_nodes:
        speed = sum(speeds[n] for n in open_nodes)
        full = [n for n in open_nodes if left * speeds[n] / speed >= usable[n]]
        if not full:
            for n in open_nodes:
                shares[n] = int(left * speeds[n] / speed)
            break
        for n in full:
            shares[n] = usable[n]
            left -= usable[n]
            open_nodes.discard(n)
    return shares


def _spread(inventory: Inventory, weights: list[int]) -> np.ndarray:
    """owner[layer, expert] = node index (-1 on dense layers). Per layer, each node gets the floor of its
    proportional count; the remaining experts go to the nodes furthest behind their byte share so far
    (ties rotate with the layer), so rounding evens out over layers even when layer sizes differ."""
    num_nodes, total_weight = len(weights), sum(weights)
    owner = np.full(inventory.expert_bytes.shape, -1, dtype=np.int32)
    held = [0] * num_nodes  # bytes given to each node so far
    bytes_so_far = 0
    for rank, layer in enumerate(inventory.moe_layers):
        sizes = inventory.expert_bytes[layer]
        num_experts, layer_bytes = len(sizes), int(sizes.sum())
        bytes_so_far += layer_bytes
        counts = [num_experts * w // total_weight for w in weights]
        # Deficit against the proportional byte share, scaled by num_experts * total_weight to stay integral.
        deficit = [bytes_so_far * w * num_experts - (held[n] * num_experts + counts[n] * layer_bytes) * total_weight
                   for n, w in enumerate(weights)]
        eligible = [n for n in range(num_nodes) if weights[n] > 0]
        behind = sorted(eligible, key=lambda n: (-deficit[n], (n - rank) % num_nodes))
        for n in behind[:num_experts - sum(counts)]:
            counts[n] += 1
        owner[layer] = np.repeat(np.arange(num_nodes, dtype=np.int32), counts)
        for n in range(num_nodes):
            held[n] += int(sizes[owner[layer] == n].sum())
    return owner


def _fit_to_budgets(owner: np.ndarray, inventory: Inventory, weights: list[int], usable: list[int]) -> bool:
    """Move experts from over-budget nodes to nodes with room, preferring moves that bring both nodes
    closer to their proportional count and leaving each node some expert of every layer. Each move
    lowers the total overflow, so this ends. False if some node stays over budget."""
    num_nodes, total_weight = len(weights), sum(weights)
    held = _bytes_per_node(owner, inventory, num_nodes)
    while True:
        over = [n for n in range(num_nodes) if held[n] > usable[n]]
        if not over:
            return True
        source = max(over, key=lambda n: (held[n] - usable[n], -n))
        best = None
        for layer in inventory.moe_layers:
            row = owner[layer]
            ids = np.flatnonzero(row == source)
            if len(ids) == 0:
                continue
            expert = int(ids[-1])
            size = int(inventory.expert_bytes[layer, expert])
            # count - proportional count, scaled by total_weight
            excess = [int((row == n).sum()) * total_weight - len(row) * weights[n] for n in range(num_nodes)]
            for target in range(num_nodes):
                if target != source and weights[target] > 0 and usable[target] - held[target] >= size:
                    key = (len(ids) > 1, excess[source] - excess[target], size, -layer, -target)
                    if best is None or key > best[0]:
                        best = (key, layer, expert, target, size)
        if best is None:
            return False
        _, layer, expert, target, size = best
        owner[layer, expert] = target
        held[source] -= size
        held[target] += size


def _bytes_per_node(owner: np.ndarray, inventory: Inventory, num_nodes: int) -> list[int]:
    held = np.zeros(num_nodes, dtype=np.int64)
    placed = owner >= 0
    np.add.at(held, owner[placed], inventory.expert_bytes[placed])
    return [int(b) for b in held]


def _placement(inventory: Inventory, nodes: list[NodeBudget], head: NodeBudget, usable: list[int],
               owner: np.ndarray, disk_backed: bool) -> Placement:
    held = _bytes_per_node(owner, inventory, len(nodes))
    experts = {node.name: {layer: tuple(int(e) for e in np.flatnonzero(owner[layer] == n))
                           for layer in inventory.moe_layers if (owner[layer] == n).any()}
               for n, node in enumerate(nodes)}
    return Placement(experts, {node.name: held[n] for n, node in enumerate(nodes)},
                     {node.name: usable[n] for n, node in enumerate(nodes)}, disk_backed, head.name,
                     head_weight_bytes=inventory.head_bytes - inventory.kv_cache_bytes,
                     kv_cache_bytes=inventory.kv_cache_bytes)


def _shortfall(inventory: Inventory, nodes: list[NodeBudget], head: NodeBudget, reserve_bytes: int,
               usable: list[int], owner: np.ndarray, problem: str) -> str:
    needed = _bytes_per_node(owner, inventory, len(nodes))
    on_head = [format_bytes(inventory.head_bytes - inventory.kv_cache_bytes), format_bytes(inventory.kv_cache_bytes)]
    rows = [[_node_label(node.name, head.name), format_bytes(node.memory_bytes), format_bytes(reserve_bytes),
             *(on_head if node is head else ["", ""]), format_bytes(usable[n]), format_bytes(needed[n]),
             format_bytes(max(0, needed[n] - usable[n]))] for n, node in enumerate(nodes)]
    rows.append(["total", format_bytes(sum(n.memory_bytes for n in nodes)), format_bytes(reserve_bytes * len(nodes)),
                 *on_head, format_bytes(sum(usable)), format_bytes(sum(needed)),
                 format_bytes(sum(max(0, need - room) for need, room in zip(needed, usable)))])
    header = ["node", "memory", "reserve", "head weights", "KV cache", "usable", "experts need", "short"]
    return f"{problem}:\n{_render(header, rows)}\n{ALLOW_DISK_HINT}"


def _node_label(name: str, head_name: str) -> str:
    return f"{name} (head)" if name == head_name else name


def count_of(count: int, noun: str) -> str:
    """'1 node', '3 nodes'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_bytes(nbytes: int) -> str:
    """In the unit that shows the number: '512.0 MiB', '1.3 GiB' (GiB is 2^30 bytes, as `free -g` counts)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} B" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _span(values: list, fmt: str) -> str:
    """'lo-hi' over layers, or one value when they agree."""
    if not values:
        return ""
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def _render(header: list[str], rows: list[list[str]]) -> str:
    """Columns aligned for a terminal: names left, numbers right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip() for row in [header, *rows])
