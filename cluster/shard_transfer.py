"""Expert shards as a byte stream: what the head sends a worker that has no copy of the model.

A shard is a msgpack manifest (per MoE layer and tensor kind: type, row shape, expert ids, offset,
sha256) followed by the experts' bytes in manifest order. The worker writes the stream to a cache file,
checks every checksum, and maps the file; a later start with the same manifest reuses the cache.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import msgpack
import numpy as np
from gguf import GGMLQuantizationType

from runtime.experts import ExpertShard
from runtime.ggml_ops import GgmlRunner, Weight, repack
from runtime.gguf_file import GGUFModelFile

CHUNK_BYTES = 4 << 20


def build_manifest(model_file: GGUFModelFile, owned: Mapping[int, Sequence[int]]) -> dict:
    """Describe the bytes of `owned` experts, layer by layer, without reading them (checksums are
    filled in by stream_shard, which reads the bytes anyway)."""
    entries, offset = [], 0
    for layer in sorted(owned):
        experts = sorted(int(e) for e in owned[layer])
        for kind in model_file.expert_kinds(layer):
            info = model_file.info(f"blk.{layer}.ffn_{kind}_exps.weight")
            per_expert = info.nbytes // info.ne[2]
            entries.append({"layer": layer, "kind": kind, "ggml_type": int(info.ggml_type), "ne": list(info.ne[:2]),
                            "num_experts": info.ne[2], "experts": experts, "bytes_per_expert": per_expert,
                            "offset": offset, "sha256": None})
            offset += per_expert * len(experts)
    return {"model": model_file.path.name, "entries": entries, "total_bytes": offset}


def stream_shard(model_file: GGUFModelFile, manifest: dict) -> Iterator[tuple[bytes, bytes]]:
    """(manifest, data) chunks: the manifest (with checksums filled in) first, then the bytes in order."""
    for entry in manifest["entries"]:
        digest = hashlib.sha256()
        for expert in entry["experts"]:
            digest.update(model_file.byte_view(model_file.expert_range(entry["layer"], expert, entry["kind"])))
        entry["sha256"] = digest.hexdigest()
    yield msgpack.packb(manifest), b""
    pending = bytearray()
    for entry in manifest["entries"]:
        for expert in entry["experts"]:
            pending += model_file.byte_view(model_file.expert_range(entry["layer"], expert, entry["kind"])).data
            while len(pending) >= CHUNK_BYTES:
                yield b"", bytes(pending[:CHUNK_BYTES])
                del pending[:CHUNK_BYTES]
    if pending:
        yield b"", bytes(pending)


def cache_path(cache_dir: Path, manifest: dict) -> Path:
    key = hashlib.sha256(msgpack.packb(manifest)).hexdigest()[:16]
    return cache_dir / f"{Path(manifest['model']).stem}-{key}.shard"


def verify(path: Path, manifest: dict) -> bool:
    """Whether the cache file holds exactly the manifest's bytes."""
    if not path.exists() or path.stat().st_size != manifest["total_bytes"]:
        return False
    data = np.memmap(path, np.uint8, "r") if manifest["total_bytes"] else np.zeros(0, np.uint8)
    for entry in manifest["entries"]:
        size = entry["bytes_per_expert"] * len(entry["experts"])
        if hashlib.sha256(data[entry["offset"]: entry["offset"] + size]).hexdigest() != entry["sha256"]:
            return False
    return True


def receive_shard(chunks: Iterator[tuple[bytes, bytes]], cache_dir: Path,
                  on_bytes: Callable[[int], None] = lambda n: None,
                  on_manifest: Callable[[dict], None] = lambda m: None) -> tuple[Path, dict]:
    """Write a streamed shard to the cache and check it; an identical cached shard is kept as it is."""
    chunks = iter(chunks)
    manifest_bytes, _ = next(chunks)
    manifest = msgpack.unpackb(manifest_bytes)
    on_manifest(manifest)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_path(cache_dir, manifest)
    if verify(path, manifest):
        for _ in chunks:  # drain: the sender streams regardless
            pass
        on_bytes(manifest["total_bytes"])
        return path, manifest
    partial = path.with_suffix(".part")
    received = 0
    with open(partial, "wb") as out:
        for _, data in chunks:
            out.write(data)
            received += len(data)
            on_bytes(len(data))
    if received != manifest["total_bytes"]:
        raise ValueError(f"shard stream ended after {received} of {manifest['total_bytes']} bytes")
    partial.replace(path)
    if not verify(path, manifest):
        path.unlink()
        raise ValueError("shard checksum mismatch: the bytes were corrupted in transit; restart the worker")
    return path, manifest


def load_shard(path: Path, manifest: dict, runner: GgmlRunner, repack_experts: bool = False) -> ExpertShard:
    """Map a cached shard file as an ExpertShard (compact tensors, global ids mapped to positions); with
    repack_experts, copy them into ggml's interleaved layout instead, as ExpertShard.from_model_file does."""
    data = np.memmap(path, np.uint8, "r")
    tensors: dict[int, dict[str, Weight]] = {}
    local_index: dict[int, np.ndarray] = {}
    for entry in manifest["entries"]:
        layer, experts = entry["layer"], entry["experts"]
        size = entry["bytes_per_expert"] * len(experts)
        ne = tuple(entry["ne"]) + (len(experts),)
        weight = Weight(GGMLQuantizationType(entry["ggml_type"]), ne, data[entry["offset"]: entry["offset"] + size])
        tensors.setdefault(layer, {})[entry["kind"]] = repack(weight) if repack_experts else weight
        index = np.full(entry["num_experts"], -1, np.int32)
        index[experts] = np.arange(len(experts), dtype=np.int32)
        local_index[layer] = index
    return ExpertShard(runner, tensors, local_index)
