"""Multi-head latent attention (MLA) with YaRN RoPE and a latent KV cache, as llama.cpp computes it.

Absorbed form: the cache holds, per token, the normalised latent c (kv_lora_rank) and the shared rope
key k_pe (rope_dim) in float16, as llama.cpp's default F16 cache does. Queries are absorbed into the
latent space with attn_k_b, and attention outputs leave it through attn_v_b. Legacy files (attn_kv_b)
expand the cached latents into per-head keys and values instead.

Shapes: T new tokens, S cached positions, H heads, L = kv_lora_rank, R = rope_dim, N = nope dim.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: [..., n] -> x / sqrt(mean(x^2) + eps) * weight, with ggml's exact rounding: float32 squares
    summed in float64, then mean, scale and products in float32."""
    total = np.sum(np.square(x), axis=-1, keepdims=True, dtype=np.float64)
    mean = (total / x.shape[-1]).astype(np.float32)
    scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
    return x * scale * weight


@dataclass(frozen=True)
class YarnRope:
    """Rotation of adjacent pairs (ggml's NORM mode) with YaRN frequency blending."""
    dims: int
    base: float
    freq_scale: float
    ext_factor: float
    attn_factor: float
    corr_low: float
    corr_high: float

    @classmethod
    def from_config(cls, config: ModelConfig) -> "YarnRope":
        def corr_dim(n_rot: float) -> float:
            return config.rope_dim * math.log(config.rope_orig_context / (n_rot * 2 * math.pi)) / (
                2 * math.log(config.rope_base))
        low = max(0.0, math.floor(corr_dim(config.yarn_beta_fast)))
        high = min(config.rope_dim - 1.0, math.ceil(corr_dim(config.yarn_beta_slow)))
        is_yarn = config.rope_scaling_type == "yarn"
        return cls(config.rope_dim, config.rope_base, config.freq_scale, 1.0 if is_yarn else 0.0,
                   config.yarn_attn_factor, low, high)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin: [T, dims/2] for integer positions [T], in float32 like ggml's rope cache."""
        pairs = self.dims // 2
        theta_scale = np.float32(self.base ** (-2.0 / self.dims))
        # ggml multiplies theta by theta_scale pair by pair in float32; reproduce that rounding.
        scales = np.ones(pairs, np.float32)
        for i in range(1, pairs):
            scales[i] = scales[i - 1] * theta_scale
        theta_extrap = positions.astype(np.float32)[:, None] * scales[None, :]
        theta = np.float32(self.freq_scale) * theta_extrap
        mscale = np.float32(self.attn_factor)
        if self.ext_factor != 0.0:
            ramp = (np.arange(pairs, dtype=np.float32) - self.corr_low) / max(0.001, self.corr_high - self.corr_low)
            mix = (1.0 - np.clip(ramp, 0.0, 1.0)).astype(np.float32) * np.float32(self.ext_factor)
            theta = theta * (1 - mix) + theta_extrap * mix
            mscale = mscale * np.float32(1.0 + 0.1 * math.log(1.0 / self.freq_scale))
        # cosf/sinf are correctly rounded in practice; float64 then rounding reproduces them.
        cos = np.cos(theta.astype(np.float64)).astype(np.float32)
        sin = np.sin(theta.astype(np.float64)).astype(np.float32)
        return cos * mscale, sin * mscale

    @staticmethod
    def apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: [T, ..., dims] with cos/sin [T, dims/2] -> rotated pairs (x[2i], x[2i+1])."""
        shape = (cos.shape[0],) + (1,) * (x.ndim - 2) + (cos.shape[1],)
        cos, sin = cos.reshape(shape), sin.reshape(shape)
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out


_cache_serials = itertools.count()


@dataclass
class KVCache:
    """One sequence's float16 cache, as llama.cpp's default F16 cache holds it; `length` positions filled.

    Absorbed MLA: keys[layer] is [capacity, 1, L + R] (latent | rope key), and values are its first L columns.
    Legacy attn_kv_b files: keys[layer] is [capacity, H, N + R] and values[layer] is [capacity, H, V].
    """
    config: ModelConfig
    capacity: int
    keys: list[np.ndarray] = field(init=False)
    values: list[np.ndarray] = field(init=False)
    length: int = 0
    # Graphs are planned for particular caches (they point into their arrays): a serial names each cache.
    serial: int = field(init=False, default_factory=lambda: next(_cache_serials))

    def __post_init__(self):
        c, n = self.config, self.capacity
        if c.is_mla:
            self.keys = [np.zeros((n, 1, c.kv_cache_width), np.float16) for _ in range(c.num_layers)]
            self.values = [k[:, :, :c.kv_lora_rank] for k in self.keys]
        else:
            self.keys = [np.zeros((n, c.num_heads, c.head_dim_qk), np.float16) for _ in range(c.num_layers)]
            self.values = [np.zeros((n, c.num_heads, c.head_dim_v), np.float16) for _ in range(c.num_layers)]

    def nbytes(self) -> int:
        return sum(k.nbytes for k in self.keys) + (0 if self.config.is_mla else sum(v.nbytes for v in self.values))


@dataclass(frozen=True)
class Segment:
    """The rows [start, start + count) of a step's flat batch that belong to one sequence's cache."""
    cache: KVCache
    start: int
    count: int


class MLAttention:
    """One attention block per call; weights come from `weights(layer, name)` (ggml Weight or f32 array)."""

    def __init__(self, config: ModelConfig, runner, weights):
        self.config, self.runner, self.weights = config, runner, weights
        self.rope = YarnRope.from_config(config)

    def forward(self, layer: int, h: np.ndarray, segments: list[Segment]) -> np.ndarray:
        """h: [T, D] (already attn-normed) -> attention output [T, D]; writes the new rows into the caches."""
        c, w, mm = self.config, (lambda name: self.weights(layer, name)), self.runner.matmul
        num_tokens, heads, nope, lora = h.shape[0], c.num_heads, c.head_dim_nope, c.kv_lora_rank
        positions = np.concatenate([np.arange(s.cache.length, s.cache.length + s.count) for s in segments])
        cos, sin = self.rope.cos_sin(positions)

        q_lat = rms_norm(mm(w("attn_q_a.weight"), h), w("attn_q_a_norm.weight"), c.rms_eps)
        q = mm(w("attn_q_b.weight"), q_lat).reshape(num_tokens, heads, c.head_dim_qk)  # [T, H, N + R]
        q_nope, q_pe = q[:, :, :nope], YarnRope.apply(q[:, :, nope:], cos, sin)
        kv = mm(w("attn_kv_a_mqa.weight"), h)  # [T, L + R]
        latent = rms_norm(kv[:, :lora], w("attn_kv_a_norm.weight"), c.rms_eps)
        k_pe = YarnRope.apply(kv[:, None, lora:], cos, sin)  # [T, 1, R]

        if c.is_mla:
            # Absorb W_UK into the queries ([H, T, N] x k_b -> [H, T, L]); the cache rows are then the keys.
            q_abs = mm(w("attn_k_b.weight"), np.ascontiguousarray(q_nope.transpose(1, 0, 2)))
            queries = np.concatenate([q_abs, q_pe.transpose(1, 0, 2)], axis=2)  # [H, T, L + R]
            new_keys, new_values = np.concatenate([latent[:, None, :], k_pe], axis=2), None  # [T, 1, L + R]
        else:
            # Legacy: expand the latent into per-head keys and values before caching, as llama.cpp does.
            kv_heads = mm(w("attn_kv_b.weight"), latent).reshape(num_tokens, heads, nope + c.head_dim_v)
            k_pe_heads = np.broadcast_to(k_pe, (num_tokens, heads, c.rope_dim))
            new_keys = np.concatenate([kv_heads[:, :, :nope], k_pe_heads], axis=2)  # [T, H, N + R]
            new_values = kv_heads[:, :, nope:]  # [T, H, V]
            queries = np.concatenate([q_nope, q_pe], axis=2).transpose(1, 0, 2)  # [H, T, N + R]

        out = np.empty((heads, num_tokens, lora if c.is_mla else c.head_dim_v), np.float32)
        for seg in segments:
            rows, first, cache = slice(seg.start, seg.start + seg.count), seg.cache.length, seg.cache
            end = first + seg.count
            if end > cache.capacity:
                raise ValueError(f"sequence needs {end} positions but its KV cache holds {cache.capacity}; "
                                 "raise the context size")
            cache.keys[layer][first:end] = new_keys[rows]
            if new_values is not None:
                cache.values[layer][first:end] = new_values[rows]
            keys = cache.keys[layer][:end].transpose(1, 0, 2)  # [Hk, S, Dk]
            values = cache.values[layer][:end].transpose(1, 0, 2)  # [Hk, S, Dv]
            out[:, rows] = self.runner.attention(queries[:, rows], keys, values, first, c.kq_scale)
        if c.is_mla:
            out = mm(w("attn_v_b.weight"), out)  # [H, T, L] -> [H, T, V]
        return mm(w("attn_output.weight"), np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(num_tokens, -1))
