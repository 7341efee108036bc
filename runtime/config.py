"""ModelConfig: the deepseek2.* hyperparameters of a Kimi K2.x GGUF, with llama.cpp's defaults."""
from __future__ import annotations

import ctypes
import ctypes.util
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .gguf_file import GGUFError

GATING_SOFTMAX, GATING_SIGMOID = 1, 2
MAX_LAYERS, MAX_EXPERTS = 512, 512  # llama.cpp's limits (src/llama-hparams.h)
MAX_SIZE = 1 << 24  # no width, count or context of a real model comes near it

# llama.cpp computes the YaRN factors in float with the C library's logf; a scale one float32 ulp off (as
# double math rounded once gives) flips a rounded attention probability now and then, and 61 layers carry it.
_logf = ctypes.CDLL(ctypes.util.find_library("m")).logf
_logf.argtypes, _logf.restype = [ctypes.c_float], ctypes.c_float
f32 = np.float32


def logf(x) -> np.float32:
    return f32(_logf(f32(x)))


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    num_layers: int
    context_length: int
    n_embd: int
    n_ff_dense: int
    num_heads: int
    rms_eps: float
    num_experts: int
    num_experts_used: int
    num_expert_groups: int
    num_expert_groups_used: int
    gating_func: int
    num_dense_layers: int
    vocab_size: int
    q_lora_rank: int
    kv_lora_rank: int
    head_dim_qk: int  # nope + rope, per head
    head_dim_v: int
    n_ff_expert: int
    num_shared_experts: int
    expert_weights_scale: float
    expert_weights_norm: bool
    rope_dim: int
    rope_base: float
    rope_scaling_type: str
    rope_factor: float
    rope_orig_context: int
    yarn_log_mul: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    is_mla: bool  # absorbed form (attn_k_b / attn_v_b) rather than legacy attn_kv_b

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], source: str = "GGUF") -> "ModelConfig":
        arch = metadata.get("general.architecture", "deepseek2")

        def get(key: str, default: Any = None) -> Any:
            full = f"{arch}.{key}"
            if full in metadata:
                return metadata[full]
            if default is None:
                raise GGUFError(f"{source}: required metadata key '{full}' is missing; the file was not written "
                                "by a deepseek2-aware converter")
            return default

        def count(key: str, default: int | None = None, at_least: int = 1, at_most: int = MAX_SIZE) -> int:
            value = get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or not at_least <= value <= at_most:
                raise GGUFError(f"{source}: metadata '{arch}.{key}' is {value!r}; it must be an integer from "
                                f"{at_least} to {at_most:,}, so the file is corrupt or not a deepseek2 model")
            return value

        def number(key: str, default: float | None = None) -> float:
            value = get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise GGUFError(f"{source}: metadata '{arch}.{key}' is {value!r}; it must be a finite number, so "
                                "the file is corrupt")
            return float(value)

        num_layers = count("block_count", at_most=MAX_LAYERS)
        has_mla_keys = f"{arch}.attention.key_length_mla" in metadata and f"{arch}.attention.value_length_mla" in metadata
        rope_dim = count("rope.dimension_count")
        context_length = count("context_length")
        scaling_type = str(get("rope.scaling.type", "none"))
        # llama.cpp stores yarn_log_multiplier pre-multiplied by 0.1 for deepseek2 and divides it back out.
        yarn_log_mul = float(f32(number("rope.scaling.yarn_log_multiplier", 0.0)) / f32(0.1))
        vocab_size = count("vocab_size", len(metadata.get("tokenizer.ggml.tokens", [])) or None)
        config = cls(
            arch=arch,
            num_layers=num_layers,
            context_length=context_length,
            n_embd=count("embedding_length"),
            n_ff_dense=count("feed_forward_length"),
            num_heads=count("attention.head_count"),
            rms_eps=number("attention.layer_norm_rms_epsilon"),
            num_experts=count("expert_count", at_most=MAX_EXPERTS),
            num_experts_used=count("expert_used_count"),
            num_expert_groups=count("expert_group_count", 1),
            num_expert_groups_used=count("expert_group_used_count", 1),
            # Absent means softmax in llama.cpp (old DeepSeek V2 files); Kimi files always say sigmoid.
            gating_func=count("expert_gating_func", GATING_SOFTMAX, at_most=GATING_SIGMOID),
            num_dense_layers=count("leading_dense_block_count", 0, at_least=0),
            vocab_size=vocab_size,
            q_lora_rank=count("attention.q_lora_rank"),
            kv_lora_rank=count("attention.kv_lora_rank"),
            head_dim_qk=count("attention.key_length_mla" if has_mla_keys else "attention.key_length"),
            head_dim_v=count("attention.value_length_mla" if has_mla_keys else "attention.value_length"),
            n_ff_expert=count("expert_feed_forward_length"),
            num_shared_experts=count("expert_shared_count", at_least=0),
            expert_weights_scale=number("expert_weights_scale", 1.0),
            expert_weights_norm=bool(get("expert_weights_norm", False)),
            rope_dim=rope_dim,
            rope_base=number("rope.freq_base", 10000.0),
            rope_scaling_type=scaling_type,
            rope_factor=number("rope.scaling.factor", 1.0) if scaling_type != "none" else 1.0,
            rope_orig_context=count("rope.scaling.original_context_length", context_length),
            yarn_log_mul=yarn_log_mul,
            # llama.cpp's deepseek2 loader ignores the file's yarn_beta_* keys and uses these defaults.
            yarn_beta_fast=32.0,
            yarn_beta_slow=1.0,
            is_mla=has_mla_keys,
        )
        config._check_consistency(source)
        return config

    def _check_consistency(self, source: str) -> None:
        """Values that are each in range but cannot go together."""
        problems = [
            (self.num_experts_used <= self.num_experts, f"uses {self.num_experts_used} of {self.num_experts} experts"),
            (self.num_dense_layers <= self.num_layers,
             f"has {self.num_dense_layers} dense layers of {self.num_layers}"),
            (self.num_experts % self.num_expert_groups == 0 and self.num_expert_groups_used <= self.num_expert_groups,
             f"groups {self.num_experts} experts in {self.num_expert_groups} groups, using "
             f"{self.num_expert_groups_used}"),
            (self.rope_dim < self.head_dim_qk, f"rotates {self.rope_dim} of {self.head_dim_qk} query dimensions"),
        ]
        for ok, what in problems:
            if not ok:
                raise GGUFError(f"{source}: the metadata {what}, which cannot be; the file is corrupt")

    @property
    def head_dim_nope(self) -> int:
        return self.head_dim_qk - self.rope_dim

    @property
    def kv_cache_width(self) -> int:
        """Floats cached per token per layer: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.rope_dim

    @property
    def freq_scale(self) -> float:
        return float(f32(1) / f32(self.rope_factor)) if self.rope_scaling_type == "yarn" else 1.0

    @property
    def yarn_attn_factor(self) -> float:
        """llama.cpp's attn_factor after its YaRN adjustment (1 / (1 + 0.1 ln factor)), fed to rope."""
        if self.rope_scaling_type != "yarn" or self.rope_factor <= 1.0:
            return 1.0
        return float(f32(1) / (f32(1) + f32(0.1) * logf(f32(1) / f32(self.freq_scale))))

    @property
    def kq_scale(self) -> float:
        """Attention score scale: mscale^2 / sqrt(head_dim_qk), as deepseek2.cpp pre-scales it (in float32)."""
        log_inv_scale = logf(f32(1) / f32(self.freq_scale))
        attn_factor_org = f32(self.yarn_attn_factor) * (f32(1) + f32(0.1) * log_inv_scale)
        mscale = attn_factor_org * (f32(1) + f32(0.1) * f32(self.yarn_log_mul) * log_inv_scale)
        return float(f32(1) * mscale * mscale / np.sqrt(f32(self.head_dim_qk)))

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.num_dense_layers

    @property
    def moe_layers(self) -> range:
        return range(self.num_dense_layers, self.num_layers)

    def tensor_shapes(self, has_fused_gate_up: bool = False) -> tuple[dict[str, tuple[int, ...]], set[str]]:
        """Expected ggml shapes of every tensor, and the names that may be absent."""
        d, h, v, nope = self.n_embd, self.num_heads, self.head_dim_v, self.head_dim_nope
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (d, self.vocab_size),
            "output_norm.weight": (d,),
            "output.weight": (d, self.vocab_size),
        }
        optional = {"output.weight"}
        for layer in range(self.num_layers):
            p = f"blk.{layer}."
            shapes.update({
                p + "attn_norm.weight": (d,),
                p + "attn_q_a.weight": (d, self.q_lora_rank),
                p + "attn_q_a_norm.weight": (self.q_lora_rank,),
                p + "attn_q_b.weight": (self.q_lora_rank, h * self.head_dim_qk),
                p + "attn_kv_a_mqa.weight": (d, self.kv_cache_width),
                p + "attn_kv_a_norm.weight": (self.kv_lora_rank,),
                p + "attn_output.weight": (h * v, d),
                p + "ffn_norm.weight": (d,),
            })
            if self.is_mla:
                shapes[p + "attn_k_b.weight"] = (nope, self.kv_lora_rank, h)
                shapes[p + "attn_v_b.weight"] = (self.kv_lora_rank, v, h)
            else:
                shapes[p + "attn_kv_b.weight"] = (self.kv_lora_rank, h * (nope + v))
            if not self.is_moe_layer(layer):
                f = self.n_ff_dense
                shapes.update({p + "ffn_gate.weight": (d, f), p + "ffn_up.weight": (d, f),
                               p + "ffn_down.weight": (f, d)})
                continue
            e, f, fs = self.num_experts, self.n_ff_expert, self.n_ff_expert * self.num_shared_experts
            shapes.update({
                p + "ffn_gate_inp.weight": (d, e),
                p + "exp_probs_b.bias": (e,),
                p + "ffn_down_exps.weight": (f, d, e),
                p + "ffn_gate_shexp.weight": (d, fs),
                p + "ffn_up_shexp.weight": (d, fs),
                p + "ffn_down_shexp.weight": (fs, d),
            })
            optional.add(p + "exp_probs_b.bias")
            if has_fused_gate_up:
                shapes[p + "ffn_gate_up_exps.weight"] = (d, 2 * f, e)
            else:
                shapes[p + "ffn_gate_exps.weight"] = (d, f, e)
                shapes[p + "ffn_up_exps.weight"] = (d, f, e)
        return shapes, optional
