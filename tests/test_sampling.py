"""Sampler: greedy, the llama.cpp filter chain, penalties, seeding and parameter validation."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.sampling import Sampler, SamplingParams, nucleus, sample_rows

logit_vectors = st.lists(st.floats(-20, 20, width=32), min_size=1, max_size=64).map(
    lambda values: np.array(values, np.float32))


def _probs(logits: np.ndarray) -> np.ndarray:
    weights = np.exp(logits.astype(np.float64) - logits.max())
    return weights / weights.sum()


def test_greedy_picks_argmax_and_lowest_index_on_ties():
    sampler = Sampler(SamplingParams())
    assert sampler.sample(np.array([0.1, 3.0, -1.0, 2.9], np.float32), []) == 1
    assert sampler.sample(np.array([1.0, 5.0, 5.0, 5.0], np.float32), []) == 1


@given(logit_vectors, st.floats(0.1, 5), st.integers(0, 2**32))
def test_top_k_1_equals_greedy(logits, temperature, seed):
    sampled = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=seed)).sample(logits, [])
    assert sampled == Sampler(SamplingParams()).sample(logits, [])


@settings(max_examples=200)
@given(logit_vectors, st.floats(0.01, 0.99), st.floats(0.1, 5), st.integers(0, 2**32))
def test_top_p_picks_only_from_the_nucleus(logits, top_p, temperature, seed):
    sampled = Sampler(SamplingParams(temperature=temperature, top_p=top_p, seed=seed)).sample(logits, [])
    probs = _probs(logits)
    # a token is in the nucleus if the tokens strictly more likely than it hold less than top_p;
    # 1e-9 covers float summation order
    assert probs[probs > probs[sampled]].sum() < top_p + 1e-9


@settings(max_examples=200)
@given(logit_vectors, st.floats(0.01, 1.0), st.floats(0.1, 5), st.integers(0, 2**32))
def test_min_p_picks_only_tokens_near_the_top(logits, min_p, temperature, seed):
    sampled = Sampler(SamplingParams(temperature=temperature, min_p=min_p, seed=seed)).sample(logits, [])
    probs = _probs(logits)
    # untempered, as in llama.cpp; 1e-6 relative covers the float32 log(min_p) threshold
    assert probs[sampled] >= min_p * probs.max() * (1 - 1e-6)


def test_top_p_keeps_the_shortest_prefix_reaching_the_mass():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))  # 0.5 + 0.3 reaches 0.75
    assert {sampler.sample(logits, []) for _ in range(300)} == {0, 1}


def test_top_p_beyond_the_first_256_candidates():
    # 1000 equal logits: the nucleus for 0.4995 is ids 0..499 (ties go to the lowest ids)
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.4995, seed=3))
    sampled = [sampler.sample(np.zeros(1000, np.float32), []) for _ in range(400)]
    assert max(sampled) < 500 and max(sampled) >= 256


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    greedy = Sampler(SamplingParams(repetition_penalty=2.0))
    positive = np.array([2.0, 1.5], np.float32)
    assert greedy.sample(positive, []) == 0
    assert greedy.sample(positive, [0]) == 1  # 2.0 / 2 = 1.0 < 1.5
    negative = np.array([-0.1, -0.15], np.float32)
    assert greedy.sample(negative, []) == 0
    assert greedy.sample(negative, [0]) == 1  # -0.1 * 2 = -0.2 < -0.15 (dividing would have favoured it)


def test_presence_penalty_is_counted_once_and_frequency_penalty_per_occurrence():
    logits = np.array([1.0, 0.5], np.float32)
    presence = Sampler(SamplingParams(presence_penalty=0.4))
    assert presence.sample(logits, [0]) == 0  # 1.0 - 0.4 = 0.6 > 0.5
    assert presence.sample(logits, [0, 0, 0]) == 0  # still 0.6: presence ignores counts
    frequency = Sampler(SamplingParams(frequency_penalty=0.2))
    assert frequency.sample(logits, [0, 0]) == 0  # 1.0 - 2 * 0.2 = 0.6 > 0.5
    assert frequency.sample(logits, [0, 0, 0]) == 1  # 1.0 - 3 * 0.2 = 0.4 < 0.5


def test_penalties_apply_before_sampling_with_temperature():
    logits = np.array([3.0, 0.0, -30.0], np.float32)
    sampler = Sampler(SamplingParams(temperature=0.1, top_k=1, frequency_penalty=2.0, seed=0))
    assert sampler.sample(logits, [0, 0]) == 1  # 3 - 4 = -1 < 0


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = np.zeros(1000, np.float32)

    def draw(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.sample(logits, []) for _ in range(50)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)  # 50 uniform draws over 1000 ids coincide with probability 1e-150


def test_tokens_with_minus_inf_logits_are_never_sampled():
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0], np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    assert {sampler.sample(logits, []) for _ in range(200)} == {1, 3}


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("seed", -1),
])
def test_invalid_params_name_the_field_and_its_range(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got"):
        SamplingParams(**{field: value})


def test_invalid_inputs_raise():
    sampler = Sampler(SamplingParams(repetition_penalty=1.1))
    with pytest.raises(ValueError, match="1-D"):
        sampler.sample(np.zeros((2, 3), np.float32), [])
    with pytest.raises(ValueError, match=r"previous_tokens must be ids in \[0, 3\)"):
        sampler.sample(np.zeros(3, np.float32), [5])
    with pytest.raises(ValueError, match="NaN"):
        sampler.sample(np.array([0.0, np.nan], np.float32), [])
    with pytest.raises(ValueError, match="-inf"):
        Sampler(SamplingParams(temperature=1.0)).sample(np.full(3, -np.inf, np.float32), [])


def reference_nucleus(values: np.ndarray, top_p: float) -> set[int]:
    """The definition, by a full sort: the shortest prefix (most likely first, lower id first on ties)
    whose probability reaches top_p."""
    order = np.lexsort((np.arange(values.size), -values))
    mass = np.cumsum(_probs(values)[order])
    return set(order[:int(np.searchsorted(mass, top_p, side="left")) + 1].tolist())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-8, 8, width=32), min_size=300, max_size=3000), st.floats(0.05, 0.999),
       st.sampled_from([1, 10, 1000]))
def test_the_bucketed_nucleus_is_the_sorted_one(values, top_p, distinct):
    values = np.round(np.array(values, np.float32) * distinct) / distinct  # coarse values: many ties
    got, expected = set(np.flatnonzero(nucleus(values, top_p)).tolist()), reference_nucleus(values, top_p)
    if got != expected:  # only where the running mass meets top_p within float summation order
        probs = _probs(values)
        assert abs(min(probs[list(got)].sum(), probs[list(expected)].sum()) - top_p) < 1e-9


@settings(max_examples=200)
@given(logit_vectors, st.floats(0.01, 0.99), st.floats(0.001, 1.0), st.floats(0.1, 5), st.integers(0, 2**32))
def test_top_p_and_min_p_together_keep_both_filters(logits, top_p, min_p, temperature, seed):
    params = SamplingParams(temperature=temperature, top_p=top_p, min_p=min_p, seed=seed)
    sampled = Sampler(params).sample(logits, [])
    probs = _probs(logits)
    assert probs[probs > probs[sampled]].sum() < top_p + 1e-9
    assert probs[sampled] >= min_p * probs.max() * (1 - 1e-6)


# flat logits: min-p alone keeps less than top-p's mass (scale 1), or nearly every token (scale 0.5)
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_recommended_kimi_sampling_over_the_real_vocabulary_stays_in_its_nucleus(scale):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(163_840).astype(np.float32) * np.float32(scale)
    sampler = Sampler(SamplingParams(temperature=0.6, top_p=0.95, min_p=0.01, seed=1))
    allowed = reference_nucleus(logits, 0.95) & set(np.flatnonzero(_probs(logits) >= 0.01 * _probs(logits).max()))
    assert all(sampler.sample(logits, []) in allowed for _ in range(20))


def test_a_batch_of_rows_samples_as_each_row_alone():
    rng = np.random.default_rng(5)
    settings_per_row = [{}, {"temperature": 0.7}, {"temperature": 0.8, "top_k": 40, "top_p": 0.9},
                        {"temperature": 0.6, "top_p": 0.95, "min_p": 0.01},
                        {"temperature": 1.0, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
                        {"temperature": 1.0}, {"temperature": 0.6, "top_p": 0.95, "min_p": 0.01}]
    logits = rng.standard_normal((len(settings_per_row), 5000)).astype(np.float32) * 2
    logits[5, 7] = np.nan
    histories = [rng.integers(0, 5000, 30).tolist() for _ in settings_per_row]
    for seed in range(5):
        params = [SamplingParams(**setting, seed=seed) for setting in settings_per_row]
        batched = sample_rows([Sampler(p) for p in params], logits, histories)
        assert isinstance(batched[5], ValueError) and "NaN" in str(batched[5])
        assert [t for i, t in enumerate(batched) if i != 5] == \
            [Sampler(p).sample(logits[i], histories[i]) for i, p in enumerate(params) if i != 5]


def test_the_nucleus_of_equal_logits_is_the_first_ids_that_can_be_drawn():
    values = np.zeros(1000, np.float32)
    values[::3] = -np.inf  # 666 tokens left, of weight 1 each
    kept = np.flatnonzero(nucleus(values, 0.5))
    assert kept.tolist() == [i for i in range(1000) if i % 3][:333]
