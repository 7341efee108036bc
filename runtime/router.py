"""Expert routing as llama.cpp's build_moe_ffn does it: pure numpy over the router logits."""
from __future__ import annotations

import numpy as np

from .config import GATING_SIGMOID, GATING_SOFTMAX, ModelConfig

# llama.cpp clamps the sum of selected weights to the smallest normal float16 before normalising.
MIN_WEIGHT_SUM = np.float32(6.103515625e-5)


def gate_probs(logits: np.ndarray, gating_func: int) -> np.ndarray:
    """logits: [T, E] -> unbiased per-expert scores [T, E]."""
    if gating_func == GATING_SIGMOID:
        # ggml: 1.f / (1.f + expf(-x)) in float32, with a correctly rounded expf.
        exp_neg = np.exp(-logits.astype(np.float64)).astype(np.float32)
        return np.float32(1.0) / (np.float32(1.0) + exp_neg)
    if gating_func == GATING_SOFTMAX:
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
    raise ValueError(f"expert gating function {gating_func} is not supported (1 = softmax, 2 = sigmoid)")


def top_k_desc(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, largest first; ties keep the lower index first."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k].astype(np.int32)


def mask_to_top_groups(selection: np.ndarray, num_groups: int, groups_used: int) -> np.ndarray:
    """DeepSeek-V3 group-limited routing: keep the groups whose two best scores sum highest."""
    num_tokens, num_experts = selection.shape
    grouped = selection.reshape(num_tokens, num_groups, num_experts // num_groups)
    group_scores = np.sort(grouped, axis=-1)[:, :, -2:].sum(axis=-1)  # [T, G]
    keep = top_k_desc(group_scores, groups_used)
    mask = np.full((num_tokens, num_groups), True)
    np.put_along_axis(mask, keep, False, axis=1)
    return np.where(np.repeat(mask, num_experts // num_groups, axis=1), -np.inf, selection)


def route(logits: np.ndarray, selection_bias: np.ndarray | None, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """logits: [T, E] router outputs -> (expert ids [T, k] int32, weights [T, k] float32).

    The bias steers selection only; the weights are the unbiased scores of the chosen experts,
    optionally renormalised and then scaled.
    """
    probs = gate_probs(logits, config.gating_func)
    selection = probs if selection_bias is None else probs + selection_bias
    if config.num_expert_groups > 1:
        selection = mask_to_top_groups(selection, config.num_expert_groups, config.num_expert_groups_used)
    ids = top_k_desc(selection, config.num_experts_used)
    weights = np.take_along_axis(probs, ids, axis=1)
    if config.expert_weights_norm:  # ggml sums rows in float64 and rounds once
        total = weights.sum(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
        weights = weights / np.maximum(total, MIN_WEIGHT_SUM)
    if config.expert_weights_scale not in (0.0, 1.0):
        weights = weights * np.float32(config.expert_weights_scale)
    return ids, weights.astype(np.float32)
