"""Routed experts for prompt-sized calls, grouped by expert.

ggml's mul_mat_id runs every (row, expert) pair through its vector kernels. When many rows share each
expert (a prompt: 512 tokens x 8 slots over a layer's experts), gathering each expert's rows and running
its matrix as a dense interleaved (repacked) GEMM is 1.5-2x faster here (k2-slice widths, Q4_K: 16 rows
over 16 experts 200 -> 136 ms, 512 rows 3.6 -> 2.3 s), as llama.cpp's newer repacked kernels do inside
mul_mat_id. The graph depends on the routing, so it is built for each call.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .ggml_graph import PlannedGraph
from .ggml_ops import GgmlRunner, RepackedWeight, Weight, ggml

GROUPED_MIN_SLOTS = 128  # (row, slot) pairs from which grouping pays (16 tokens of 8 experts)
# ... and only when experts get several rows each: 17 rows over K2's 384 experts (drafted tokens) are mostly one
# row per expert, and running them outside the graph cuts the pass at every layer (a step 4x slower)
GROUPED_MIN_ROWS_PER_EXPERT = 4


def runs_grouped(tensors: Mapping[str, Weight | RepackedWeight], slots: int) -> bool:
    """Whether a call with this many (row, slot) pairs over these expert tensors runs grouped by expert:
    when some of them are interleaved (types without interleaved kernels, such as Q6_K, run their
    per-expert matrices in place, as fast as in mul_mat_id)."""
    repacked = [w for w in tensors.values() if isinstance(w, RepackedWeight)]
    return (bool(repacked) and slots >= max(GROUPED_MIN_SLOTS, GROUPED_MIN_ROWS_PER_EXPERT * repacked[0].ne[2])
            and all(w.ne[1] % 8 == 0 for w in repacked))


def grouped_expert_ffn(runner: GgmlRunner, tensors: Mapping[str, Weight | RepackedWeight], x: np.ndarray,
                       ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The same sum as ggml_ops.moe_subgraph (x [T, D], ids and weights [T, k] -> [T, D], slots added in
    order), with each used expert's rows gathered and run through its own matrices."""
    num_tokens, k = ids.shape
    used = np.unique(ids)
    graph = PlannedGraph(runner, 64 + 16 * len(used))
    ctx, n_embd = graph.ctx, tensors["down"].ne[1]
    hidden = graph.external(np.ascontiguousarray(x, np.float32))
    # Row t * k + j of `slots` receives token t's slot j: every row is written exactly once.
    slots = ggml.ggml_new_tensor_2d(ctx, ggml.GGML_TYPE_F32, n_embd, num_tokens * k)
    for expert in used:
        token, slot = np.nonzero(ids == expert)
        rows = ggml.ggml_get_rows(ctx, hidden, graph.external(token.astype(np.int32)))
        w = {kind: graph.expert_weight(weight, expert) for kind, weight in tensors.items()}
        if "gate_up" in w:
            fused = ggml.ggml_mul_mat(ctx, w["gate_up"], rows)  # [2F, rows]
            n_ff, nb1 = fused.contents.ne[0] // 2, fused.contents.nb[1]
            act = ggml.ggml_swiglu_split(ctx, ggml.ggml_view_2d(ctx, fused, n_ff, len(token), nb1, 0),
                                         ggml.ggml_view_2d(ctx, fused, n_ff, len(token), nb1, 4 * n_ff))
        else:
            act = ggml.ggml_swiglu_split(ctx, ggml.ggml_mul_mat(ctx, w["gate"], rows), ggml.ggml_mul_mat(ctx, w["up"], rows))
        out = ggml.ggml_mul_mat(ctx, w["down"], act)  # [D, rows]
        slots = ggml.ggml_set_rows(ctx, slots, out, graph.external((token * k + slot).astype(np.int64)))
    experts = ggml.ggml_mul(ctx, ggml.ggml_reshape_3d(ctx, slots, n_embd, k, num_tokens),
                            graph.external(np.ascontiguousarray(weights, np.float32).reshape(num_tokens, k, 1)))
    nb1, nb2 = experts.contents.nb[1], experts.contents.nb[2]
    total = ggml.ggml_view_2d(ctx, experts, n_embd, num_tokens, nb2, 0)
    for j in range(1, k):
        total = ggml.ggml_add(ctx, total, ggml.ggml_view_2d(ctx, experts, n_embd, num_tokens, nb2, j * nb1))
    graph.plan({"out": ggml.ggml_cont(ctx, total) if k == 1 else total})
    graph.compute()
    return graph.read("out", 2)
