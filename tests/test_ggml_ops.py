"""ggml_ops refuses inputs that would make ggml abort the whole process."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from runtime.ggml_ops import GgmlRunner, Weight


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
