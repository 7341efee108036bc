"""The prompt cache on disk (`--prompt-cache-dir`): kept KV caches written as files, so that a restarted server,
or another one on the same model file, skips the prefill of a prompt it has seen (a coding agent's system prompt
and tools, a conversation it was in).

One file per kept cache, in a folder per model file, named by the file's identity: a digest of its size,
tensor layout and a sample of its weights, so that no other model (another quantization, a fine-tune of the
same shape) ever reads these rows. A file holds a header (format, identity, token count, row width), the
tokens, the rows of every layer, and a digest of tokens and rows: a file that is corrupt, truncated or
written for another model is skipped with one warning and never read into a cache. Files are written on a
background thread as caches are kept (rows before a cache's length never change, so no copy is needed), one
whose tokens begin a newer file's is removed, and the folder is held to its byte budget, the least recently
used files (by modification time, touched on each use) out.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gguf_file import GGUFModelFile
from .kv_cache import KVCache, bytes_per_token

MAGIC = b"KIMI-KV-1\n"
SAMPLED_TENSORS = ("token_embd.weight", "output.weight", "blk.0.attn_q_a.weight", "blk.0.attn_kv_a_mqa.weight")
SAMPLE_BYTES = 1 << 16


def model_identity(model_file: GGUFModelFile) -> str:
    """A digest of what decides a KV row: the file's size and tensor layout, and a sample of its weights."""
    digest = hashlib.sha256(f"{model_file.file_bytes}".encode())
    for name in sorted(model_file.tensors):
        info = model_file.info(name)
        digest.update(f"{name}:{info.ne}:{info.ggml_type.name}".encode())
    for name in SAMPLED_TENSORS:
        if model_file.has(name):
            digest.update(model_file.raw(name).reshape(-1).view(np.uint8)[:SAMPLE_BYTES].tobytes())
    return digest.hexdigest()[:32]


@dataclass
class StoredPrompt:
    path: Path
    tokens: np.ndarray  # int32
    size: int  # bytes of the file


class PromptStore:
    """The files of one model in `folder`/<identity>, within `budget_bytes`."""

    def __init__(self, folder: str | Path, identity: str, budget_bytes: int):
        self.folder, self.identity, self.budget_bytes = Path(folder) / identity, identity, budget_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self._stored: dict[Path, StoredPrompt] = {}  # written by the writer thread, read by the engine's
        self._lock = threading.Lock()
        for path in sorted(self.folder.glob("*.kv")):
            found = self._read_header(path)
            if found is not None:
                self._stored[path] = found
        self._writes: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="prompt-store", daemon=True)
        self._writer.start()

    def longest(self, wanted: np.ndarray) -> tuple[StoredPrompt | None, int]:
        """The stored prompt with the longest common prefix with `wanted`, and that prefix's length."""
        best, matched = None, 0
        for stored in self._snapshot():
            length = common_prefix(stored.tokens, wanted)
            if length > matched:
                best, matched = stored, length
        return best, matched

    def load(self, stored: StoredPrompt, cache: KVCache, rows: int) -> bool:
        """Fill cache rows [0, rows) from a stored prompt, a layer at a time (a file can hold gigabytes); False,
        with a warning and the file set aside, when the file does not hold what its header says (the cache's rows
        are then not to be used)."""
        try:
            with stored.path.open("rb") as f:
                header = self._header(f)
                count, layers = header["tokens"], _rows_of(cache)
                if header["row_bytes"] != bytes_per_token(cache.config):
                    raise ValueError(f"its rows are {header['row_bytes']} bytes, this model's "
                                     f"{bytes_per_token(cache.config)}")
                digest = hashlib.blake2b(_exactly(f, 4 * count), digest_size=32)
                for array in layers:
                    piece = _exactly(f, count * array[0].nbytes)
                    digest.update(piece)
                    array[:rows] = np.frombuffer(piece, array.dtype).reshape(count, *array.shape[1:])[:rows]
                if _exactly(f, 32) != digest.digest() or f.read(1):
                    raise ValueError("its digest does not match its contents")
        except (OSError, ValueError, KeyError) as e:
            self._set_aside(stored.path, e)
            return False
        os.utime(stored.path)  # recently used
        return True

    def save(self, tokens: np.ndarray, cache: KVCache) -> None:
        """Write a kept cache's first len(tokens) rows, in the background."""
        self._writes.put((np.asarray(tokens, np.int32).copy(), cache))

    def flush(self) -> None:
        """Wait until every save so far is on disk."""
        self._writes.join()

    def total_bytes(self) -> int:
        return sum(s.size for s in self._snapshot())

    def _snapshot(self) -> list[StoredPrompt]:
        with self._lock:
            return list(self._stored.values())

    # -- files ------------------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            tokens, cache = self._writes.get()
            try:
                self._write(tokens, cache)
            except OSError as e:
                print(f"kimi-cluster: warning: the prompt cache could not write to {self.folder}: {e}",
                      file=sys.stderr)
            finally:
                self._writes.task_done()

    def _write(self, tokens: np.ndarray, cache: KVCache) -> None:
        count = len(tokens)
        if any(common_prefix(s.tokens, tokens) == count for s in self._snapshot()):
            return  # a stored prompt already begins with all of this one
        layers, width = _rows_of(cache), bytes_per_token(cache.config)
        if (4 + width) * count > self.budget_bytes:
            return
        name = hashlib.sha256(tokens.tobytes()).hexdigest()[:24]
        path, partial = self.folder / f"{name}.kv", self.folder / f"{name}.kv.partial"
        digest = hashlib.blake2b(digest_size=32)
        header = json.dumps({"model": self.identity, "tokens": count, "row_bytes": width}).encode()
        with partial.open("wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header)
            for piece in (tokens.tobytes(), *(memoryview(np.ascontiguousarray(a[:count])).cast("B") for a in layers)):
                digest.update(piece)
                f.write(piece)
            f.write(digest.digest())
        partial.replace(path)  # whole or not at all
        for stored in [s for s in self._snapshot() if common_prefix(s.tokens, tokens) == len(s.tokens)]:
            self._remove(stored.path)  # this one holds it all
        with self._lock:
            self._stored[path] = StoredPrompt(path, tokens, path.stat().st_size)
        for stored in sorted(self._snapshot(), key=lambda s: s.path.stat().st_mtime):
            if self.total_bytes() <= self.budget_bytes:
                break
            self._remove(stored.path)

    def _read_header(self, path: Path) -> StoredPrompt | None:
        try:
            with path.open("rb") as f:
                header = self._header(f)
                tokens = np.frombuffer(f.read(4 * header["tokens"]), np.int32)
            if len(tokens) != header["tokens"]:
                raise ValueError("it ends inside its tokens")
        except (OSError, ValueError, KeyError) as e:
            self._set_aside(path, e)
            return None
        return StoredPrompt(path, tokens, path.stat().st_size)

    def _header(self, f) -> dict:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError("it is not a prompt cache file")
        (length,) = struct.unpack("<I", f.read(4))
        header = json.loads(f.read(length))
        if header.get("model") != self.identity:
            raise ValueError("it was written for another model file")
        return header

    def _set_aside(self, path: Path, why: Exception) -> None:
        print(f"kimi-cluster: warning: skipped {path} in the prompt cache: {why}", file=sys.stderr)
        self._remove(path)

    def _remove(self, path: Path) -> None:
        with self._lock:
            self._stored.pop(path, None)
        path.unlink(missing_ok=True)


def _exactly(f, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise ValueError("it ends early: cut short")
    return data


def _rows_of(cache: KVCache) -> list[np.ndarray]:
    """The arrays a cache's rows live in: keys per layer, and values apart from them in legacy files."""
    return list(cache.keys) + ([] if cache.config.is_mla else list(cache.values))


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many tokens two sequences share from their start."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
