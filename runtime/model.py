"""The deepseek2 forward pass (Kimi K2.x, DeepSeek V3): embeddings, MLA, dense and MoE FFNs, output head.

The model never knows where routed experts live: it calls `experts.start(layer, hidden, ids, weights)`.
Shapes: T tokens in the step, D = n_embd, V = vocab size.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .attention import KVCache, MLAttention, Segment, rms_norm
from .config import ModelConfig
from .experts import Experts, LocalExperts
from .ggml_ops import COMPUTABLE_TYPES, GgmlRunner, RepackedWeight, Weight, repack
from .gguf_file import GGUFModelFile
from .router import route


REPACK_CHOICES = ("none", "experts", "head", "all")


def checked_config(model_file: GGUFModelFile) -> ModelConfig:
    """The file's hyperparameters, once every tensor the model reads is there with the shape they imply and
    a type ggml computes (a GGUFError otherwise). Reads headers only."""
    config = ModelConfig.from_metadata(model_file.metadata, source=str(model_file.path))
    shapes, optional = config.tensor_shapes(
        has_fused_gate_up=model_file.has(f"blk.{config.num_dense_layers}.ffn_gate_up_exps.weight"))
    model_file.check_tensors(shapes, optional, COMPUTABLE_TYPES)
    return config


class KimiModel:
    """repack: which weights get copied into ggml's faster interleaved layout: "none" (everything read
    in place from the mapped file), "experts" (the routed experts only), "head" (the weights the head node
    holds: attention, dense and shared FFNs, output; the default) or "all" (both).

    Interleaved matmuls round rows in groups of four, so with "head" or "all" a row's logits depend on
    the rows that share its step. Routed experts run one row at a time even when interleaved, so "none"
    and "experts" give every sequence the same logits whatever it is batched with.
    """

    def __init__(self, model_file: GGUFModelFile, runner: GgmlRunner | None = None, experts: Experts | None = None,
                 repack: str = "head", progress: bool = False):
        if repack not in REPACK_CHOICES:
            raise ValueError(f"repack must be one of {', '.join(REPACK_CHOICES)}, not '{repack}'")
        self.file = model_file
        self.config = checked_config(model_file)
        self.runner = runner or GgmlRunner()
        self.repack_head = repack in ("head", "all")
        self.experts = experts or self._local_experts(repack in ("experts", "all"), progress)
        self.attention = MLAttention(self.config, self.runner, self.layer_weight)
        self.output_name = "output.weight" if model_file.has("output.weight") else "token_embd.weight"

    def _local_experts(self, interleave: bool, progress: bool) -> LocalExperts:
        """Every routed expert in this process; interleaving copies them all, with a progress bar over bytes."""
        total = self.file.routed_expert_bytes() if interleave else 0
        with tqdm(total=total, unit="B", unit_scale=True, desc="interleaving experts",
                  disable=not (progress and interleave), leave=False) as bar:
            return LocalExperts(self.file, self.runner, self.config.moe_layers, self.config.num_experts,
                                repack=interleave, on_bytes=bar.update)

    @lru_cache(maxsize=None)
    def weight(self, name: str) -> Weight | RepackedWeight | np.ndarray:
        """A ggml Weight over the mapped bytes (or its repacked copy), or a float32 array for small F32
        vectors (norms, biases)."""
        info = self.file.info(name)
        raw = self.file.raw(name)
        if len(info.ne) == 1:
            return raw.view(np.float32)
        weight = Weight(info.ggml_type, info.ne, raw)
        # Embeddings are read with get_rows, which has no repacked kernel; 3-D attention weights are
        # batched matmuls, which neither has.
        if self.repack_head and len(info.ne) == 2 and name != "token_embd.weight":
            weight = repack(weight)
            if isinstance(weight, RepackedWeight):
                self.file.release(name)
        return weight

    def load(self, progress: bool = True) -> None:
        """Map (and repack) every head weight now, with a progress bar over bytes, instead of during the
        first token: on a 340 GB model the head's share alone is tens of GB."""
        names = [n for n in self.file.tensors if "_exps." not in n]
        total = sum(self.file.info(n).nbytes for n in names)
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading head weights", disable=not progress,
                  leave=False) as bar:
            for name in names:
                self.weight(name)
                bar.update(self.file.info(name).nbytes)

    def layer_weight(self, layer: int, name: str) -> Weight | np.ndarray:
        return self.weight(f"blk.{layer}.{name}")

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity)

    def forward(self, tokens: np.ndarray, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        """tokens: [T] for the rows of every segment; advances each segment's cache by its row count.

        Returns logits [T, V] if all_logits, else the last row of each segment: [len(segments), V].
        """
        c = self.config
        segments = list(segments)
        x = self.runner.get_rows(self.weight("token_embd.weight"), np.asarray(tokens, np.int32))  # [T, D]
        for layer in range(c.num_layers):
            w = lambda name: self.layer_weight(layer, name)  # noqa: E731
            x = x + self.attention.forward(layer, rms_norm(x, w("attn_norm.weight"), c.rms_eps), segments)
            h = rms_norm(x, w("ffn_norm.weight"), c.rms_eps)
            x = x + (self._moe(layer, h) if c.is_moe_layer(layer) else self._swiglu(layer, h, ""))
        for seg in segments:
            seg.cache.length += seg.count
        if not all_logits:
            x = x[[s.start + s.count - 1 for s in segments]]
        return self.runner.matmul(self.weight(self.output_name), rms_norm(x, self.weight("output_norm.weight"), c.rms_eps))

    def _swiglu(self, layer: int, h: np.ndarray, suffix: str) -> np.ndarray:
        """Dense (suffix "") or shared-expert ("_shexp") FFN: down @ (silu(gate @ h) * (up @ h))."""
        w = lambda name: self.layer_weight(layer, f"ffn_{name}{suffix}.weight")  # noqa: E731
        return self.runner.ffn(w("gate"), w("up"), w("down"), h)

    def _moe(self, layer: int, h: np.ndarray) -> np.ndarray:
        router_logits = self.runner.matmul(self.layer_weight(layer, "ffn_gate_inp.weight"), h)  # [T, E]
        bias_name = f"blk.{layer}.exp_probs_b.bias"
        bias = self.weight(bias_name) if self.file.has(bias_name) else None
        ids, weights = route(router_logits, bias, self.config)
        routed = self.experts.start(layer, h, ids, weights)
        shared = self._swiglu(layer, h, "_shexp")  # computed while remote experts work
        return routed() + shared
