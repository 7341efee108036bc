"""ggml_ops refuses inputs that would make ggml abort the whole process."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from runtime.ggml_ops import GgmlRunner, RepackedWeight, Weight, quantize, repack


def f32_weight(*ne):
    return Weight(Q.F32, ne, np.zeros(int(np.prod(ne)), np.float32).view(np.uint8))


def test_matmul_rejects_a_wrong_row_length():
    with pytest.raises(ValueError, match="cannot multiply"):
        GgmlRunner(1).matmul(f32_weight(64, 8), np.zeros((2, 32), np.float32))


def test_get_rows_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"row ids must lie in \[0, 8\)"):
        GgmlRunner(1).get_rows(f32_weight(64, 8), np.array([3, 8]))


def test_expert_ffn_rejects_unknown_experts():
    gate, up, down = f32_weight(32, 16, 4), f32_weight(32, 16, 4), f32_weight(16, 32, 4)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        GgmlRunner(1).expert_ffn(gate, up, down, np.zeros((1, 32), np.float32), np.array([[0, 4]]),
                                 np.ones((1, 2), np.float32))


def quantized_weight(ggml_type, *ne, seed=0):
    values = np.random.default_rng(seed).standard_normal(tuple(reversed(ne)), dtype=np.float32)
    return Weight(ggml_type, ne, quantize(values, ggml_type))


@pytest.mark.parametrize("ggml_type", [Q.Q4_0, Q.Q4_K, Q.IQ4_NL])  # interleaved on every AVX2 CPU
def test_repacked_matmul_equals_the_mapped_one(ggml_type):
    runner, w = GgmlRunner(2), quantized_weight(ggml_type, 512, 64)
    packed = repack(w)
    assert isinstance(packed, RepackedWeight)
    x = np.random.default_rng(1).standard_normal((5, 512), dtype=np.float32)
    plain, fast = runner.matmul(w, x), runner.matmul(packed, x)
    # Same integer dot products over the same 8-bit activations; only float accumulation order differs.
    assert np.abs(fast - plain).max() <= 1e-5 * np.abs(plain).max()


def test_repacked_experts_equal_the_mapped_ones():
    runner = GgmlRunner(2)
    gate, up, down = (quantized_weight(Q.Q4_K, 256, 256, 8, seed=1), quantized_weight(Q.Q4_K, 256, 256, 8, seed=2),
                      quantized_weight(Q.Q4_K, 256, 256, 8, seed=3))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 256), dtype=np.float32)
    ids = np.stack([rng.permutation(8)[:3] for _ in range(6)]).astype(np.int32)
    weights = rng.random((6, 3), dtype=np.float32)
    plain = runner.expert_ffn(gate, up, down, x, ids, weights)
    fast = runner.expert_ffn(repack(gate), repack(up), repack(down), x, ids, weights)
    assert np.abs(fast - plain).max() <= 1e-4 * np.abs(plain).max()


def test_types_without_interleaved_kernels_stay_mapped():
    w = quantized_weight(Q.Q3_K, 256, 64)
    assert repack(w) is w


def test_repacked_3d_weights_serve_experts_only():
    packed = repack(quantized_weight(Q.Q4_0, 64, 32, 4))
    with pytest.raises(ValueError, match="expert_ffn only"):
        GgmlRunner(1).matmul(packed, np.zeros((4, 3, 64), np.float32))


def test_quantize_refuses_rows_that_are_not_whole_blocks():
    # Q6_K works in blocks of 256: ggml would write past the end of the output and corrupt the heap.
    with pytest.raises(ValueError, match="Q6_K quantizes rows in blocks of 256 values; a row of 128"):
        quantize(np.zeros((4, 128), np.float32), Q.Q6_K)
