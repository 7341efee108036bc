"""The deepseek2 forward pass as ggml graphs, built op for op as llama.cpp's src/models/deepseek2.cpp builds it.

One step shape (which caches, how many new rows each, how many cached positions each attends) gets one
StepGraphs, built once and reused while the shape holds. With every routed expert in this process the
whole forward pass is ONE graph, routing (top-k) included. Where a layer's experts live elsewhere the pass
is cut there: one graph runs up to that layer's router logits, the host routes and hands the hidden rows
to the experts, a second graph runs the shared expert meanwhile, and the next graph resumes from
ffn_inp + (routed + shared), in llama.cpp's order of additions.

Cached positions are attended in blocks (llama.cpp pads its cache the same way): the unwritten positions are
masked out, and one step's graphs serve the next steps until a sequence crosses a block. Blocks grow with
the length (a quarter of it, at least KV_BLOCK_MIN), so padding wastes at most a quarter of the attention
and a long sequence rebuilds its graphs rarely (61 layers take ~40 ms to build).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from .config import GATING_SIGMOID, ModelConfig
from .experts import Experts
from .ggml_graph import GraphMemory, PlannedGraph, ScheduledMemory
from .ggml_ops import GgmlRunner, flash_attention, ggml, matmul_attention, moe_subgraph, mul_mat, swiglu_subgraph
from .kv_cache import KVCache, Segment
from .router import MIN_WEIGHT_SUM, route

KV_BLOCK_MIN = 64
ATTENTION_SCORES_BYTES = 1 << 30  # the most a sequence's attention scores may take in one step
ROPE_NORM_MODE = 0  # deepseek2 rotates adjacent pairs
TENSORS_PER_LAYER, TENSORS_PER_SEGMENT = 96, 32  # with room: running out aborts the process


def kv_positions(cache: KVCache, new_rows: int) -> int:
    """How many cached positions a step with new_rows attends: the filled ones rounded up to a block."""
    end = cache.length + new_rows
    if end > cache.capacity:
        raise ValueError(f"sequence needs {end} positions but its KV cache holds {cache.capacity}; "
                         "raise the context size")
    block = max(KV_BLOCK_MIN, (1 << (end.bit_length() - 1)) // 4)
    return min(cache.capacity, -(-end // block) * block)


def rows_within_scores(cache: KVCache, wanted: int, heads: int) -> int:
    """The most of `wanted` new rows (at least one) a step may give this cache while their attention scores
    (rows x attended positions x heads, float32, and as much again for their softmax) stay within
    ATTENTION_SCORES_BYTES: at a long context a prompt goes in smaller chunks, not in one whose scores outgrow
    the memory (512 rows at 128K positions and 64 heads would take 34 GB). A row's math is its own, so the
    chunks change no result."""
    rows = wanted
    while rows > 1 and 2 * 4 * rows * kv_positions(cache, rows) * heads > ATTENTION_SCORES_BYTES:
        rows = -(-rows // 2)
    return rows


class StepModel(Protocol):
    """What the step graphs read of a model (model.KimiModel): its weights, where its experts run, how it routes."""
    config: ModelConfig
    runner: GgmlRunner
    experts: Experts
    output_name: str
    repack_head: bool  # the head's weights interleaved: its matmuls round each row with its neighbours

    @property
    def routes_in_graph(self) -> bool: ...

    def weight(self, name: str): ...

    def layer_weight(self, layer: int, name: str): ...

    def router_bias(self, layer: int) -> np.ndarray | None: ...

    def graph_memory(self) -> GraphMemory | ScheduledMemory: ...

    def experts_in_graph(self, layer: int, num_tokens: int) -> dict | None: ...


@dataclass(frozen=True)
class StepShape:
    # per segment: cache serial, new rows, cached positions attended, rows whose logits are returned
    segments: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def of(cls, segments: Sequence[Segment], all_logits: bool) -> "StepShape":
        return cls(tuple((s.cache.serial, s.count, kv_positions(s.cache, s.count), s.count if all_logits else s.logits)
                         for s in segments))

    @property
    def num_tokens(self) -> int:
        return sum(count for _, count, _, _ in self.segments)

    @property
    def all_logits(self) -> bool:
        return all(logits == count for _, count, _, logits in self.segments)

    @property
    def router_runs(self) -> list[tuple[int, int, bool]]:
        """(first row, rows, multiplied together): each prompt chunk, and runs of the other segments' rows."""
        runs, start = [], 0
        for _, count, _, logits in self.segments:
            together = is_prompt_chunk(count, logits)
            if runs and not together and not runs[-1][2]:
                runs[-1] = (runs[-1][0], runs[-1][1] + count, False)
            else:
                runs.append((start, count, together))
            start += count
        return runs


def is_prompt_chunk(count: int, logits: int) -> bool:
    """Whether a segment's rows are a prompt's (only its last row, or none, wants logits), which llama.cpp
    computes together as one batch; a decoding sequence's rows (its next token and drafts) all want logits, and
    each gets the bits a step of its own would give."""
    return logits < count


class StepGraphs:
    """Every graph of one step shape, the input arrays they share, and how to run them in turn."""

    def __init__(self, model: StepModel, shape: StepShape, segments: Sequence[Segment]):
        self.model, self.shape, c = model, shape, model.config
        num_tokens = shape.num_tokens
        self.tokens = np.zeros(num_tokens, np.int32)
        self.positions = np.zeros(num_tokens, np.int32)
        self.out_rows = np.concatenate([np.arange(seg.start + count - logits, seg.start + count, dtype=np.int32)
                                        for (_, count, _, logits), seg in zip(shape.segments, segments)])
        self.write_rows = [np.zeros(count, np.int64) for _, count, _, _ in shape.segments]
        self.masks = [np.zeros((count, kv), np.float16) for _, count, kv, _ in shape.segments]
        # Layers whose routed experts run outside the graph: the pass is cut after their router.
        self.cuts = [layer for layer in c.moe_layers if model.experts_in_graph(layer, num_tokens) is None]
        bounds = [-1] + self.cuts + [c.num_layers - 1]
        self.memory = model.graph_memory()  # the graphs run one after another: one buffer serves them all
        self.pieces = [self._piece(bounds[i] + 1, bounds[i + 1], segments) for i in range(len(bounds) - 1)]
        self.shared = {layer: self._shared_expert(layer) for layer in self.cuts}
        self.memory.allocate()

    # -- running -----------------------------------------------------------------------------------------

    def run(self, tokens: np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
        self._write_step_inputs(tokens, segments)
        carry = None
        for piece, cut in zip(self.pieces, self.cuts + [None]):
            if carry is not None:
                for name, value in carry.items():
                    piece.inputs[name][...] = value
            piece.compute()
            if cut is None:
                return piece.read("logits", 2)
            carry = self._experts_at_cut(cut, piece)

    def _experts_at_cut(self, layer: int, graph: PlannedGraph) -> dict[str, np.ndarray]:
        """Route on the host, start the experts, run the shared expert while they work, collect both."""
        model, c = self.model, self.model.config
        ffn_inp, hidden = graph.read("ffn_inp", 2), graph.read("ffn_norm", 2)
        if model.routes_in_graph:
            ids, weights = graph.read("expert_ids", 2), graph.read("expert_weights", 3)[:, :, 0]
        else:
            ids, weights = route(graph.read("router_logits", 2), model.router_bias(layer), c)
        pending = model.experts.start(layer, hidden, ids, weights)
        shared = self.shared[layer]
        shared.inputs["hidden"][...] = hidden
        shared.compute()
        return {"ffn_inp": ffn_inp, "shared": shared.read("out", 2), "routed": pending()}

    def _write_step_inputs(self, tokens: np.ndarray, segments: Sequence[Segment]) -> None:
        self.tokens[...] = tokens
        for i, seg in enumerate(segments):
            first = seg.cache.length
            positions = np.arange(first, first + seg.count)
            self.positions[seg.start: seg.start + seg.count] = positions
            self.write_rows[i][...] = positions
            visible = np.arange(self.masks[i].shape[1])[None, :] <= positions[:, None]
            self.masks[i][...] = np.where(visible, np.float16(0), np.float16(-np.inf))

    # -- building ------------------------------------------------------------------------------------------

    def _piece(self, first_layer: int, last_layer: int, segments: Sequence[Segment]) -> PlannedGraph:
        """Layers first_layer..last_layer; stops after last_layer's router if it is a cut, else at the logits."""
        c = self.model.config
        num_layers = last_layer - first_layer + 1
        g = PlannedGraph(self.model.runner, 64 + num_layers * (TENSORS_PER_LAYER + TENSORS_PER_SEGMENT * len(segments)),
                         self.memory)
        ctx, num_tokens = g.ctx, len(self.tokens)
        step = {"tokens": g.external(self.tokens), "positions": g.external(self.positions)}
        step["write_rows"] = [g.external(rows) for rows in self.write_rows]
        step["masks"] = [g.external(mask) for mask in self.masks]
        if first_layer == 0:
            x = ggml.ggml_get_rows(ctx, g.weight(self.model.weight("token_embd.weight"), num_tokens), step["tokens"])
        else:
            ffn_inp, routed, shared = (g.input(name, (num_tokens, c.n_embd)) for name in ("ffn_inp", "routed", "shared"))
            x = ggml.ggml_add(ctx, ggml.ggml_add(ctx, routed, shared), ffn_inp)
        layer_graph = _LayerGraph(self, g, step, segments)
        for layer in range(first_layer, last_layer + 1):
            ffn_inp = ggml.ggml_add(ctx, layer_graph.attention(layer, layer_graph.norm(x, layer, "attn_norm")), x)
            hidden = layer_graph.norm(ffn_inp, layer, "ffn_norm")
            if layer in self.cuts:
                outputs = {"ffn_inp": ffn_inp, "ffn_norm": hidden}
                if self.model.routes_in_graph:
                    ids, weights = layer_graph.route(layer, hidden)
                    outputs.update(expert_ids=ggml.ggml_cont(ctx, ids), expert_weights=weights)
                else:
                    outputs["router_logits"] = layer_graph.router_logits(layer, hidden)
                g.plan(outputs, layer_graph.row_invariant)
                return g
            x = ggml.ggml_add(ctx, layer_graph.ffn(layer, hidden), ffn_inp)
        if not self.shape.all_logits:
            x = ggml.ggml_get_rows(ctx, x, g.external(self.out_rows))
        x = ggml.ggml_mul(ctx, ggml.ggml_rms_norm(ctx, x, c.rms_eps), g.weight(self.model.weight("output_norm.weight")))
        g.plan({"logits": mul_mat(ctx, g.weight(self.model.weight(self.model.output_name)), x, layer_graph.rows_alone)},
               layer_graph.row_invariant)
        return g

    def _shared_expert(self, layer: int) -> PlannedGraph:
        g = PlannedGraph(self.model.runner, 64, self.memory)
        hidden = g.input("hidden", (len(self.tokens), self.model.config.n_embd))
        w = lambda kind: g.weight(self.model.layer_weight(layer, f"ffn_{kind}_shexp.weight"))  # noqa: E731
        g.plan({"out": swiglu_subgraph(g.ctx, w("gate"), w("up"), w("down"), hidden, not self.model.repack_head)})
        return g


class _LayerGraph:
    """Builds one layer's ops into a graph; shapes in ggml order (fastest axis first), as in deepseek2.cpp."""

    def __init__(self, step: StepGraphs, graph: PlannedGraph, step_inputs: dict, segments: Sequence[Segment]):
        # The graph points into the caches' arrays but keeps no cache object: a dropped cache frees its graphs.
        self.step, self.g, self.ctx, self.inputs, self.segments = step, graph, graph.ctx, step_inputs, segments
        self.model, self.c = step.model, step.model.config
        # With the head read in place (batch-invariant kernels), every row gets the bits a step of its own gives.
        self.rows_alone = not self.model.repack_head
        # Attention too, unless the step holds nothing but prompt chunks: a decoding row (drafts too) must get
        # the bits it would get alone.
        self.row_invariant = self.rows_alone or not all(is_prompt_chunk(count, logits)
                                                        for _, count, _, logits in step.shape.segments)

    def weight(self, layer: int, name: str):
        return self.g.weight(self.model.layer_weight(layer, f"{name}.weight"))

    def norm(self, x, layer: int, name: str):
        return ggml.ggml_mul(self.ctx, ggml.ggml_rms_norm(self.ctx, x, self.c.rms_eps), self.weight(layer, name))

    def rope(self, x):
        c = self.c
        return ggml.ggml_rope_ext(self.ctx, x, self.inputs["positions"], None, c.rope_dim, ROPE_NORM_MODE,
                                  c.rope_orig_context, c.rope_base, c.freq_scale,
                                  1.0 if c.rope_scaling_type == "yarn" else 0.0, c.yarn_attn_factor,
                                  c.yarn_beta_fast, c.yarn_beta_slow)

    def attention(self, layer: int, x):
        """MLA attention of x [D, T]; writes the new cache rows of every segment. Returns [D, T]."""
        c, ctx, w = self.c, self.ctx, (lambda name: self.weight(layer, name))
        num_tokens, heads, nope, rope, lora = len(self.step.tokens), c.num_heads, c.head_dim_nope, c.rope_dim, c.kv_lora_rank
        mm = lambda weight, rows: mul_mat(ctx, weight, rows, self.rows_alone)  # noqa: E731
        q = mm(w("attn_q_b"), self.norm(mm(w("attn_q_a"), x), layer, "attn_q_a_norm"))  # [H * (N + R), T]
        row = 4 * c.head_dim_qk
        q_nope = ggml.ggml_view_3d(ctx, q, nope, heads, num_tokens, row, row * heads, 0)
        q_pe = self.rope(ggml.ggml_view_3d(ctx, q, rope, heads, num_tokens, row, row * heads, 4 * nope))
        kv = mm(w("attn_kv_a_mqa"), x)  # [L + R, T]
        kv_row = 4 * (lora + rope)
        latent = self.norm(ggml.ggml_view_2d(ctx, kv, lora, num_tokens, kv_row, 0), layer, "attn_kv_a_norm")
        k_pe = self.rope(ggml.ggml_view_3d(ctx, kv, rope, 1, num_tokens, kv_row, kv_row, 4 * lora))
        if c.is_mla:
            # Absorb W_UK into the queries; the cache rows [latent | k_pe] are then the keys of one shared head.
            q_abs = mm(w("attn_k_b"), ggml.ggml_permute(ctx, q_nope, 0, 2, 1, 3))  # [L, T, H]
            queries = ggml.ggml_concat(ctx, ggml.ggml_permute(ctx, q_abs, 0, 2, 1, 3), q_pe, 0)  # [L + R, H, T]
            new_keys = ggml.ggml_concat(ctx, ggml.ggml_reshape_3d(ctx, latent, lora, 1, num_tokens), k_pe, 0)
            new_values = None
        else:
            # Legacy attn_kv_b files: per-head keys and values, expanded before caching.
            kv_b = mm(w("attn_kv_b"), latent)  # [H * (N + V), T]
            kv_b_row = 4 * (nope + c.head_dim_v)
            k_nope = ggml.ggml_view_3d(ctx, kv_b, nope, heads, num_tokens, kv_b_row, kv_b_row * heads, 0)
            new_values = ggml.ggml_cont(ctx, ggml.ggml_view_3d(ctx, kv_b, c.head_dim_v, heads, num_tokens, kv_b_row,
                                                               kv_b_row * heads, 4 * nope))
            queries = ggml.ggml_concat(ctx, q_nope, q_pe, 0)  # [N + R, H, T]
            new_keys = ggml.ggml_concat(ctx, k_nope, ggml.ggml_repeat(ctx, k_pe, q_pe), 0)
        out = [self._segment_attention(layer, i, queries, new_keys, new_values) for i in range(len(self.segments))]
        kqv = out[0]
        for part in out[1:]:
            kqv = ggml.ggml_concat(ctx, kqv, part, 1)  # [Dv, T, H]
        if c.is_mla:
            kqv = mm(w("attn_v_b"), kqv)  # [V, T, H]
        kqv = ggml.ggml_cont_2d(ctx, ggml.ggml_permute(ctx, kqv, 0, 2, 1, 3), c.head_dim_v * heads, num_tokens)
        return mm(w("attn_output"), kqv)

    def _segment_attention(self, layer: int, i: int, queries, new_keys, new_values):
        """Write segment i's new rows into its cache, then attend over its cached positions. Returns
        [Dv, rows, H]."""
        ctx, g, cache, start = self.ctx, self.g, self.segments[i].cache, self.segments[i].start
        count, kv = self.step.shape.segments[i][1:3]
        rows, mask = self.inputs["write_rows"][i], self.inputs["masks"][i]
        keys = self._write(g.cache_rows(cache.keys[layer]), new_keys, start, count, rows)
        values = keys if new_values is None else self._write(g.cache_rows(cache.values[layer]), new_values, start,
                                                              count, rows)
        dim_k, heads_k = cache.keys[layer].shape[2], cache.keys[layer].shape[1]
        dim_v = self.c.kv_lora_rank if new_values is None else cache.values[layer].shape[2]
        k = ggml.ggml_view_3d(ctx, keys, dim_k, kv, heads_k, keys.contents.nb[1], 2 * dim_k, 0)  # [Dk, S, Hk]
        v = ggml.ggml_view_3d(ctx, values, dim_v, kv, heads_k, values.contents.nb[1], 2 * dim_v, 0)  # [Dv, S, Hk]
        q_nb, (dim_q, heads) = queries.contents.nb, queries.contents.ne[:2]
        q = ggml.ggml_permute(ctx, ggml.ggml_view_3d(ctx, queries, dim_q, heads, count, q_nb[1], q_nb[2],
                                                     start * q_nb[2]), 0, 2, 1, 3)  # [Dk, rows, H]
        if self.row_invariant:
            # Each row as in a step of its own; the cache read as it lies, where the matmuls would transpose
            # every cached value in every step: at a long context most of a decoding step's time.
            return flash_attention(ctx, q, k, v, mask, self.c.kq_scale)
        # A prompt chunk's rows at a GEMM's speed, the transposition paid once for them all: faster here than
        # ggml's flash attention tiles.
        return matmul_attention(ctx, q, k, v, mask, self.c.kq_scale)

    def _write(self, cache, new_rows, start: int, count: int, rows):
        """set_rows of new_rows [width..., T] (rows start..start+count) into a cache [width..., capacity];
        returns the cache as [width, capacity] after the write, so readers depend on it."""
        ne, nb = cache.contents.ne, new_rows.contents.nb
        width = ne[0] * ne[1]
        source = ggml.ggml_view_2d(self.ctx, new_rows, width, count, nb[2], start * nb[2])
        return ggml.ggml_set_rows(self.ctx, ggml.ggml_view_2d(self.ctx, cache, width, ne[2], cache.contents.nb[2], 0),
                                  source, rows)

    def ffn(self, layer: int, hidden):
        """The dense FFN, or the routed experts (routed in the graph) plus the shared expert."""
        ctx, c = self.ctx, self.c
        w = lambda name: self.weight(layer, name)  # noqa: E731
        if not c.is_moe_layer(layer):
            return swiglu_subgraph(ctx, w("ffn_gate"), w("ffn_up"), w("ffn_down"), hidden, self.rows_alone)
        rows_read = self.c.num_experts_used * len(self.step.tokens)
        experts = {kind: self.g.weight(w, rows_read)
                   for kind, w in self.model.experts_in_graph(layer, len(self.step.tokens)).items()}
        ids, weights = self.route(layer, hidden)
        routed = moe_subgraph(ctx, experts.get("gate"), experts.get("up"), experts["down"], experts.get("gate_up"),
                              hidden, ids, weights)
        return ggml.ggml_add(ctx, routed, swiglu_subgraph(ctx, w("ffn_gate_shexp"), w("ffn_up_shexp"),
                                                          w("ffn_down_shexp"), hidden, self.rows_alone))

    def router_logits(self, layer: int, hidden):
        """[E, T]. The router's weights are float32, which ggml multiplies by several rows at once with other
        kernels that round otherwise (see ggml_ops.mul_mat). With the head interleaved (llama.cpp's default
        kernels, under which rows already round with their neighbours) a prompt chunk's rows are multiplied
        together and route as llama.cpp's batch routes them; every other row (a decoding sequence's, drafted or
        not, and every row with the head read in place) is multiplied alone, so that it routes as in a step of
        its own whatever shares the step or however its prompt was cut."""
        ctx, weight = self.ctx, self.weight(layer, "ffn_gate_inp")
        runs = [(0, len(self.step.tokens), False)] if self.rows_alone else self.step.shape.router_runs
        parts, row_bytes = [], hidden.contents.nb[1]
        for start, count, together in runs:
            rows = ggml.ggml_view_2d(ctx, hidden, self.c.n_embd, count, row_bytes, start * row_bytes)
            parts.append(mul_mat(ctx, weight, rows, rows_alone=not together))  # [E, rows]
        logits = parts[0]
        for part in parts[1:]:
            logits = ggml.ggml_concat(ctx, logits, part, 1)
        return logits

    def route(self, layer: int, hidden):
        """llama.cpp's build_moe_ffn routing: expert ids [k, T] and weights [1, k, T]."""
        ctx, c = self.ctx, self.c
        num_tokens, k, num_experts = len(self.step.tokens), c.num_experts_used, c.num_experts
        logits = self.router_logits(layer, hidden)  # [E, T]
        probs = ggml.ggml_sigmoid(ctx, logits) if c.gating_func == GATING_SIGMOID else ggml.ggml_soft_max(ctx, logits)
        selection = probs
        if self.model.router_bias(layer) is not None:
            selection = ggml.ggml_add(ctx, probs, self.g.weight(self.model.layer_weight(layer, "exp_probs_b.bias")))
        ids = ggml.ggml_argsort_top_k(ctx, selection, k)  # [k, T]
        weights = ggml.ggml_get_rows(ctx, ggml.ggml_reshape_3d(ctx, probs, 1, num_experts, num_tokens), ids)
        if c.expert_weights_norm:
            weights = ggml.ggml_reshape_2d(ctx, weights, k, num_tokens)
            total = ggml.ggml_clamp(ctx, ggml.ggml_sum_rows(ctx, weights), float(MIN_WEIGHT_SUM), float("inf"))
            weights = ggml.ggml_reshape_3d(ctx, ggml.ggml_div(ctx, weights, total), 1, k, num_tokens)
        if c.expert_weights_scale not in (0.0, 1.0):
            weights = ggml.ggml_scale(ctx, weights, c.expert_weights_scale)
        return ids, weights
