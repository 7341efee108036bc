"""Kimi K2.6 at its real size as a sparse file set: every header of the real UD-Q2_K_XL download, no data.

The 320 GiB model cannot be fetched here, but everything that depends only on its size can be tested:
opening 8 parts, placing 23,040 (layer, expert) pairs, a 163,840-token vocabulary, KV caches and
messages at K2 widths, the memory a head needs. The parts carry Kimi K2.6's real metadata, tensor
names, shapes and split layout, with the quantization types below; tensor data is left as file holes,
which read as zeros, so the set takes a few MiB of disk. A model of zeros computes at full cost but says
nothing: every logit is equal, and every router score too. Only the routers' selection biases are
written (random, 90 KiB in all), so that each layer sends its tokens to 8 experts of its own, spread
over the nodes as a real model's are (the same 8 for every token, as the scores do not vary).

The types follow Unsloth's dynamic 2-bit recipe as its pages describe it (routed experts in 2-bit
K-quants, the layers that matter most upcast). The per-tensor types of the real files are not
published, so this table is an approximation chosen to land near the real 320 GiB (340 GB in decimal units):

    routed experts (gate, up, down)                        Q2_K
    attention (q_a, q_b, output), shared experts,
      dense layer's FFN, output head                       Q6_K
    attention kv_a_mqa, k_b, v_b (small, precise)          Q8_0
    token embeddings                                       Q4_K
    norms, router weights and biases                       F32
"""
from __future__ import annotations

import math
from pathlib import Path
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from .demo_model import ARCH, Preset, tensor_specs, write_metadata
from .demo_vocab import add_tokenizer_to, kimi_tokenizer_metadata, synthetic_bpe

T = GGMLQuantizationType
# Kimi K2 / K2.5 / K2.6 (KIMI_GGUF's hyperparameters): 61 layers, the first dense, 384 experts of 2048.
K2_6 = Preset(n_embd=7168, num_layers=61, num_dense_layers=1, num_heads=64, q_lora_rank=1536, kv_lora_rank=512,
              head_dim_nope=128, rope_dim=64, head_dim_v=128, n_ff_dense=18432, n_ff_expert=2048, num_experts=384,
              num_experts_used=8, base_dtype="bf16")
BPE_RANKS = 163_584  # + 256 special slots = 163,840 ids, [BOS] at 163584 as in the real vocabulary
PARTS = 8
NAME = "Kimi-K2.6-UD-Q2_K_XL"


def ud_q2_k_xl_type(name: str) -> GGMLQuantizationType:
    """The type a tensor gets in the replica (the table in this module's docstring)."""
    kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
    if name.endswith((".bias", "_norm.weight", "norm.weight")) or kind == "ffn_gate_inp":
        return T.F32
    if kind.endswith("_exps"):
        return T.Q2_K
    if kind in ("attn_kv_a_mqa", "attn_k_b", "attn_v_b"):
        return T.Q8_0
    if kind == "token_embd":
        return T.Q4_K
    return T.Q6_K


def tensor_bytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    return math.prod(shape) // block_size * type_size


def part_paths(out: Path, parts: int = PARTS) -> list[Path]:
    """<folder>/<stem>-0000i-of-0000N.gguf for out = <folder>/<stem>[.gguf], as Unsloth names its parts."""
    stem = out.name.removesuffix(".gguf")
    return [out.with_name(f"{stem}-{i:05d}-of-{parts:05d}.gguf") for i in range(1, parts + 1)]


def write_sparse_replica(out: str | Path, parts: int = PARTS, seed: int = 0) -> list[Path]:
    """Write the replica's parts next to `out` (see part_paths); returns their paths, the first one first."""
    p, paths = K2_6, part_paths(Path(out), parts)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    tokenizer = kimi_tokenizer_metadata(*synthetic_bpe(BPE_RANKS))
    vocab_size = len(tokenizer["tokenizer.ggml.tokens"])
    specs = [(name, shape, ud_q2_k_xl_type(name)) for name, shape, _ in tensor_specs(p, vocab_size)]
    rng = np.random.default_rng(seed)
    for index, (path, tensors) in enumerate(zip(paths, _split_by_bytes(specs, parts))):
        writer = GGUFWriter(path, ARCH)
        if index == 0:  # model metadata lives in the first part only, as gguf-split writes it
            write_metadata(writer, p, vocab_size, name="Kimi-K2.6 replica (sparse: zeros but the routers' biases)")
            add_tokenizer_to(writer, tokenizer)
        else:
            writer.kv_data[0].clear()  # drop general.architecture: later parts hold only the split keys
        writer.add_uint16("split.no", index)
        writer.add_uint16("split.count", parts)
        writer.add_int32("split.tensors.count", len(specs))
        data_bytes, biases = 0, {}
        for name, shape, ggml_type in tensors:
            nbytes = tensor_bytes(shape, ggml_type)
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type)
            if name.endswith("exp_probs_b.bias"):
                biases[data_bytes] = rng.standard_normal(shape, dtype=np.float32)
            data_bytes += GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        out_file = writer.fout[0]
        data_start = GGUFWriter.ggml_pad(out_file.tell(), writer.data_alignment)
        out_file.truncate(data_start + data_bytes)  # the data: a hole, read back as zeros
        for offset, values in biases.items():
            out_file.seek(data_start + offset)
            out_file.write(values.tobytes())
        writer.close()
    return paths


def _split_by_bytes(specs: list, parts: int) -> list[list]:
    """Consecutive runs of tensors (none split) of about equal bytes, as llama-gguf-split --split-max-size."""
    total = sum(tensor_bytes(shape, t) for _, shape, t in specs)
    groups: list[list] = [[] for _ in range(parts)]
    done = 0
    for spec in specs:
        group = min(int(done * parts / total), parts - 1)
        groups[group].append(spec)
        done += tensor_bytes(spec[1], spec[2])
    if any(not group for group in groups):
        raise ValueError(f"cannot split {len(specs)} tensors into {parts} non-empty parts")
    return groups
