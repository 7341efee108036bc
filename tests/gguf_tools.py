"""Rewrite GGUF files for tests: split a file into parts, or copy it with keys or tensors changed."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from runtime.gguf_file import field_value


def rewrite_gguf(src: Path, dst: Path, *, drop_keys: set[str] = frozenset(), drop_tensors: set[str] = frozenset(),
                 set_keys: dict[str, tuple[Any, GGUFValueType]] | None = None, split_parts: int = 1,
                 fuse_gate_up: bool = False) -> Path:
    """Copy src to dst (dst names the first part when split_parts > 1), tensors byte for byte.

    fuse_gate_up stores each MoE layer's gate and up experts as one ffn_gate_up_exps tensor (gate rows,
    then up rows, per expert), as llama.cpp's converter does with --fuse-gate-up-exps."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(src)
    arch = field_value(reader.fields["general.architecture"])
    tensors = [t for t in reader.tensors if t.name not in drop_tensors]
    per_part = -(-len(tensors) // split_parts)
    writer = GGUFWriter(dst, arch, split_max_tensors=per_part if split_parts > 1 else 0)
    set_keys = set_keys or {}
    skipped = set(drop_keys) | set(set_keys) | {"general.architecture"}
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "split.")) or name in skipped:
            continue
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field_value(field), field.types[0], sub_type)
    for name, (value, vtype) in set_keys.items():
        writer.add_key_value(name, value, vtype)
    by_name = {t.name: t for t in tensors}
    for t in tensors:
        if fuse_gate_up and t.name.endswith("ffn_up_exps.weight"):
            continue
        if fuse_gate_up and t.name.endswith("ffn_gate_exps.weight"):
            up = by_name[t.name.replace("gate", "up")]
            assert up.tensor_type == t.tensor_type, "fusing needs gate and up of one type"
            fused = np.concatenate([t.data, up.data], axis=1)  # [experts, 2 * n_ff, row bytes]
            writer.add_tensor(t.name.replace("gate_exps", "gate_up_exps"), fused, raw_dtype=t.tensor_type)
            continue
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst if split_parts == 1 else sorted(dst.parent.glob(f"{dst.stem}-00001-of-*.gguf"))[0]


def edit_in_place(path: Path, edit: Callable[[GGUFReader], None]) -> None:
    """Change fixed-size values of a GGUF file in place (the reader's arrays map the file read-write)."""
    reader = GGUFReader(path, "r+")
    edit(reader)
    reader.data.flush()
    del reader
