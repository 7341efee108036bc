"""The forward pass as planned ggml graphs: one graph per step with local experts, cut at the routers when
experts run elsewhere, reused across steps and rebuilt when a sequence crosses a cache block; experts of a
prompt grouped by expert."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from runtime import reference
from runtime.experts import ExpertShard
from runtime.ggml_experts import GROUPED_MIN_SLOTS, grouped_expert_ffn
from runtime.ggml_forward import KV_BLOCK_MIN, kv_positions
from runtime.ggml_ops import GgmlRunner, Weight, quantize, repack
from runtime.gguf_file import GGUFModelFile
from runtime.kv_cache import Segment
from runtime.model import KimiModel


@pytest.fixture(scope="module")
def model(make_tiny):
    return KimiModel(GGUFModelFile(make_tiny("Q4_K_M")), GgmlRunner(2), repack="none")


class OutOfGraph:
    """The model's own local experts, offered only through start(): the pass is cut at every router, as it
    is with remote experts."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def start(self, layer, hidden, ids, weights):
        self.calls += 1
        return self.inner.start(layer, hidden, ids, weights)

    def graph_weights(self, layer, slots):
        return None


def test_a_pass_cut_at_every_router_computes_what_the_single_graph_computes(model):
    cut = KimiModel(model.file, model.runner, experts=OutOfGraph(model.experts), repack="none")
    tokens = np.arange(40, 52, dtype=np.int32)
    whole = model.forward(tokens, [Segment(model.new_cache(64), 0, len(tokens))], all_logits=True)
    pieces = cut.forward(tokens, [Segment(cut.new_cache(64), 0, len(tokens))], all_logits=True)
    assert cut.experts.calls == len(model.config.moe_layers)
    np.testing.assert_array_equal(pieces, whole)


def decode(model, tokens: np.ndarray, fresh_graphs: bool = False) -> np.ndarray:
    cache, rows = model.new_cache(256), []
    for position in range(len(tokens)):
        if fresh_graphs:
            model._steps.clear()
        rows.append(model.forward(tokens[position:position + 1], [Segment(cache, 0, 1)])[0])
    assert cache.length == len(tokens)
    return np.stack(rows)


def test_decoding_across_cache_blocks_equals_one_prompt(model):
    """Token by token, the step graphs are reused within a block of cached positions and rebuilt past it.
    Reused graphs compute exactly what freshly built ones do, and every position's logits match one pass
    over the whole sequence (to the parity tolerance: 8-bit activations round a row's sums differently
    when it shares its matmuls, and the tiny model's layers carry that on)."""
    tokens = (np.arange(2 * KV_BLOCK_MIN + 10) * 37 % 200 + 30).astype(np.int32)
    reused = decode(model, tokens)
    np.testing.assert_array_equal(reused, decode(model, tokens, fresh_graphs=True))
    whole = model.forward(tokens, [Segment(model.new_cache(256), 0, len(tokens))], all_logits=True)
    assert (np.abs(reused - whole).max(axis=1) <= 1.5e-2 * np.ptp(whole, axis=1)).all()


def test_attended_positions_grow_by_whole_blocks_and_stop_at_the_capacity(model):
    cache = model.new_cache(1000)
    assert cache.capacity == 1024  # whole blocks: every step attends whole blocks, even at the end
    seen = set()
    for cache.length in range(0, cache.capacity - 1):
        kv = kv_positions(cache, 1)
        assert cache.length + 1 <= kv <= cache.capacity and kv % KV_BLOCK_MIN == 0
        assert kv - (cache.length + 1) <= max(KV_BLOCK_MIN, kv // 4)  # at most a quarter is padding
        seen.add(kv)
    assert len(seen) < 20  # a thousand decode steps rebuild their graphs a handful of times
    with pytest.raises(ValueError, match="raise the context size"):
        cache.length = cache.capacity
        kv_positions(cache, 1)


def test_a_dropped_cache_frees_the_graphs_planned_for_it(model):
    cache = model.new_cache(64)
    model.forward(np.array([5], np.int32), [Segment(cache, 0, 1)])
    serial = cache.serial
    assert any(seg[0] == serial for shape in model._steps for seg in shape.segments)
    del cache
    gc.collect()
    model.forward(np.array([5], np.int32), [Segment(model.new_cache(64), 0, 1)])
    assert not any(seg[0] == serial for shape in model._steps for seg in shape.segments)


def quantized(*ne, seed):
    values = np.random.default_rng(seed).standard_normal(tuple(reversed(ne)), dtype=np.float32)
    return Weight(Q.Q4_K, ne, quantize(values, Q.Q4_K))


def test_experts_grouped_by_expert_compute_the_routed_sum():
    runner = GgmlRunner(2)
    mapped = {"gate": quantized(256, 256, 8, seed=1), "up": quantized(256, 256, 8, seed=2),
              "down": quantized(256, 256, 8, seed=3)}
    packed = {kind: repack(w) for kind, w in mapped.items()}
    rng = np.random.default_rng(4)
    num_tokens, k = GROUPED_MIN_SLOTS // 3 + 1, 3
    x = rng.standard_normal((num_tokens, 256), dtype=np.float32)
    ids = np.stack([rng.permutation(8)[:k] for _ in range(num_tokens)]).astype(np.int32)
    weights = rng.random((num_tokens, k), dtype=np.float32)
    grouped = grouped_expert_ffn(runner, packed, x, ids, weights)
    expected = reference.expert_ffn(mapped["gate"], mapped["up"], mapped["down"], x, ids, weights)
    assert np.abs(grouped - expected).max() <= 1e-4 * np.abs(expected).max()

    shard = ExpertShard(runner, {1: packed}, {1: np.arange(8, dtype=np.int32)})
    assert not shard.runs_grouped(1, num_tokens * k)  # off unless asked: rows then never mix
    shard.grouped = True
    assert shard.runs_grouped(1, num_tokens * k) and not shard.runs_grouped(1, GROUPED_MIN_SLOTS - 1)
    np.testing.assert_array_equal(shard.forward(1, x, ids, weights), grouped)


@pytest.mark.parametrize("interleaved", [False, True])
def test_pairs_sent_to_a_worker_sum_as_the_rows_slots_do(make_tiny, interleaved):
    """A worker gets (row, expert, weight) pairs, a different number per row; each row must come out exactly
    as forward() computes its slots. (Interleaved mul_mat_id miscomputes a row that names an expert twice,
    so pairs must never be padded into rows with repeated experts.)"""
    model_file = GGUFModelFile(make_tiny("Q4_K_M"))
    shard = ExpertShard.from_model_file(model_file, GgmlRunner(2), {1: range(16)}, repack_experts=interleaved)
    rng = np.random.default_rng(5)
    hidden = rng.standard_normal((24, 256), dtype=np.float32)
    ids = np.stack([rng.permutation(16)[:4] for _ in range(24)]).astype(np.int32)
    weights = rng.random((24, 4), dtype=np.float32)
    keep = rng.random((24, 4)) < 0.6  # this worker's share of each row's slots
    keep[:, 0] = True
    rows, slots = np.nonzero(keep)
    partial = shard.forward_pairs(1, hidden, rows.astype(np.int32), ids[rows, slots], weights[rows, slots])
    for row in range(24):
        mine = keep[row]
        expected = shard.forward(1, hidden[row:row + 1], ids[row:row + 1, mine], weights[row:row + 1, mine])
        np.testing.assert_array_equal(partial[row], expected[0])
