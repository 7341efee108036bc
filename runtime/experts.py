"""Routed experts behind one seam: the model calls experts.start(layer, hidden, ids, weights)() or, when
every expert is in this process, builds graph_weights(layer) into its own graph.

ExpertShard owns the weights of some (layer, expert) pairs and runs them with ggml: either as views of
the mapped GGUF (only the pages of its own experts are ever read) or from compact buffers holding just
its experts (weights streamed from another machine). LocalExperts serves every expert in this process;
cluster/ provides the remote implementation (gRPC fan-out to shards on other machines).
"""
from __future__ import annotations

import mmap
import threading
from collections import OrderedDict
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from .ggml_experts import grouped_expert_ffn, runs_grouped
from .ggml_backends import ComputeDevice
from .ggml_graph import PlannedGraph, ScheduledMemory
from .ggml_ops import BufferWeight, GgmlRunner, RepackedWeight, Weight, moe_subgraph, repack
from .gguf_file import ByteRange, GGUFModelFile

PAGE_BYTES = 4096
PLANNED_SLOTS = 64  # calls with up to this many (row, slot) pairs run on planned graphs
PLANNED_GRAPHS_KEPT = 512


class Experts(Protocol):
    def start(self, layer: int, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> Callable[[], np.ndarray]:
        """Begin sum_j weights[t, j] * expert_{ids[t, j]}(hidden[t]) for hidden [T, D], ids and weights
        [T, k]; the returned callable gives the [T, D] result. Work may run while the caller does other
        work (the shared expert) before it asks for the result."""
        ...

    def graph_weights(self, layer: int, slots: int) -> Mapping[str, Weight | RepackedWeight] | None:
        """Every expert of a layer as ggml tensors by kind (gate, up, down or gate_up, down) when they are
        all in this process, so the model may compute them inside its own graph for a step of `slots` (row,
        slot) pairs; None when they run elsewhere or faster outside it."""
        ...


class ExpertShard:
    """Experts of some layers, each layer's held as ggml tensors [in, out, held experts] per kind (gate,
    up, down or gate_up, down), with a map from global expert id to index in those tensors.

    grouped: prompt-sized calls over interleaved experts may run grouped by expert (ggml_experts.py), which
    is faster but rounds a row with its neighbours; off, every row's result is independent of the others."""

    def __init__(self, runner: GgmlRunner, tensors: Mapping[int, Mapping[str, Weight | BufferWeight]],
                 local_index: Mapping[int, np.ndarray], device: ComputeDevice | None = None):
        """device: where the tensors lie, if on a compute device (ggml_backends.py), whose backends then run them."""
        self.runner, self.device = runner, device
        self.tensors = dict(tensors)
        self.local_index = dict(local_index)  # layer -> [num_experts] int32, -1 where not held
        self.grouped = False
        self._paged_from: GGUFModelFile | None = None  # see read_on_demand
        self._paged_in: set[tuple[int, int]] = set()
        # Decode-sized calls reuse planned graphs (per layer and shape): building one costs more than its math.
        self._graphs: OrderedDict[tuple[int, int, int], PlannedGraph] = OrderedDict()
        self._graphs_lock = threading.Lock()

    @classmethod
    def from_model_file(cls, model_file: GGUFModelFile, runner: GgmlRunner, owned: Mapping[int, Sequence[int]],
                        repack_experts: bool = False, on_bytes: Callable[[int], None] = lambda n: None,
                        device: ComputeDevice | None = None) -> "ExpertShard":
        """Views over the whole expert tensors of each layer: zero-copy, and only owned experts are read.
        With repack_experts, the owned experts alone are copied into ggml's faster interleaved layout; with a
        device, into its memory. on_bytes hears of each copy (`touch` then reads what stayed mapped)."""
        copied = repack_experts or device is not None
        tensors, local_index = {}, {}
        for layer, experts in owned.items():
            experts = sorted(experts)
            num_experts = model_file.info(f"blk.{layer}.ffn_down_exps.weight").ne[2]
            index = np.full(num_experts, -1, np.int32)
            tensors[layer] = {}
            for kind in model_file.expert_kinds(layer):
                info = model_file.info(f"blk.{layer}.ffn_{kind}_exps.weight")
                weight = Weight(info.ggml_type, info.ne, model_file.raw(info.name))
                if copied:
                    chosen = weight if experts == list(range(num_experts)) else _gather_experts(weight, experts)
                    if device is not None:  # the file's mapping stays: the CPU's shard reads it too
                        weight = device.place(chosen)
                    else:
                        weight = repack(chosen)
                        model_file.release(info.name)
                    if isinstance(weight, BufferWeight):
                        on_bytes(weight.nbytes // weight.ne[-1] * len(experts))
                tensors[layer][kind] = weight
            # Copies hold the owned experts only, in order; views keep the file's numbering.
            index[experts] = np.arange(len(experts)) if copied else experts
            local_index[layer] = index
        return cls(runner, tensors, local_index, device)

    def runs_grouped(self, layer: int, slots: int) -> bool:
        """Whether a call with this many (row, slot) pairs runs grouped by expert."""
        return self.grouped and runs_grouped(self.tensors[layer], slots)

    def owned(self, layer: int) -> np.ndarray:
        """Global ids of the experts this shard holds for a layer, ascending."""
        return np.nonzero(self.local_index[layer] >= 0)[0]

    def _local_ids(self, layer: int, ids: np.ndarray) -> np.ndarray:
        index = self.local_index.get(layer)
        if index is None:
            raise KeyError(f"this shard holds no experts of layer {layer}")
        local = index[ids]
        if (local < 0).any():
            raise KeyError(f"this shard does not hold experts {sorted(set(ids[local < 0].tolist()))} of layer {layer}")
        return local

    def _ffn(self, layer: int, hidden: np.ndarray, local_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        num_tokens, k = local_ids.shape
        t = self.tensors[layer]
        self._page_in(layer, local_ids)
        if self.runs_grouped(layer, num_tokens * k):
            return grouped_expert_ffn(self.runner, t, hidden, local_ids, weights)
        if self.device is not None and num_tokens * k > PLANNED_SLOTS:  # built for this call, as below
            return self._run(self._plan_ffn(layer, num_tokens, k), hidden, local_ids, weights)
        if num_tokens * k > PLANNED_SLOTS:  # prompt-sized: planned memory would be large, and building is cheap beside the math
            return self.runner.expert_ffn(t.get("gate"), t.get("up"), t["down"], hidden, local_ids, weights,
                                          gate_up=t.get("gate_up"))
        with self._graphs_lock:
            graph = self._graphs.pop((layer, num_tokens, k), None) or self._plan_ffn(layer, num_tokens, k)
            self._graphs[(layer, num_tokens, k)] = graph
            if len(self._graphs) > PLANNED_GRAPHS_KEPT:
                self._graphs.popitem(last=False)
            return self._run(graph, hidden, local_ids, weights)

    @staticmethod
    def _run(graph: PlannedGraph, hidden: np.ndarray, local_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        graph.inputs["hidden"][...] = hidden
        graph.inputs["ids"][...] = local_ids
        graph.inputs["weights"][...] = weights.reshape(*local_ids.shape, 1)
        graph.compute()
        return graph.read("out", 2)

    def _plan_ffn(self, layer: int, num_tokens: int, k: int) -> PlannedGraph:
        """A planned graph of this layer's experts for num_tokens rows of k slots (decode-sized steps)."""
        memory = None if self.device is None else ScheduledMemory(self.device)
        graph = PlannedGraph(self.runner, 64, memory)
        w = {kind: graph.weight(weight, num_tokens * k) for kind, weight in self.tensors[layer].items()}
        hidden = graph.input("hidden", (num_tokens, self.tensors[layer]["down"].ne[1]))
        ids, weights = graph.input("ids", (num_tokens, k), np.int32), graph.input("weights", (num_tokens, k, 1))
        graph.plan({"out": moe_subgraph(graph.ctx, w.get("gate"), w.get("up"), w["down"], w.get("gate_up"), hidden, ids,
                                        weights)})
        if memory is not None:
            memory.allocate()
        return graph

    def forward(self, layer: int, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """hidden [T, D], ids and weights [T, k], every id held here -> [T, D] weighted sums (slot order)."""
        return self._ffn(layer, hidden, self._local_ids(layer, ids), weights)

    def forward_pairs(self, layer: int, hidden: np.ndarray, rows: np.ndarray, experts: np.ndarray,
                      weights: np.ndarray) -> np.ndarray:
        """hidden [R, D]; pair p adds weights[p] * expert_{experts[p]}(hidden[rows[p]]) to row rows[p].

        Rows may carry any number of pairs. Pairs are added in the order given, so a row whose pairs come
        in slot order gets exactly the sum forward() would give it.
        """
        if len(rows) == 0:
            return np.zeros_like(hidden, dtype=np.float32)
        # One graph row per pair, then each hidden row's pairs summed in order. (Rows of several slots
        # would need padding, and ggml's interleaved mul_mat_id miscomputes rows that name an expert twice.)
        order = np.argsort(rows, kind="stable")
        rows, weights = rows[order], np.asarray(weights, np.float32)[order]
        local = self._local_ids(layer, experts[order])
        outputs = self._ffn(layer, np.ascontiguousarray(hidden[rows], np.float32), local[:, None], weights[:, None])
        return sum_pairs(rows, outputs, len(hidden))

    def read_on_demand(self, model_file: GGUFModelFile) -> None:
        """For experts read in place that this node's memory cannot hold all at once (allow_disk): no
        read-ahead around page faults, which would read neighbouring experts nobody asked for and evict
        ones in use (with an 8 MB read-ahead, paged experts never settled in memory); instead each request's
        experts are asked of the OS before they are computed, one read each."""
        for layer, kinds in self.tensors.items():
            for kind, weight in kinds.items():
                if not isinstance(weight, RepackedWeight):
                    info = model_file.info(f"blk.{layer}.ffn_{kind}_exps.weight")
                    model_file.advise(ByteRange(info.shard, info.offset, info.nbytes), mmap.MADV_RANDOM)
        self._paged_from = model_file

    def _page_in(self, layer: int, local_ids: np.ndarray) -> None:
        """Ask the OS for each expert the first time it is used (asking again costs a walk over its pages;
        an expert evicted since is read back by page faults)."""
        if self._paged_from is None:
            return
        for expert in np.unique(local_ids).tolist():
            if (layer, expert) in self._paged_in:
                continue
            self._paged_in.add((layer, expert))
            for kind, weight in self.tensors[layer].items():
                if not isinstance(weight, RepackedWeight):  # views: local ids are the file's expert ids
                    self._paged_from.advise(self._paged_from.expert_range(layer, expert, kind), mmap.MADV_WILLNEED)

    def holds(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Per expert id, whether this shard holds it for the layer."""
        index = self.local_index.get(layer)
        return np.zeros(len(experts), bool) if index is None else index[experts] >= 0

    def touch(self, on_bytes: Callable[[int], None] = lambda n: None) -> None:
        """Read every page of the held experts once, so the first tokens do not wait on the disk."""
        for layer, kinds in self.tensors.items():
            for weight in kinds.values():
                if isinstance(weight, RepackedWeight):
                    continue
                per_expert = weight.nbytes // weight.ne[-1]
                flat = weight.data.reshape(-1)
                for local in self.local_index[layer][self.local_index[layer] >= 0]:
                    chunk = flat[local * per_expert: (local + 1) * per_expert]
                    int(chunk[::PAGE_BYTES].sum())
                    on_bytes(per_expert)

    @property
    def nbytes(self) -> int:
        """Bytes of the experts this shard holds (not of the whole tensors it may view)."""
        total = 0
        for layer, kinds in self.tensors.items():
            held = int((self.local_index[layer] >= 0).sum())
            total += sum(w.nbytes // w.ne[-1] * held for w in kinds.values())
        return total


class ShardSet:
    """Several shards served as one: a worker that took over a lost worker's experts after it started.
    Pairs split over shards are computed one row each and summed as one shard would sum them."""

    def __init__(self, shards: Sequence[ExpertShard]):
        self.shards = list(shards)

    @classmethod
    def combine(cls, held: "ExpertShard | ShardSet | None", more: ExpertShard) -> "ExpertShard | ShardSet":
        if held is None:
            return more
        return cls([*(held.shards if isinstance(held, ShardSet) else [held]), more])

    def holds(self, layer: int, experts: np.ndarray) -> np.ndarray:
        return np.logical_or.reduce([shard.holds(layer, experts) for shard in self.shards])

    def forward_pairs(self, layer: int, hidden: np.ndarray, rows: np.ndarray, experts: np.ndarray,
                      weights: np.ndarray) -> np.ndarray:
        which = np.full(len(experts), -1)
        for index in reversed(range(len(self.shards))):  # the first shard holding an expert computes it
            which[self.shards[index].holds(layer, experts)] = index
        if (which < 0).any():
            raise KeyError(f"this shard does not hold experts {sorted(set(experts[which < 0].tolist()))} of layer {layer}")
        if (which == which[0]).all():
            return self.shards[which[0]].forward_pairs(layer, hidden, rows, experts, weights)
        order = np.argsort(rows, kind="stable")
        rows, experts, weights, which = rows[order], experts[order], np.asarray(weights, np.float32)[order], which[order]
        outputs = np.empty((len(rows), hidden.shape[1]), np.float32)
        for index in np.unique(which):
            mine = which == index
            outputs[mine] = self.shards[index].forward_pairs(layer, hidden[rows[mine]], np.arange(mine.sum()),
                                                             experts[mine], weights[mine])
        return sum_pairs(rows, outputs, len(hidden))


def sum_pairs(rows: np.ndarray, outputs: np.ndarray, num_rows: int) -> np.ndarray:
    """[num_rows, D] sums of the pair outputs [P, D] of each row, rows ascending (stable), added slot by
    slot in the order given, as ggml adds a row's slots (np.add.reduceat adds in another order). Whoever
    computes the outputs, the same pairs give the same bits."""
    partial = np.zeros((num_rows, outputs.shape[1]), np.float32)
    used, starts, counts = np.unique(rows, return_index=True, return_counts=True)
    sums = outputs[starts]
    for j in range(1, counts.max(initial=1)):
        more = counts > j
        sums[more] += outputs[starts[more] + j]
    partial[used] = sums
    return partial


def _gather_experts(weight: Weight, experts: Sequence[int]) -> Weight:
    """A compact copy of some experts of an expert tensor (its last axis), in the order given."""
    per_expert = weight.nbytes // weight.ne[-1]
    flat = weight.data.reshape(-1)
    data = np.concatenate([flat[e * per_expert: (e + 1) * per_expert] for e in experts])
    return Weight(weight.ggml_type, weight.ne[:-1] + (len(experts),), data)


class LocalExperts:
    """Every routed expert of every MoE layer, in this process; some of them copied into a compute device's memory
    too (`on_device`: layer -> expert ids), where that copy computes them."""

    def __init__(self, model_file: GGUFModelFile, runner: GgmlRunner, moe_layers: Sequence[int], num_experts: int,
                 repack: bool = False, on_bytes: Callable[[int], None] = lambda n: None, grouped: bool = False,
                 device: ComputeDevice | None = None, on_device: Mapping[int, Sequence[int]] | None = None):
        self.shard = ExpertShard.from_model_file(model_file, runner, {layer: range(num_experts) for layer in moe_layers},
                                                 repack, on_bytes)
        self.shard.grouped = grouped
        # The device's copies first: ShardSet gives each expert to the first shard that holds it.
        self.on_device = None if not on_device else ShardSet(
            [ExpertShard.from_model_file(model_file, runner, on_device, on_bytes=on_bytes, device=device), self.shard])

    def start(self, layer: int, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> Callable[[], np.ndarray]:
        if self.on_device is None:
            return lambda: self.shard.forward(layer, hidden, ids, weights)
        num_tokens, k = ids.shape
        rows = np.repeat(np.arange(num_tokens), k)
        return lambda: self.on_device.forward_pairs(layer, hidden, rows, ids.reshape(-1), weights.reshape(-1))

    def graph_weights(self, layer: int, slots: int) -> Mapping[str, Weight | BufferWeight] | None:
        """None where some experts lie on the device (the step is cut there, and the host splits the pairs)."""
        if self.on_device is not None or self.shard.runs_grouped(layer, slots):
            return None
        return self.shard.tensors[layer]

    def read_on_demand(self, model_file: GGUFModelFile) -> None:
        """See ExpertShard.read_on_demand; inside the model's graph, experts are then read page by page."""
        self.shard.read_on_demand(model_file)
