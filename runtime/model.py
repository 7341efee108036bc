"""The deepseek2 forward pass (Kimi K2.x, DeepSeek V3): embeddings, MLA, dense and MoE FFNs, output head.

The model never knows where routed experts live: it calls `experts.start(layer, hidden, ids, weights)`.
Shapes: T tokens in the step, D = n_embd, V = vocab size.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from .kv_cache import KVCache, Segment
from .config import ModelConfig
from .experts import Experts, LocalExperts
from .ggml_backends import ComputeDevice
from .ggml_forward import KV_BLOCK_MIN, StepGraphs, StepShape, rows_within_scores
from .ggml_graph import GraphMemory, ScheduledMemory
from .ggml_ops import COMPUTABLE_TYPES, BufferWeight, GgmlRunner, RepackedWeight, Weight, repack
from .gguf_file import GGUFModelFile


REPACK_CHOICES = ("none", "experts", "head", "all")
STEP_SHAPES_KEPT = 8
MAX_TOKENS_OF_KEPT_STEPS = 64


def device_weight_names(model_file: GGUFModelFile) -> list[str]:
    """The weights a compute device holds for the head: all but the routed experts and the token embeddings
    (a step reads a few rows of those, on the CPU)."""
    return [n for n in model_file.tensors if "_exps." not in n and n != "token_embd.weight"]


def device_weight_bytes(model_file: GGUFModelFile) -> int:
    return sum(model_file.info(name).nbytes for name in device_weight_names(model_file))


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
    the rows that share its step (and with "all", prompt-sized steps run the experts grouped by expert,
    as dense interleaved GEMMs). Routed experts otherwise run one row at a time even when interleaved, so
    "none" and "experts" give every sequence the same logits whatever it is batched with.

    device: a compute device (ggml_backends.py) that holds the head's weights (all but the token embeddings
    and the routed experts, which stay in host memory) and runs the ops that read them; the head's weights are
    then not interleaved. device_experts (layer -> expert ids): routed experts it also holds copies of and
    computes (the step is then cut at every MoE layer, where the host gives each pair to the device or the CPU).
    """

    def __init__(self, model_file: GGUFModelFile, runner: GgmlRunner | None = None, experts: Experts | None = None,
                 repack: str = "head", progress: bool = False, device: ComputeDevice | None = None,
                 device_experts: Mapping[int, Sequence[int]] | None = None):
        if repack not in REPACK_CHOICES:
            raise ValueError(f"repack must be one of {', '.join(REPACK_CHOICES)}, not '{repack}'")
        self.file = model_file
        self.config = checked_config(model_file)
        self.runner = runner or GgmlRunner()
        self.device = device
        self.repack_head = repack in ("head", "all") and device is None
        self.experts = experts or self._local_experts(repack in ("experts", "all"), progress, device_experts)
        self.output_name = "output.weight" if model_file.has("output.weight") else "token_embd.weight"
        self._steps: OrderedDict[StepShape, StepGraphs] = OrderedDict()
        self._watched_caches: set[int] = set()
        self._dropped_caches: list[int] = []

    def _local_experts(self, interleave: bool, progress: bool, on_device: Mapping[int, Sequence[int]] | None
                       ) -> LocalExperts:
        """Every routed expert in this process; interleaving copies them all, and the device its own, with a
        progress bar over bytes."""
        copied = sum(self.file.info(f"blk.{layer}.ffn_{kind}_exps.weight").nbytes // self.config.num_experts
                     * len(experts) for layer, experts in (on_device or {}).items()
                     for kind in self.file.expert_kinds(layer))
        total = copied + (self.file.routed_expert_bytes() if interleave else 0)
        with tqdm(total=total, unit="B", unit_scale=True, desc="copying experts", disable=not (progress and total),
                  leave=False) as bar:
            return LocalExperts(self.file, self.runner, self.config.moe_layers, self.config.num_experts,
                                repack=interleave, on_bytes=bar.update, grouped=self.repack_head, device=self.device,
                                on_device=on_device)

    @lru_cache(maxsize=None)
    def weight(self, name: str) -> Weight | BufferWeight | np.ndarray:
        """A ggml Weight over the mapped bytes (or its copy: repacked, or on the device), or a float32 array for
        small F32 vectors (norms, biases)."""
        info = self.file.info(name)
        raw = self.file.raw(name)
        if self.device is not None and name != "token_embd.weight":
            placed = self.device.place(Weight(info.ggml_type, info.ne, raw))
            self.file.release(name)
            return placed
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
        """Map (and repack, or place on the device) every head weight now, reading in the pages of those left
        mapped, with a progress bar over bytes, instead of during the first token: on a 340 GB model the head's
        share alone is 9 GB, which page faults during the first token would read 4 KB at a time. The token
        embeddings stay on disk until used: a step reads a few rows of them."""
        names = ["token_embd.weight", *device_weight_names(self.file)]
        total = sum(self.file.info(n).nbytes for n in names)
        desc = "loading head weights" + (f" onto {self.device.info.name}" if self.device is not None else "")
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
            for name in names:
                if not isinstance(self.weight(name), BufferWeight) and name != "token_embd.weight":
                    self.file.prefetch(name)
                bar.update(self.file.info(name).nbytes)

    def layer_weight(self, layer: int, name: str) -> Weight | np.ndarray:
        return self.weight(f"blk.{layer}.{name}")

    def new_cache(self, capacity: int) -> KVCache:
        """A cache of at least `capacity` positions, rounded up to whole blocks of KV_BLOCK_MIN: every step then
        attends whole blocks, and ggml's sums over the positions run alike whatever the length, so a row's
        keys and values do not depend on how far its cache is filled (prompt reuse gives a cold run's rows)."""
        capacity = -(-capacity // KV_BLOCK_MIN) * KV_BLOCK_MIN
        if self.device is None:
            return KVCache(self.config, capacity)
        return KVCache(self.config, capacity, memory_for=self.device.kv_layers)

    def prefill_rows(self, cache: KVCache, wanted: int) -> int:
        """How many of `wanted` prompt rows one step may give this cache (its attention's memory is bounded)."""
        return rows_within_scores(cache, wanted, self.config.num_heads)

    @property
    def routes_in_graph(self) -> bool:
        """llama.cpp's in-graph routing has no group limit; models with one are routed on the host."""
        return self.config.num_expert_groups <= 1

    def experts_in_graph(self, layer: int, num_tokens: int):
        """The layer's expert tensors if the forward graph computes them itself for a step of num_tokens:
        every expert is in this process, they run no faster outside, and the graph can route."""
        if not self.routes_in_graph:
            return None
        return self.experts.graph_weights(layer, num_tokens * self.config.num_experts_used)

    @lru_cache(maxsize=None)
    def router_bias(self, layer: int) -> np.ndarray | None:
        """The bias routing adds to the router's scores, for the host's routing (the graph's reads `weight`)."""
        name = f"blk.{layer}.exp_probs_b.bias"
        return self.file.raw(name).view(np.float32) if self.file.has(name) else None

    def graph_memory(self) -> GraphMemory | ScheduledMemory:
        """Where a step's graphs keep their intermediates, and what computes them."""
        return GraphMemory() if self.device is None else ScheduledMemory(self.device)

    def forward(self, tokens: np.ndarray, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        """tokens: [T] for the rows of every segment; advances each segment's cache by its row count.

        Returns logits [T, V] if all_logits, else each segment's last `logits` rows, in order.
        """
        segments = list(segments)
        graphs = self._step_graphs(StepShape.of(segments, all_logits), segments)
        logits = graphs.run(np.asarray(tokens, np.int32), segments)
        for seg in segments:
            seg.cache.length += seg.count
        return logits

    def _step_graphs(self, shape: StepShape, segments: list[Segment]) -> StepGraphs:
        """The planned graphs of this step shape: reused while it holds (decode rebuilds when a sequence crosses
        a cache block), dropped with the last cache they write into or when STEP_SHAPES_KEPT newer shapes ran.
        Prompt-sized steps are built for each use."""
        while self._dropped_caches:
            serial = self._dropped_caches.pop()
            for old in [k for k in self._steps if any(seg[0] == serial for seg in k.segments)]:
                del self._steps[old]
        graphs = self._steps.pop(shape, None)
        if graphs is None:
            graphs = StepGraphs(self, shape, segments)
            for seg in segments:
                if seg.cache.serial not in self._watched_caches:
                    self._watched_caches.add(seg.cache.serial)
                    weakref.finalize(seg.cache, self._forget_cache, seg.cache.serial)
        if shape.num_tokens <= MAX_TOKENS_OF_KEPT_STEPS:  # a prompt chunk's graphs hold hundreds of MB
            self._steps[shape] = graphs
        while len(self._steps) > STEP_SHAPES_KEPT:
            self._steps.popitem(last=False)
        return graphs

    def _forget_cache(self, serial: int) -> None:
        # Runs wherever the cache is collected, maybe inside forward(): only note it here.
        self._watched_caches.discard(serial)
        self._dropped_caches.append(serial)
