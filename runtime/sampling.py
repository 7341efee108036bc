"""Next-token sampling over a logits vector, in llama.cpp's default sampler-chain order.

penalties -> top-k -> top-p -> min-p -> temperature -> draw (llama-sampler.cpp). top-p and min-p
therefore see the untempered distribution, exactly as in llama.cpp. Ties between equal logits go to
the lowest token id, so results do not depend on sort stability.
"""
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class SamplingParamError(ValueError):
    """A sampling setting out of range; `field` names it, so each front end can say it in its own terms
    (an API field, a command-line flag)."""

    def __init__(self, field: str, allowed: str, value: object):
        super().__init__(f"{field} must be {allowed}, got {value!r}")
        self.field, self.allowed, self.value = field, allowed, value


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # seen tokens: positive logits / penalty, negative ones * penalty
    presence_penalty: float = 0.0  # OpenAI: subtracted once from each seen token's logit
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per occurrence
    seed: int | None = None  # None = fresh OS entropy

    def __post_init__(self):
        # Comparisons are written so that NaN fails them.
        checks = [
            ("temperature", _is_real(self.temperature) and 0 <= self.temperature < math.inf,
             "a finite number >= 0 (0 = greedy)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _is_real(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
            ("min_p", _is_real(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1] (0 = off)"),
            ("repetition_penalty", _is_real(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf,
             "a finite number > 0 (1 = off)"),
            ("presence_penalty", _is_real(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number in [-2, 2] (0 = off)"),
            ("frequency_penalty", _is_real(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number in [-2, 2] (0 = off)"),
            ("seed", self.seed is None or (_is_int(self.seed) and self.seed >= 0), "None or an integer >= 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise SamplingParamError(name, allowed, getattr(self, name))

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


class Sampler:
    """Samples token ids with its own random generator: the same seed gives the same tokens."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray, previous_tokens: Sequence[int]) -> int:
        """logits: [V]; previous_tokens: the ids to penalize (the caller chooses the window)."""
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.size == 0:
            raise ValueError(f"logits must be a non-empty 1-D vector, got shape {logits.shape}")
        if np.isnan(logits.max()):  # max is NaN exactly when some value is (a third of isnan's cost)
            raise ValueError("logits contain NaN; the forward pass produced invalid values")
        p = self.params
        if p.has_penalties:
            logits = self._penalize(logits, previous_tokens)
        if p.temperature == 0:
            return int(np.argmax(logits))  # first index on ties

        ids, values = None, logits  # the candidates, in token order (ids None: every token)
        if p.top_k and p.top_k < values.size:
            ids = np.sort(largest(values, p.top_k))
            values = values[ids]
        top = values.max()
        if top == -np.inf:
            raise ValueError("every candidate logit is -inf; nothing can be sampled")
        # p_i >= min_p * p_max  <=>  logit_i >= max_logit + log(min_p). min-p runs after top-p, which never
        # drops the most likely token, so the max is the same.
        kept = values >= top + np.float32(math.log(p.min_p)) if p.min_p > 0 else None
        if p.top_p < 1:
            kept = self._top_p(values, top, kept)
        if kept is not None and np.count_nonzero(kept) < values.size // 8:  # few left: draw among them alone
            chosen = np.flatnonzero(kept)
            ids, values, kept = (chosen if ids is None else ids[chosen]), values[chosen], None
        weights = values - top
        weights *= np.float32(1 / p.temperature)
        np.exp(weights, out=weights)  # in place: no temporaries of the vocabulary's size
        if kept is not None:
            weights *= kept
        drawn = self._draw(weights)
        return drawn if ids is None else int(ids[drawn])

    def _top_p(self, values: np.ndarray, top: np.float32, min_p_kept: np.ndarray | None) -> np.ndarray:
        """The mask of what top-p keeps, and min-p too if its mask is given."""
        weights = np.exp(values - top, dtype=np.float32)
        total = float(weights.sum())  # numpy sums float32 pairwise: float64 would add nothing that matters
        if min_p_kept is None or np.count_nonzero(min_p_kept) == values.size:
            return nucleus(values, self.params.top_p, weights, total)
        # Both filters keep a prefix of the tokens by logit, so together they keep the shorter. When min-p's
        # holds less than top_p of the mass (a margin covers the float32 sum), it is; else top-p's is, and
        # it lies among min-p's tokens.
        if float(weights @ min_p_kept.astype(np.float32)) < self.params.top_p * total * (1 - 1e-4):
            return min_p_kept
        inside = np.flatnonzero(min_p_kept)
        kept = np.zeros(values.size, bool)
        kept[inside[nucleus(values[inside], self.params.top_p, weights[inside], total)]] = True
        return kept

    def _penalize(self, logits: np.ndarray, previous_tokens: Sequence[int]) -> np.ndarray:
        tokens = np.asarray(previous_tokens, dtype=np.int64).reshape(-1)
        if tokens.size == 0:
            return logits
        if tokens.min() < 0 or tokens.max() >= logits.size:
            raise ValueError(f"previous_tokens must be ids in [0, {logits.size}), "
                             f"got values from {tokens.min()} to {tokens.max()}")
        p = self.params
        seen, counts = np.unique(tokens, return_counts=True)
        values = logits[seen]
        penalty = np.float32(p.repetition_penalty)
        values = np.where(values <= 0, values * penalty, values / penalty)
        values = values - (counts * p.frequency_penalty + p.presence_penalty).astype(np.float32)
        logits = logits.copy()
        logits[seen] = values
        return logits

    def _draw(self, weights: np.ndarray) -> int:
        """Index i with probability weights[i] / their sum; one uniform draw per call, as llama.cpp's dist
        sampler. The running sum is taken over blocks first, then inside the one block the draw falls in
        (a running sum over 163,840 entries costs more than the rest of sampling)."""
        whole = weights.size // DRAW_BLOCK * DRAW_BLOCK
        block_sums = weights[:whole].reshape(-1, DRAW_BLOCK).sum(axis=1, dtype=np.float32)
        if whole < weights.size:
            block_sums = np.append(block_sums, weights[whole:].sum(dtype=np.float32))
        block_ends = np.cumsum(block_sums, dtype=np.float64)
        target = self._rng.random() * block_ends[-1]
        # side="right" never lands on a zero-weight block or entry
        block = min(int(np.searchsorted(block_ends, target, side="right")), block_ends.size - 1)
        start = block * DRAW_BLOCK
        inside = weights[start: start + DRAW_BLOCK]
        position = np.searchsorted(np.cumsum(inside, dtype=np.float64), target - (block_ends[block - 1] if block else 0),
                                   side="right")
        # the block's sum in float32 may exceed its running sum in float64 by a rounding step: stay on its
        # last token that can be drawn
        return start + min(int(position), int(np.flatnonzero(inside)[-1]))


def sample_rows(samplers: Sequence[Sampler], logits: np.ndarray,
                previous_tokens: Sequence[Sequence[int]]) -> list[int | ValueError]:
    """One token per row of logits [n, V], row r by samplers[r] (each its own settings and generator).

    Rows are sampled on a pool of threads, one per core: numpy releases the interpreter lock in its passes
    over the vocabulary, so a batch costs its rows over the cores. (One numpy call over all rows at once is
    slower: [16, 163,840] temporaries do not stay in cache.) A row that cannot be sampled (NaN logits, a
    bad history) gets its ValueError in its place; the other rows are unaffected."""
    def one(row: int) -> int | ValueError:
        try:
            return samplers[row].sample(logits[row], previous_tokens[row])
        except ValueError as e:
            return e
    if len(samplers) == 1:
        return [one(0)]
    return list(_pool().map(one, range(len(samplers))))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="sampling")


def largest(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest values, largest first, lower index first among equal values."""
    if n < values.size:
        threshold = np.partition(values, values.size - n)[values.size - n]
        candidates = np.flatnonzero(values >= threshold)  # ascending, possibly more than n on ties
    else:
        candidates = np.arange(values.size)
    return candidates[np.argsort(-values[candidates], kind="stable")[:n]]


NUCLEUS_BUCKETS = 4096
DRAW_BLOCK = 1024


def nucleus(values: np.ndarray, top_p: float, weights: np.ndarray | None = None,
            total: float | None = None) -> np.ndarray:
    """Boolean mask of the shortest run of most likely tokens (lower index first among equal values) whose
    probability reaches top_p; always at least one.

    Like llama.cpp, the 256 most likely tokens are looked at first. When they fall short (a flat
    distribution over a 163,840-token vocabulary), the tokens are bucketed by logit instead of sorted:
    only the bucket where the mass reaches top_p is sorted. weights: exp(values - max), if at hand; total:
    the mass top_p is a fraction of, if not the sum of weights (values a part of the distribution)."""
    weights = _weights(values) if weights is None else weights
    total = weights.sum(dtype=np.float64) if total is None else total
    needed = top_p * total  # probabilities without dividing every weight
    # 256 tokens of weight at most 1 (the top one's) hold at most 256
    order = largest(values, 256) if needed <= 256 or values.size <= 256 else np.empty(0, np.intp)
    if order.size == values.size or (order.size and weights[order].sum(dtype=np.float64) >= needed):
        kept = np.zeros(values.size, bool)
        kept[order[:int(np.searchsorted(np.cumsum(weights[order], dtype=np.float64), needed, side="left")) + 1]] = True
        return kept
    low = values.min()
    if low == -np.inf:  # -inf logits (weight 0) go to the lowest bucket
        low = values[values > -np.inf].min()
        values = np.maximum(values, low)
    span = values.max() - low
    if span == 0:  # every logit equal (or -inf): weights of 1 (or 0), so the first ceil(needed) ids of weight 1
        kept, count, finite = np.zeros(values.size, bool), max(1, math.ceil(needed)), weights > 0
        kept[np.s_[:count] if finite.all() else np.flatnonzero(finite)[:count]] = True
        return kept
    scale = np.float32(NUCLEUS_BUCKETS / span)
    # intp indices and float64 weights: bincount's own conversions cost five times its count
    buckets = np.minimum(((values - low) * scale).astype(np.intp), NUCLEUS_BUCKETS - 1)
    mass = np.bincount(buckets, weights=weights.astype(np.float64), minlength=NUCLEUS_BUCKETS)
    mass_above = np.cumsum(mass[::-1])[::-1]
    # the highest bucket whose mass together with all above it reaches top_p
    boundary = int(np.flatnonzero(mass_above >= needed).max(initial=0))
    above = mass_above[boundary + 1] if boundary + 1 < NUCLEUS_BUCKETS else 0.0
    inside = np.flatnonzero(buckets == boundary)
    inside = inside[np.lexsort((inside, -values[inside]))]
    count = int(np.searchsorted(above + np.cumsum(weights[inside], dtype=np.float64), needed, side="left")) + 1
    kept = buckets > boundary
    kept[inside[:count]] = True
    return kept


def _weights(values: np.ndarray) -> np.ndarray:
    """exp(value - max) in float32, as llama.cpp's samplers compute them (float64 exp costs ten times as
    much here); -inf logits get 0."""
    top = values.max()
    if top == -np.inf:
        raise ValueError("every candidate logit is -inf; nothing can be sampled")
    return np.exp(values - top, dtype=np.float32)
