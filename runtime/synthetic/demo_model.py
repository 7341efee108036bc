"""Small random models in the exact Kimi K2 GGUF layout, for demos, tests and benchmarks.

Real Kimi files cannot be fetched here, so the project writes its own: the same metadata keys, tensor
names, shapes and dtype rules as llama.cpp's converter, random weights, and a small byte-level BPE
tokenizer with Kimi's special tokens and chat template. Quantization is done by llama.cpp's own
quantizer (llama-cpp-python, run in a subprocess) so files carry llama.cpp's real mixed types.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from .demo_vocab import add_tokenizer_to, demo_tokenizer_metadata

ARCH = "deepseek2"
RESIDUAL_OUTPUTS = ("attn_output.weight", "ffn_down.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight")
RESIDUAL_BRANCH_SCALE = 0.25


@dataclass(frozen=True)
class Preset:
    n_embd: int
    num_layers: int
    num_dense_layers: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    head_dim_nope: int
    rope_dim: int
    head_dim_v: int
    n_ff_dense: int
    n_ff_expert: int
    num_experts: int
    num_experts_used: int
    base_dtype: str  # what the unquantized file stores: "f32" or "f16"


PRESETS = {
    # Widths are multiples of 256 so that every K-quant and IQ type applies, as in the real model.
    "tiny": Preset(n_embd=256, num_layers=3, num_dense_layers=1, num_heads=4, q_lora_rank=256, kv_lora_rank=256,
                   head_dim_nope=64, rope_dim=32, head_dim_v=64, n_ff_dense=512, n_ff_expert=256, num_experts=16,
                   num_experts_used=4, base_dtype="f32"),
    # Experts big enough (1.8 MB each in Q4_K) that memory per node is measurable in tests.
    "small": Preset(n_embd=1024, num_layers=3, num_dense_layers=1, num_heads=8, q_lora_rank=512, kv_lora_rank=256,
                    head_dim_nope=64, rope_dim=32, head_dim_v=64, n_ff_dense=2048, n_ff_expert=1024, num_experts=32,
                    num_experts_used=4, base_dtype="f16"),
    # Kimi K2's depth and expert counts (61 layers, 1 dense, 384 experts, 8 used) at narrow widths, so that
    # what a benchmark measures is the framework's cost per layer, not the math. Experts are 32 wide: their
    # down projections fall back from K-quants to 32-block types (Q4_K_M gives Q5_0 there).
    "k2-depth": Preset(n_embd=256, num_layers=61, num_dense_layers=1, num_heads=4, q_lora_rank=256,
                       kv_lora_rank=256, head_dim_nope=64, rope_dim=32, head_dim_v=64, n_ff_dense=512,
                       n_ff_expert=32, num_experts=384, num_experts_used=8, base_dtype="f16"),
    # Kimi K2's real widths; 16 experts instead of 384 and 3 layers instead of 61.
    "k2-slice": Preset(n_embd=7168, num_layers=3, num_dense_layers=1, num_heads=64, q_lora_rank=1536,
                       kv_lora_rank=512, head_dim_nope=128, rope_dim=64, head_dim_v=128, n_ff_dense=18432,
                       n_ff_expert=2048, num_experts=16, num_experts_used=8, base_dtype="f16"),
}
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS",
               "IQ3_XXS", "IQ2_XXS", "IQ1_M", "TQ1_0")


def write_metadata(writer: GGUFWriter, p: Preset, vocab_size: int, legacy_attention: bool = False,
                   name: str = "Kimi-K2 demo") -> None:
    a = ARCH
    writer.add_string("general.name", name)
    u32 = {
        "block_count": p.num_layers, "context_length": 131072, "embedding_length": p.n_embd,
        "feed_forward_length": p.n_ff_dense, "attention.head_count": p.num_heads, "attention.head_count_kv": 1,
        "expert_count": p.num_experts, "expert_used_count": p.num_experts_used, "expert_group_count": 1,
        "expert_group_used_count": 1, "expert_gating_func": 2, "leading_dense_block_count": p.num_dense_layers,
        "vocab_size": vocab_size, "attention.q_lora_rank": p.q_lora_rank, "attention.kv_lora_rank": p.kv_lora_rank,
        "expert_feed_forward_length": p.n_ff_expert, "expert_shared_count": 1, "rope.dimension_count": p.rope_dim,
        "rope.scaling.original_context_length": 4096,
    }
    if legacy_attention:  # pre-MLA files: per-head keys and values (MHA), no *_mla keys
        u32.update({"attention.head_count_kv": p.num_heads, "attention.key_length": p.head_dim_nope + p.rope_dim,
                    "attention.value_length": p.head_dim_v})
    else:
        u32.update({"attention.key_length": p.kv_lora_rank + p.rope_dim, "attention.value_length": p.kv_lora_rank,
                    "attention.key_length_mla": p.head_dim_nope + p.rope_dim,
                    "attention.value_length_mla": p.head_dim_v})
    for key, value in u32.items():
        writer.add_uint32(f"{a}.{key}", value)
    for key, value in {"rope.freq_base": 50000.0, "attention.layer_norm_rms_epsilon": 1e-6,
                       "expert_weights_scale": 2.827, "rope.scaling.factor": 32.0,
                       "rope.scaling.yarn_log_multiplier": 0.1}.items():
        writer.add_float32(f"{a}.{key}", value)
    writer.add_bool(f"{a}.expert_weights_norm", True)
    writer.add_string(f"{a}.rope.scaling.type", "yarn")
    writer.add_uint32("general.quantization_version", 2)


def tensor_specs(p: Preset, vocab_size: int, legacy_attention: bool = False):
    """(name, numpy shape, fan_in or None for norms/biases) in the converter's order."""
    d, h = p.n_embd, p.num_heads
    yield "token_embd.weight", (vocab_size, d), 1
    for layer in range(p.num_layers):
        b = f"blk.{layer}."
        yield b + "attn_norm.weight", (d,), None
        yield b + "attn_q_a.weight", (p.q_lora_rank, d), d
        yield b + "attn_q_a_norm.weight", (p.q_lora_rank,), None
        yield b + "attn_q_b.weight", (h * (p.head_dim_nope + p.rope_dim), p.q_lora_rank), p.q_lora_rank
        yield b + "attn_kv_a_mqa.weight", (p.kv_lora_rank + p.rope_dim, d), d
        yield b + "attn_kv_a_norm.weight", (p.kv_lora_rank,), None
        if legacy_attention:
            yield b + "attn_kv_b.weight", (h * (p.head_dim_nope + p.head_dim_v), p.kv_lora_rank), p.kv_lora_rank
        else:
            yield b + "attn_k_b.weight", (h, p.kv_lora_rank, p.head_dim_nope), p.head_dim_nope
            yield b + "attn_v_b.weight", (h, p.head_dim_v, p.kv_lora_rank), p.kv_lora_rank
        yield b + "attn_output.weight", (d, h * p.head_dim_v), h * p.head_dim_v
        yield b + "ffn_norm.weight", (d,), None
        if layer < p.num_dense_layers:
            yield b + "ffn_gate.weight", (p.n_ff_dense, d), d
            yield b + "ffn_up.weight", (p.n_ff_dense, d), d
            yield b + "ffn_down.weight", (d, p.n_ff_dense), p.n_ff_dense
            continue
        e, f = p.num_experts, p.n_ff_expert
        yield b + "ffn_gate_inp.weight", (e, d), d
        yield b + "exp_probs_b.bias", (e,), None
        yield b + "ffn_gate_exps.weight", (e, f, d), d
        yield b + "ffn_up_exps.weight", (e, f, d), d
        yield b + "ffn_down_exps.weight", (e, d, f), f
        yield b + "ffn_gate_shexp.weight", (f, d), d
        yield b + "ffn_up_shexp.weight", (f, d), d
        yield b + "ffn_down_shexp.weight", (d, f), f
    yield "output_norm.weight", (d,), None
    yield "output.weight", (vocab_size, d), d


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], fan_in: int | None) -> np.ndarray:
    if fan_in is None:  # norms near 1, selection bias small
        centre = 0.0 if name.endswith(".bias") else 1.0
        return (centre + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    # Embeddings get unit scale; the output head is scaled up so logits spread like a trained model's;
    # projections back into the residual stream are scaled down so that, as in a trained model, each
    # layer adjusts the stream rather than replacing it (and rounding noise is not amplified layer by layer).
    scale = 4.0 if name == "output.weight" else RESIDUAL_BRANCH_SCALE if name.endswith(RESIDUAL_OUTPUTS) else 1.0
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale / np.sqrt(fan_in)))


def write_base_model(path: str | Path, preset: str | Preset = "tiny", seed: int = 0,
                     legacy_attention: bool = False) -> Path:
    """Write an unquantized model (F32 for tiny, F16 matrices for k2-slice) with the demo tokenizer."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    tokenizer = demo_tokenizer_metadata()
    vocab_size = len(tokenizer["tokenizer.ggml.tokens"])
    path = Path(path)
    writer = GGUFWriter(path, ARCH)
    write_metadata(writer, p, vocab_size, legacy_attention)
    add_tokenizer_to(writer, tokenizer)
    rng = np.random.default_rng(seed)
    for name, shape, fan_in in tensor_specs(p, vocab_size, legacy_attention):
        values = _random_tensor(rng, name, shape, fan_in)
        # Like the converter: 1-D tensors and the router stay F32; matrices take the base dtype.
        keep_f32 = fan_in is None or name.endswith("ffn_gate_inp.weight") or p.base_dtype == "f32"
        writer.add_tensor(name, values if keep_f32 else values.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


_QUANTIZE_SCRIPT = """
import json, sys
import llama_cpp
args = json.loads(sys.argv[1])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + args["ftype"])
params.nthread = args["threads"]
status = llama_cpp.llama_model_quantize(args["src"].encode(), args["dst"].encode(), params)
sys.exit(0 if status == 0 else 1)
"""


def quantize_with_llama_cpp(src: Path, dst: Path, quant: str, threads: int = 2) -> Path:
    """Quantize with llama.cpp's own llama-quantize logic (its per-tensor type mix and fallbacks)."""
    quant = quant.upper()
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown quant type '{quant}'; choose one of {', '.join(QUANT_TYPES)}")
    ftype = {"F32": "ALL_F32"}.get(quant, "MOSTLY_" + quant)
    if importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeError("quantizing needs llama.cpp's quantizer: pip install llama-cpp-python "
                           "(or install kimi-cluster with the [test] extra)")
    args = json.dumps({"src": str(src), "dst": str(dst), "ftype": ftype, "threads": threads})
    result = subprocess.run([sys.executable, "-c", _QUANTIZE_SCRIPT, args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant}:\n{result.stderr[-2000:]}")
    return dst


def make_model(out: str | Path, preset: str | Preset = "tiny", quant: str | None = None, seed: int = 0,
               legacy_attention: bool = False) -> Path:
    """Write a demo model to `out`; with `quant`, quantized by llama.cpp from a temporary base file."""
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if quant is None:
        return write_base_model(out, preset, seed, legacy_attention)
    base = out.with_name(out.name + ".base.tmp")
    try:
        write_base_model(base, preset, seed, legacy_attention)
        return quantize_with_llama_cpp(base, out, quant)
    finally:
        base.unlink(missing_ok=True)

