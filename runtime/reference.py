"""Slow numpy oracle for the ggml kernels: dequantization, matmul and routed experts.

Before a quantized dot product ggml rounds the activation to the weight type's `vec_dot_type`
(ggml-cpu.c `type_traits_cpu`). A plain float port therefore differs from ggml by ~1%; emulating that
rounding here brings the difference down to float32 accumulation noise (~1e-7 relative).

Rounding modes for activations:
  "x86"  what ggml's x86 CPU backend (this build) does: Q8_0/Q8_1 scale by 127/amax and round half
         to even (`_mm256_round_ps`); Q8_K uses the reference quantizer.
  "ref"  ggml's reference quantizers (`quantize_row_q8_{0,1,K}_ref`): scale by 1/(amax/127) and round
         half away from zero (`roundf`). The two differ only when x*scale lands on (or within an ulp
         of) a half-integer: rare for random data, common for small-integer test inputs.
  "none" float32 activations, like a naive numpy port.
(ARM's NEON quantizers mix the two, 1/(amax/127) with ties to even; neither mode matches them exactly.)
"""
from __future__ import annotations

from typing import Literal, Protocol, get_args

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

Q = GGMLQuantizationType
Rounding = Literal["x86", "ref", "none"]

# ggml-cpu.c type_traits_cpu[...].vec_dot_type: the type activations are converted to.
VEC_DOT_TYPE: dict[GGMLQuantizationType, GGMLQuantizationType] = {
    Q.F32: Q.F32, Q.F16: Q.F16, Q.BF16: Q.BF16,
    **{t: Q.Q8_0 for t in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL, Q.MXFP4)},
    **{t: Q.Q8_1 for t in (Q.Q4_1, Q.Q5_1)},
    **{t: Q.Q8_K for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS,
                           Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0)},
}
_ROUNDINGS = get_args(Rounding)


class QuantTensor(Protocol):
    """Anything shaped like ggml_ops.Weight; the oracle itself never imports ggml."""
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]
    data: np.ndarray


def _row_bytes(raw: np.ndarray, ggml_type: GGMLQuantizationType, ne: tuple[int, ...]) -> int:
    """Bytes per row of a tensor of ggml shape ne, after checking that raw holds exactly that tensor."""
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if ne[0] % block_size:
        raise ValueError(f"{ggml_type.name} rows hold whole blocks of {block_size}; ne0 = {ne[0]} is not a multiple")
    row_bytes = ne[0] // block_size * type_size
    expected = int(np.prod(ne[1:], dtype=np.int64)) * row_bytes
    if raw.nbytes != expected:
        raise ValueError(f"{ggml_type.name} {list(ne)} needs {expected} bytes, got {raw.nbytes}")
    return row_bytes


def dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType, ne: tuple[int, ...]) -> np.ndarray:
    """Bytes of a ggml tensor of shape ne (ne0 first) -> float32 array of numpy shape reversed(ne)."""
    rows = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, _row_bytes(raw, ggml_type, ne))
    return gguf_quants.dequantize(rows, ggml_type).reshape(tuple(reversed(ne)))


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """C roundf; np.rint rounds ties to even and v + 0.5 misrounds 0.49999997."""
    whole = np.trunc(v)
    return whole + np.sign(v) * (np.abs(v - whole) >= 0.5)


def _q8_0(x: np.ndarray, rounding: Rounding) -> tuple[np.ndarray, np.ndarray]:
    """x: [..., K] -> (d: [..., K/32, 1] as stored in fp16, q: [..., K/32, 32] integers as float32)."""
    blocks = x.reshape(x.shape[:-1] + (-1, 32))
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    d = amax / np.float32(127)
    safe_amax, safe_d = np.where(amax > 0, amax, 1), np.where(d > 0, d, 1)
    if rounding == "x86":
        q = np.rint(blocks * np.where(amax > 0, np.float32(127) / safe_amax, 0))
    else:
        q = _round_half_away(blocks * np.where(d > 0, np.float32(1) / safe_d, 0))
    return d.astype(np.float16).astype(np.float32), q


def _q8_1_block_sums(x: np.ndarray, rounding: Rounding) -> np.ndarray:
    """x: [..., K] -> Q8_1's per-block s = fp16(d * sum(q)): [..., K/32], which Q4_1/Q5_1 dot with their mins."""
    blocks = x.reshape(x.shape[:-1] + (-1, 32))
    _, q = _q8_0(x, rounding)
    d = np.abs(blocks).max(axis=-1) / np.float32(127)  # the unrounded float d, as ggml multiplies it
    return (d * q.sum(axis=-1)).astype(np.float16).astype(np.float32)


def _q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x: [..., K] -> (d: [..., K/256, 1], q: [..., K/256, 256]); the x86 backend uses this reference code too."""
    blocks = x.reshape(x.shape[:-1] + (-1, 256))
    # the signed value of largest magnitude (first one on ties) sets the scale, mapping it to -127
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)
    iscale = np.where(signed_max != 0, np.float32(-127) / np.where(signed_max != 0, signed_max, 1), 0)
    q = np.minimum(np.rint(iscale * blocks), 127)  # nearest_int rounds ties to even
    d = np.where(iscale != 0, np.float32(1) / np.where(iscale != 0, iscale, 1), 0)
    return d.astype(np.float32), q


def round_activation(x: np.ndarray, weight_type: GGMLQuantizationType, rounding: Rounding = "x86") -> np.ndarray:
    """x: [..., K] float32 -> x as ggml sees it in a dot product with a weight_type row (same shape).

    For Q4_1/Q5_1 ggml also uses Q8_1's rounded block sums, which no rounded x can express; matmul
    below accounts for them.
    """
    if rounding not in _ROUNDINGS:
        raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
    if weight_type not in VEC_DOT_TYPE:
        raise ValueError(f"no activation rounding known for weight type {weight_type.name}")
    x = np.asarray(x, dtype=np.float32)
    vec_dot_type = VEC_DOT_TYPE[weight_type]
    block_size = GGML_QUANT_SIZES[vec_dot_type][0]
    if rounding == "none" or vec_dot_type == Q.F32:
        return x
    if x.shape[-1] % block_size:
        raise ValueError(f"{vec_dot_type.name} activations need rows that are a multiple of {block_size}, "
                         f"got {x.shape[-1]}")
    if vec_dot_type == Q.F16:
        return x.astype(np.float16).astype(np.float32)
    if vec_dot_type == Q.BF16:
        return gguf_quants.dequantize(gguf_quants.quantize(x, Q.BF16), Q.BF16)
    d, q = _q8_k(x) if vec_dot_type == Q.Q8_K else _q8_0(x, rounding)
    return (d * q).reshape(x.shape)


def matmul(raw: np.ndarray, ggml_type: GGMLQuantizationType, ne: tuple[int, int], x: np.ndarray,
           rounding: Rounding = "x86") -> np.ndarray:
    """x: [..., K] float32 -> [..., M] for a weight of ggml shape ne = (K, M), accumulated in float64."""
    if len(ne) != 2:
        raise ValueError(f"matmul takes a 2-D weight, got ggml shape {list(ne)}; slice experts first")
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != ne[0]:
        raise ValueError(f"x rows have {x.shape[-1]} values but the weight's rows have {ne[0]}")
    if VEC_DOT_TYPE.get(ggml_type) == Q.Q8_1 and rounding != "none":
        return _matmul_with_mins(raw, ggml_type, ne, x, rounding)
    w = dequantize(raw, ggml_type, ne)  # [M, K]
    xr = round_activation(x, ggml_type, rounding)
    return (xr.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)


def _matmul_with_mins(raw: np.ndarray, ggml_type: GGMLQuantizationType, ne: tuple[int, int], x: np.ndarray,
                      rounding: Rounding) -> np.ndarray:
    """Q4_1/Q5_1 (block = d, m, quants): ggml computes sum_b d*q . x_q + m_b * s_b with Q8_1's fp16 s_b."""
    rows = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, _row_bytes(raw, ggml_type, ne))
    blocks = rows.reshape(ne[1], -1, GGML_QUANT_SIZES[ggml_type][1])  # [M, K/32, bytes per block]
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)  # [M, K/32]
    without_mins = blocks.copy()
    without_mins[..., 2:4] = 0
    scaled = dequantize(without_mins, ggml_type, ne).astype(np.float64)  # [M, K]: d * q only
    xr = round_activation(x, ggml_type, rounding).astype(np.float64)
    sums = _q8_1_block_sums(x, rounding).astype(np.float64)  # [..., K/32]
    return (xr @ scaled.T + sums @ mins.T).astype(np.float32)


def _expert_matmul(w: QuantTensor, e: int, x: np.ndarray, rounding: Rounding) -> np.ndarray:
    """x: [n, in] -> [n, out] through expert e of a weight of ggml shape [in, out, experts]."""
    per_expert = w.data.nbytes // w.ne[2]
    raw = w.data.reshape(-1)[e * per_expert:(e + 1) * per_expert]
    return matmul(raw, w.ggml_type, (w.ne[0], w.ne[1]), x, rounding)


def expert_ffn(gate: QuantTensor | None, up: QuantTensor | None, down: QuantTensor, x: np.ndarray, ids: np.ndarray,
               weights: np.ndarray, gate_up: QuantTensor | None = None, rounding: Rounding = "x86") -> np.ndarray:
    """ggml_ops.GgmlRunner.expert_ffn in numpy: x: [T, D]; ids, weights: [T, k] -> [T, D].

    Intermediate results are float32 as in ggml; expert outputs are weighted and summed in slot order.
    """
    if gate_up is None and (gate is None or up is None):
        raise ValueError("expert_ffn needs both gate and up weights, or a fused gate_up weight")
    x = np.asarray(x, dtype=np.float32)
    ids = np.asarray(ids)
    weights = np.asarray(weights, dtype=np.float32)
    num_experts = down.ne[2]
    if ids.size and not 0 <= ids.min() <= ids.max() < num_experts:
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got {ids.min()}..{ids.max()}")
    num_tokens, k = ids.shape
    n_ff, n_embd = down.ne[0], down.ne[1]
    out = np.zeros((num_tokens, k, n_embd), np.float32)  # [T, k, D]
    for e in np.unique(ids):
        tokens, slots = np.nonzero(ids == e)
        xe = x[tokens]  # [n, D]
        if gate_up is not None:
            fused = _expert_matmul(gate_up, e, xe, rounding)  # [n, 2F]: gate rows, then up rows
            g, u = fused[:, :n_ff], fused[:, n_ff:]
        else:
            g, u = _expert_matmul(gate, e, xe, rounding), _expert_matmul(up, e, xe, rounding)  # [n, F]
        with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g gives silu = -0, as in ggml
            act = g / (np.float32(1) + np.exp(-g)) * u  # swiglu: silu(g) * u
        out[tokens, slots] = _expert_matmul(down, e, act, rounding)
    weighted = out * weights[..., None]
    total = weighted[:, 0]
    for j in range(1, k):
        total = total + weighted[:, j]
    return total


def attention(cache: np.ndarray, queries: np.ndarray, mask: np.ndarray, values: int, scale: float) -> np.ndarray:
    """Absorbed MLA attention in float64: cache [S, Dk] (each position's keys, its first `values` numbers its
    values), queries [H, rows, Dk], mask [rows, S] added to the scaled scores -> [H, rows, values]."""
    keys = cache.astype(np.float64)
    scores = queries.astype(np.float64) @ keys.T * scale + mask.astype(np.float64)  # [H, rows, S]
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True) @ keys[:, :values]
