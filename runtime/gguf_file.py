"""Open a Kimi K2.x GGUF (single file or split set) in place: metadata, tensor index, expert byte ranges.

Nothing here reads tensor data: tensors are memory-mapped views, so opening a 320 GiB split set costs
only its headers. Every problem with a file is a GGUFError that names the file and says what to do.
"""
from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .gguf_reader import GGUFError, open_reader

SUPPORTED_ARCHITECTURES = ("deepseek2",)
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
EXPERT_TENSOR_KINDS = ("gate", "up", "down", "gate_up")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: int  # index into GGUFModelFile.paths
    offset: int  # absolute byte offset of the data in that shard
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous axis (row length)
    nbytes: int

    @property
    def row_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return self.ne[0] // block_size * type_size


@dataclass(frozen=True)
class ByteRange:
    shard: int
    offset: int
    nbytes: int


def _open_reader(path: Path) -> GGUFReader:
    if path.is_dir():
        raise GGUFError(f"{path}: is a directory; give the path of a .gguf file (of a split set, its "
                        f"-00001-of-NNNNN.gguf part){_ggufs_inside(path)}")
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    return open_reader(path)


def _ggufs_inside(folder: Path) -> str:
    """A hint naming the model files in a folder (or one level down, where downloads put them)."""
    found = sorted(str(p.relative_to(folder)) for p in [*folder.glob("*.gguf"), *folder.glob("*/*.gguf")]
                   if (match := SPLIT_NAME.match(p.name)) is None or match["no"] == "00001")
    if not found:
        return "; it holds no .gguf file"
    return f"; it holds {', '.join(found[:3])}{' ...' if len(found) > 3 else ''}"


def field_value(field) -> Any:
    """A metadata field as a plain Python value (str, int, float, bool, or a list of them)."""
    main_type = field.types[0]
    if main_type == GGUFValueType.ARRAY:
        sub_type = field.types[-1]
        if sub_type == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        values = np.concatenate([field.parts[i] for i in field.data]) if field.data else np.array([])
        return values.tolist()
    if main_type == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    value = field.parts[field.data[0]][0]
    return bool(value) if main_type == GGUFValueType.BOOL else value.item()


def split_paths(first: Path, count: int) -> list[Path]:
    """The paths of a split set from its first file, named <prefix>-00001-of-0000N.gguf (1-based)."""
    match = SPLIT_NAME.match(first.name)
    if not match:
        raise GGUFError(f"{first}: has split.count = {count} but its name does not end in "
                        "-00001-of-NNNNN.gguf, so the other parts cannot be found; keep the original file names")
    prefix = match["prefix"]
    return [first.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


class GGUFModelFile:
    """A GGUF model, single or split, memory-mapped; tensors indexed by name across all parts."""

    def __init__(self, path: str | Path):
        first = Path(path)
        reader = _open_reader(first)
        self.metadata: dict[str, Any] = {
            name: field_value(field) for name, field in reader.fields.items() if not name.startswith("GGUF.")
        }
        split_count = int(self.metadata.get("split.count", 1))
        if split_count > 1 and int(self.metadata.get("split.no", 0)) != 0:
            raise GGUFError(f"{first}: is part {int(self.metadata['split.no']) + 1} of a split set; "
                            "open the first part (-00001-of-...) instead")
        self.paths = [first] if split_count <= 1 else split_paths(first, split_count)
        self._readers = [reader] + [self._open_part(p, i, split_count) for i, p in enumerate(self.paths[1:], 1)]
        self.tensors = self._index_tensors()
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and int(expected) != len(self.tensors):
            raise GGUFError(f"{first}: split.tensors.count says {expected} tensors but the {split_count} parts "
                            f"hold {len(self.tensors)}; a part is from another download")
        arch = self.metadata.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{first}: architecture '{arch}' is not supported; kimi-cluster runs "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)} models (Kimi K2, K2.5, K2.6, DeepSeek V3)")
        self.architecture: str = arch

    @staticmethod
    def _open_part(path: Path, index: int, count: int) -> GGUFReader:
        if not path.is_file():
            raise GGUFError(f"{path}: missing part {index + 1} of {count} of a split GGUF; "
                            "download every part into the same folder")
        reader = _open_reader(path)
        field = reader.fields.get("split.no")
        part_no = None if field is None else field_value(field)
        if part_no != index:
            raise GGUFError(f"{path}: expected split.no = {index}, found {part_no}; the part is misnamed or "
                            "from another download")
        return reader

    def _index_tensors(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for shard, reader in enumerate(self._readers):
            for t in reader.tensors:
                if t.name in tensors:
                    raise GGUFError(f"{self.paths[shard]}: tensor '{t.name}' also appears in "
                                    f"{self.paths[tensors[t.name].shard]}")
                tensors[t.name] = TensorInfo(t.name, shard, int(t.data_offset), GGMLQuantizationType(t.tensor_type),
                                             tuple(int(d) for d in t.shape), int(t.n_bytes))
        return tensors

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def file_bytes(self) -> int:
        return sum(len(r.data) for r in self._readers)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: required tensor '{name}' is missing; the file is incomplete "
                            "or was made for another architecture") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file (no copy)."""
        info = self.info(name)
        return self.byte_view(ByteRange(info.shard, info.offset, info.nbytes))

    def byte_view(self, byte_range: ByteRange) -> np.ndarray:
        data = self._readers[byte_range.shard].data
        return data[byte_range.offset: byte_range.offset + byte_range.nbytes]

    def prefetch(self, name: str) -> None:
        """Read a tensor's pages in now: the OS is asked to read ahead (one big read from disk, not a fault
        per 4 KB page during the first token), then every page is touched so that it is mapped."""
        info = self.info(name)
        self.advise(ByteRange(info.shard, info.offset, info.nbytes), mmap.MADV_WILLNEED)
        int(self.raw(name)[::mmap.PAGESIZE].sum(dtype=np.uint64))

    def advise(self, byte_range: ByteRange, advice: int) -> None:
        """Tell the OS how the pages of these bytes (and of the pages they share with neighbours) will be
        read: mmap.MADV_WILLNEED, MADV_RANDOM, ..."""
        mapped = self._readers[byte_range.shard].data._mmap
        first_page = byte_range.offset // mmap.PAGESIZE * mmap.PAGESIZE
        if mapped is not None:
            mapped.madvise(advice, first_page, byte_range.offset + byte_range.nbytes - first_page)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process (they stay in the OS page cache), e.g. after copying it."""
        info = self.info(name)
        mapped = self._readers[info.shard].data._mmap
        first_page = -(-info.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        last_page = (info.offset + info.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if mapped is not None and last_page > first_page:
            mapped.madvise(mmap.MADV_DONTNEED, first_page, last_page - first_page)

    def expert_range(self, layer: int, expert: int, kind: str) -> ByteRange:
        """Bytes of one routed expert inside blk.{layer}.ffn_{kind}_exps.weight; experts are the slowest axis."""
        if kind not in EXPERT_TENSOR_KINDS:
            raise ValueError(f"expert tensor kind must be one of {EXPERT_TENSOR_KINDS}, not '{kind}'")
        info = self.info(f"blk.{layer}.ffn_{kind}_exps.weight")
        num_experts = info.ne[2]
        if not 0 <= expert < num_experts:
            raise ValueError(f"layer {layer} has {num_experts} experts; expert {expert} does not exist")
        bytes_per_expert = info.nbytes // num_experts
        return ByteRange(info.shard, info.offset + expert * bytes_per_expert, bytes_per_expert)

    def expert_kinds(self, layer: int) -> tuple[str, ...]:
        """Which expert tensors a MoE layer stores: fused gate_up + down, or gate + up + down."""
        if self.has(f"blk.{layer}.ffn_gate_up_exps.weight"):
            return ("gate_up", "down")
        return ("gate", "up", "down")

    def expert_bytes(self, layer: int, expert: int) -> int:
        return sum(self.expert_range(layer, expert, kind).nbytes for kind in self.expert_kinds(layer))

    def routed_expert_bytes(self, owned: Mapping[int, Iterable[int]] | None = None) -> int:
        """Bytes of the routed experts in `owned` (layer -> expert ids), or of every routed expert."""
        if owned is None:
            return sum(info.nbytes for name, info in self.tensors.items() if "_exps." in name)
        return sum(self.expert_bytes(layer, expert) for layer, experts in owned.items() for expert in experts)

    def check_tensors(self, expected: Mapping[str, tuple[int, ...]], optional: Iterable[str] = (),
                      computable_types: Iterable[GGMLQuantizationType] | None = None) -> None:
        """Every expected tensor is present with its ggml shape, and of a type this build computes."""
        optional = set(optional)
        allowed = None if computable_types is None else set(computable_types)
        for name, ne in expected.items():
            if name not in self.tensors:
                if name in optional:
                    continue
                self.info(name)
            info = self.tensors[name]
            if _without_trailing_ones(info.ne) != _without_trailing_ones(ne):  # ggml's [64, 256] is [64, 256, 1]
                raise GGUFError(f"{self.paths[info.shard]}: tensor '{name}' has shape {list(info.ne)} but the "
                                f"metadata implies {list(ne)}; the file's metadata and tensors disagree")
            if allowed is not None and info.ggml_type not in allowed:
                raise GGUFError(f"{self.paths[info.shard]}: tensor '{name}' is {info.ggml_type.name}, a type this "
                                "build cannot compute; use a file quantized to a supported type")


def _without_trailing_ones(ne: Iterable[int]) -> tuple[int, ...]:
    ne = tuple(ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne = ne[:-1]
    return ne
