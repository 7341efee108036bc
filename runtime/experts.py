"""Routed experts behind one seam: the model calls experts.forward(layer, hidden, ids, weights).

ExpertShard owns the weights of some (layer, expert) pairs as zero-copy views of the GGUF and runs
them with ggml. LocalExperts serves every expert in this process; remote implementations (gRPC
fan-out to shards on other machines) live in cluster/ and honour the same protocol.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

from .ggml_ops import GgmlRunner, RepackedWeight, Weight, repack
from .gguf_file import GGUFModelFile


class Experts(Protocol):
    def forward(self, layer: int, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """hidden: [T, D]; ids, weights: [T, k] -> sum_j weights[t, j] * expert_{ids[t, j]}(hidden[t]): [T, D]."""
        ...


def expert_weight(model_file: GGUFModelFile, layer: int, kind: str, repacked: bool) -> Weight | RepackedWeight:
    """All experts of one layer's ffn_{kind}_exps tensor ([in, out, experts]): viewed in place, or
    copied into ggml's repacked layout (and the mapped pages released)."""
    info = model_file.info(f"blk.{layer}.ffn_{kind}_exps.weight")
    weight = Weight(info.ggml_type, info.ne, model_file.raw(info.name))
    if repacked:
        weight = repack(weight)
        if isinstance(weight, RepackedWeight):
            model_file.release(info.name)
    return weight


class ExpertShard:
    """The experts one process owns, per layer. Views cover each layer's whole tensors, so only the
    pages of experts actually used are ever read; `owned` says which experts this shard may run."""

    def __init__(self, model_file: GGUFModelFile, runner: GgmlRunner, owned: Mapping[int, Sequence[int]],
                 repack: bool = False):
        self.runner = runner
        self.owned = {layer: frozenset(int(e) for e in experts) for layer, experts in owned.items()}
        self._tensors = {layer: {kind: expert_weight(model_file, layer, kind, repack)
                                 for kind in model_file.expert_kinds(layer)} for layer in self.owned}

    def forward(self, layer: int, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        owned = self.owned.get(layer)
        if owned is None or not set(np.unique(ids).tolist()) <= owned:
            missing = sorted(set(np.unique(ids).tolist()) - (owned or set()))
            raise KeyError(f"this shard does not hold experts {missing[:8]} of layer {layer}")
        t = self._tensors[layer]
        return self.runner.expert_ffn(t.get("gate"), t.get("up"), t["down"], hidden, ids, weights,
                                      gate_up=t.get("gate_up"))


class LocalExperts:
    """Every routed expert of every MoE layer, in this process."""

    def __init__(self, model_file: GGUFModelFile, runner: GgmlRunner, moe_layers: Sequence[int], num_experts: int,
                 repack: bool = False):
        self.shard = ExpertShard(model_file, runner, {layer: range(num_experts) for layer in moe_layers}, repack)

    def forward(self, layer: int, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return self.shard.forward(layer, hidden, ids, weights)
