"""ggml_ops kernels against the numpy oracle in runtime/reference.py, for every type ggml can compute.

Errors are relative to the largest reference value: max |ggml - reference| / max |reference|.
"""
import functools

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from runtime import reference
from runtime.ggml_ops import COMPUTABLE_TYPES, GgmlRunner, Weight, quantize

K, M, T = 512, 32, 6  # rows of two 256-value blocks, so K-quants and 256-block IQ types apply
D, F, E = 256, 256, 6  # expert widths and count
TYPES = sorted(COMPUTABLE_TYPES, key=int)
EXPERT_TYPES = [Q.Q4_K, Q.Q2_K, Q.IQ2_XXS, Q.Q4_0, Q.BF16]


@pytest.fixture(scope="module")
def runner() -> GgmlRunner:
    return GgmlRunner(2)


@functools.cache
def _weight(ggml_type: Q, seed: int = 0) -> Weight:
    """A random [M, K] weight; cached because ggml builds its IQ grids (seconds) on first use."""
    values = np.random.default_rng([int(ggml_type), seed]).standard_normal((M, K), np.float32)
    return Weight(ggml_type, (K, M), quantize(values, ggml_type))


@functools.cache
def _experts(ggml_type: Q) -> tuple[Weight, Weight, Weight]:
    """gate, up: ggml [D, F, E]; down: [F, D, E]."""
    rng = np.random.default_rng(int(ggml_type))

    def make(n_in: int, n_out: int) -> Weight:
        values = 0.1 * rng.standard_normal((E, n_out, n_in), np.float32)
        return Weight(ggml_type, (n_in, n_out, E), quantize(values, ggml_type))

    return make(D, F), make(D, F), make(F, D)


def _routing(seed: int, k: int, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x: [T, D]; ids: [T, k] distinct per token, as top-k routing gives; weights: [T, k]."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(num_experts)[:k] for _ in range(T)]).astype(np.int32)
    return rng.standard_normal((T, D), np.float32), ids, rng.random((T, k), np.float32)


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _assert_expert_outputs_match(actual: np.ndarray, expected: np.ndarray) -> None:
    row_err = np.abs(actual - expected).max(axis=1) / np.abs(expected).max()  # [T]
    # most token rows differ by float32 accumulation order only (<= 8e-7 measured)
    assert np.median(row_err) < 5e-6, row_err
    # an ulp of difference in the down projection's input can flip one of its quantized values, moving that
    # row by up to ~2e-3 (about 1% of random cases); a routing or weighting bug moves it by O(1)
    assert row_err.max() < 5e-3, row_err


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_matmul_matches_reference(runner, ggml_type):
    w = _weight(ggml_type)
    x = np.random.default_rng(1).standard_normal((T, K), np.float32)
    actual = runner.matmul(w, x)
    # same rounded activations and weights: only float32 accumulation order differs (<= 3e-7 measured)
    assert _rel_err(actual, reference.matmul(w.data, ggml_type, w.ne, x)) < 2e-6
    # a float port is off by the activation rounding itself (2e-4 for F16 to 9e-3 for TQ types measured)
    assert _rel_err(actual, reference.matmul(w.data, ggml_type, w.ne, x, rounding="none")) < 3e-2


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_get_rows_match_dequantized_rows(runner, ggml_type):
    w = _weight(ggml_type)
    ids = np.array([3, 0, M - 1, 3])
    # both decode the same bits with the same float32 formulas: bit-identical for every type (measured)
    np.testing.assert_array_equal(runner.get_rows(w, ids), reference.dequantize(w.data, ggml_type, w.ne)[ids])


def _activation_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    # small integers make x * 127 / amax land exactly on half-integers, where the rounding modes differ
    return [rng.standard_normal((64, K), np.float32), rng.integers(-300, 300, (64, K)).astype(np.float32)]


def _identity(ggml_type: Q) -> Weight:
    weight = Weight(ggml_type, (K, K), quantize(np.eye(K, dtype=np.float32), ggml_type))
    np.testing.assert_array_equal(reference.dequantize(weight.data, ggml_type, weight.ne), np.eye(K))
    return weight


def test_q8_0_rounding_matches_the_cpu_backend(runner):
    identity = _identity(Q.Q4_0)  # Q4_0 holds 0 and 1 exactly (d = -1/8), so ggml returns its rounded x
    for x in _activation_cases():
        np.testing.assert_array_equal(runner.matmul(identity, x), reference.round_activation(x, Q.Q4_0))


def test_ref_rounding_matches_ggml_reference_quantizer():
    normal, small_ints = _activation_cases()
    for x in (normal, small_ints):
        # ggml_quantize_chunk quantizes Q8_0 with quantize_row_q8_0_ref
        stored = reference.dequantize(quantize(x, Q.Q8_0), Q.Q8_0, (K, len(x)))
        np.testing.assert_array_equal(stored, reference.round_activation(x, Q.Q8_0, rounding="ref"))
    assert (reference.round_activation(small_ints, Q.Q8_0, "ref")
            != reference.round_activation(small_ints, Q.Q8_0, "x86")).any()


def test_q8_1_block_sums_match_the_cpu_backend(runner):
    # row b is 1 on block b and 0 elsewhere: Q4_1 stores it as d = 0, m = 1, so ggml returns Q8_1's s_b
    indicator = np.kron(np.eye(K // 32, dtype=np.float32), np.ones((1, 32), np.float32))
    w = Weight(Q.Q4_1, (K, K // 32), quantize(indicator, Q.Q4_1))
    for x in _activation_cases():
        np.testing.assert_array_equal(runner.matmul(w, x), reference.matmul(w.data, Q.Q4_1, w.ne, x))


def test_q8_k_rounding_matches_the_cpu_backend(runner):
    identity = _identity(Q.TQ2_0)
    for x in _activation_cases():
        step = np.repeat(np.abs(x.reshape(len(x), -1, 256)).max(axis=-1) / 127, 256, axis=1)  # Q8_K's d per value
        # the TQ2_0 kernel sums whole blocks in float (<= 3e-4 of a step measured); a different integer is a full step
        assert (np.abs(runner.matmul(identity, x) - reference.round_activation(x, Q.TQ2_0)) < 0.01 * step).all()


def test_round_activation_rejects_bad_input():
    with pytest.raises(ValueError, match="rounding must be one of"):
        reference.round_activation(np.zeros((1, K), np.float32), Q.Q4_K, rounding="fast")
    with pytest.raises(ValueError, match="multiple of 256"):
        reference.round_activation(np.zeros((1, 100), np.float32), Q.Q4_K)


@pytest.mark.parametrize("ggml_type", EXPERT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("k", [1, 3])
def test_expert_ffn_matches_reference(runner, ggml_type, k):
    gate, up, down = _experts(ggml_type)
    x, ids, weights = _routing(k, k, E)
    expected = reference.expert_ffn(gate, up, down, x, ids, weights)
    _assert_expert_outputs_match(runner.expert_ffn(gate, up, down, x, ids, weights), expected)


@pytest.mark.parametrize("ggml_type", EXPERT_TYPES, ids=lambda t: t.name)
def test_expert_ffn_over_a_run_of_experts(runner, ggml_type):
    start, stop = 2, 5
    full = _experts(ggml_type)
    gate, up, down = (w.slice_outer(start, stop) for w in full)
    assert all(np.shares_memory(part.data, whole.data) for part, whole in zip((gate, up, down), full))
    x, ids, weights = _routing(7, 2, stop - start)
    actual = runner.expert_ffn(gate, up, down, x, ids, weights)
    # the slice views the same bytes, so it must equal the full tensors with shifted ids exactly
    np.testing.assert_array_equal(actual, runner.expert_ffn(*full, x, ids + start, weights))
    _assert_expert_outputs_match(actual, reference.expert_ffn(gate, up, down, x, ids, weights))


def test_fused_gate_up_equals_separate_gate_and_up(runner):
    gate, up, down = _experts(Q.Q4_K)
    # per expert: the F gate rows, then the F up rows
    fused_bytes = np.concatenate([gate.data.reshape(E, -1), up.data.reshape(E, -1)], axis=1)
    gate_up = Weight(Q.Q4_K, (D, 2 * F, E), fused_bytes)
    x, ids, weights = _routing(11, 3, E)
    actual = runner.expert_ffn(None, None, down, x, ids, weights, gate_up=gate_up)
    # one matmul over the fused rows does the same dot products as two separate ones
    np.testing.assert_array_equal(actual, runner.expert_ffn(gate, up, down, x, ids, weights))
    _assert_expert_outputs_match(actual, reference.expert_ffn(None, None, down, x, ids, weights, gate_up=gate_up))


def test_matmul_reads_a_memmap_in_place(runner, tmp_path):
    first, second = _weight(Q.Q4_K, seed=0), _weight(Q.Q4_K, seed=1)
    path = tmp_path / "weight.bin"
    first.data.tofile(path)
    mapped = np.memmap(path, np.uint8, mode="r", shape=first.data.shape)  # read-only, as GGUFReader maps
    w = Weight(Q.Q4_K, first.ne, mapped)
    assert w.data is mapped and np.shares_memory(w.slice_outer(1, 3).data, mapped)
    x = np.random.default_rng(3).standard_normal((T, K), np.float32)
    np.testing.assert_array_equal(runner.matmul(w, x), runner.matmul(first, x))
    # rewrite the file through another mapping: a copy would not see it, the mapped Weight must
    writer = np.memmap(path, np.uint8, mode="r+", shape=first.data.shape)
    writer[:] = second.data
    writer.flush()
    np.testing.assert_array_equal(runner.matmul(w, x), runner.matmul(second, x))
