"""Attention as the runtime computes it, on one layer's cache: ggml's flash attention (decoding rows) and its
matmuls (prompt chunks) against runtime/reference.py, and flash attention's rows computed alike however many
share the call: past the sizes where ggml has faster paths (tiles of 64 rows, a lone row's 512 positions or
more split across the threads) that round otherwise."""
from __future__ import annotations

import numpy as np
import pytest

from runtime import reference
from runtime.ggml_ops import GgmlRunner

HEADS, DIM_K, VALUES = 4, 96, 64  # MLA's absorbed form: one key head, keys [latent | rope], values the latent
SCALE = 0.1


def causal_case(rows: int, positions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A cache of `positions` float16 rows, queries for its last `rows` positions, and their causal mask."""
    rng = np.random.default_rng(seed)
    cache = rng.standard_normal((positions, DIM_K)).astype(np.float16)
    queries = rng.standard_normal((HEADS, rows, DIM_K)).astype(np.float32)
    own = np.arange(positions - rows, positions)
    mask = np.where(np.arange(positions)[None, :] <= own[:, None], 0.0, -np.inf).astype(np.float16)
    return cache, queries, mask


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "matmuls"])
@pytest.mark.parametrize("rows,positions", [(1, 700), (7, 40), (80, 600)])
def test_attention_matches_the_reference(flash, rows, positions):
    cache, queries, mask = causal_case(rows, positions)
    ours = GgmlRunner(2).attention(cache, queries, mask, VALUES, SCALE, flash)
    expected = reference.attention(cache, queries, mask, VALUES, SCALE)
    assert ours.shape == (HEADS, rows, VALUES)
    # float16 queries and (flash) float16 sums of values: a few parts in a thousand of the values' spread
    assert np.abs(ours - expected).max() <= 5e-3 * np.ptp(expected)


def test_flash_attention_computes_each_row_as_it_would_alone():
    cache, queries, mask = causal_case(80, 600, seed=1)
    runner = GgmlRunner(2)
    together = runner.attention(cache, queries, mask, VALUES, SCALE, flash=True)
    for row in (0, 41, 79):
        alone = runner.attention(cache, queries[:, row:row + 1], mask[row:row + 1], VALUES, SCALE, flash=True)
        assert np.array_equal(alone[:, 0], together[:, row])


def test_attention_refuses_shapes_that_disagree():
    cache, queries, mask = causal_case(3, 10)
    with pytest.raises(ValueError, match="do not agree"):
        GgmlRunner(1).attention(cache, queries, mask[:2], VALUES, SCALE, flash=True)
