"""Reading one GGUF file's header, with every way it can be broken said in our words.

gguf-py's GGUFReader parses the header; on a damaged file it fails with whatever numpy or Python says at
the spot (a dtype view, an index out of bounds, "Sorry, file appears to be version 2560279706"). Here the
header's fixed part is checked first (magic, version, counts that fit the file), each metadata entry and
tensor record is parsed on its own so that a failure names the entry, and every tensor's type, shape
and bytes are checked against the file before a view is made.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)
FIXED_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
MIN_ENTRY_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
MIN_TENSOR_RECORD_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, dims count, one dim, type, offset
MAX_DIMS = 4  # GGML_MAX_DIMS
# What numpy and gguf-py raise when a header runs past the end of the file or holds nonsense.
PARSE_ERRORS = (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError, RecursionError)


class GGUFError(ValueError):
    """A GGUF file that cannot be used, with the file named and what to do about it."""


def open_reader(path: Path) -> GGUFReader:
    """The file's parsed header (tensor data stays mapped, unread), or a GGUFError naming what is wrong."""
    try:
        return _CheckedReader(path)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    except PARSE_ERRORS:  # a failure outside the entries, e.g. in the alignment
        raise GGUFError(f"{path}: the GGUF header is corrupt and cannot be read; download the file again") from None


def _check_fixed_header(data: np.ndarray) -> None:
    if bytes(data[:4]) != b"GGUF" and not b"GGUF".startswith(bytes(data[:4])):  # a shorter start is truncated
        raise GGUFError(f"is not a GGUF file (it starts with {bytes(data[:4])!r}, a GGUF file with b'GGUF')")
    if len(data) < FIXED_HEADER.size:
        raise GGUFError(f"is {len(data)} bytes long, too short for a GGUF header: the file is truncated; download it "
                        "again")
    _, version, tensor_count, entry_count = FIXED_HEADER.unpack(bytes(data[:FIXED_HEADER.size]))
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise GGUFError("is a big-endian GGUF file; llama.cpp and kimi-cluster read little-endian ones")
        raise GGUFError(f"says GGUF version {version}, but only versions "
                        f"{' and '.join(map(str, SUPPORTED_VERSIONS))} exist; the file is corrupt")
    room = len(data) - FIXED_HEADER.size
    if entry_count * MIN_ENTRY_BYTES + tensor_count * MIN_TENSOR_RECORD_BYTES > room:
        raise GGUFError(f"is {len(data):,} bytes long but its header lists {entry_count:,} metadata entries and "
                        f"{tensor_count:,} tensors, which need more: the file is truncated or corrupt; download it "
                        "again")


class _CheckedReader(GGUFReader):
    def __init__(self, path: Path):
        if path.stat().st_size == 0:  # numpy cannot map an empty file
            raise GGUFError("is empty (0 bytes): the download or copy did not finish; download the file again")
        _check_fixed_header(np.memmap(path, mode="r"))
        super().__init__(path)

    def _build_fields(self, offs: int, count: int) -> int:
        for index in range(int(count)):
            try:
                offs = super()._build_fields(offs, 1)
            except PARSE_ERRORS as e:
                raise GGUFError(self._unreadable("metadata entry", index, count, offs, e)) from None
        return offs

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        # gguf-py reads an array one value at a time and, past the end of the file, reads empty values
        # without moving on: a damaged count would loop for ever. Refuse counts the file cannot hold.
        if raw_type == GGUFValueType.ARRAY:
            item_type, count = int(self._get(orig_offs, np.uint32)[0]), int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = self.gguf_scalar_to_np.get(item_type)
            item_bytes = np.dtype(scalar).itemsize if scalar else 8 if item_type == GGUFValueType.STRING else 12
            if count * item_bytes > len(self.data) - orig_offs:
                raise GGUFError(f"holds an array of {count:,} values, more than the rest of the file can")
            if scalar or item_type == GGUFValueType.STRING:
                return self._get_flat_array(orig_offs, item_type, count)
        return super()._get_field_parts(orig_offs, raw_type)

    def _get_flat_array(self, orig_offs: int, item_type: int, count: int):
        """gguf-py's parts for an array of scalars or strings, built from one plain view of the file:
        gguf-py makes a memory-map slice per value, 15 s for the 163,840 tokens and 163,328 merges of a
        Kimi vocabulary."""
        data = self.data.view(np.ndarray)  # slices of a plain array cost a tenth of a memmap's
        head = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        offs = orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(item_type)
        if scalar:
            end = offs + count * np.dtype(scalar).itemsize
            if end > len(data):
                raise GGUFError(f"holds an array of {count:,} values that runs past the end of the file")
            values = data[offs:end].view(scalar)
            return end - orig_offs, head + [values[i:i + 1] for i in range(count)], list(range(2, count + 2)), \
                [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        parts, raw = list(head), memoryview(data)
        for _ in range(count):
            length = int.from_bytes(raw[offs:offs + 8], "little")
            if offs + 8 + length > len(data):
                raise GGUFError("holds a string that runs past the end of the file")
            parts += [data[offs:offs + 8].view(np.uint64), data[offs + 8:offs + 8 + length]]
            offs += 8 + length
        return offs - orig_offs, parts, list(range(3, 2 * count + 2, 2)), [GGUFValueType.ARRAY, GGUFValueType.STRING]

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list]:
        records = []
        for index in range(int(count)):
            try:
                offs, [record] = super()._build_tensor_info(offs, 1)
            except PARSE_ERRORS as e:
                raise GGUFError(self._unreadable("tensor record", index, count, offs, e, records)) from None
            records.append(record)
        return offs, records

    def _unreadable(self, what: str, index: int, count: int, offs: int, error: Exception,
                    records: list | None = None) -> str:
        previous = records[-1].name if records else next(reversed(self.fields)) if index else None
        entry = f"{what} {index + 1} of {count}"
        if previous and not previous.startswith("GGUF."):
            entry += f" (the one after '{previous}')"
        if isinstance(error, KeyError):  # gguf-py's duplicate key
            problem = "repeats a key already set"
        elif isinstance(error, GGUFError):
            problem = str(error)
        else:
            problem = f"at byte {offs:,} " + ("runs past the end of the file" if offs >= len(self.data) - 8
                                              else "cannot be read")
        return f"{entry} {problem}: the header is corrupt or truncated; download the file again"

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        names = set()
        for field in fields:
            _, name_data, _, dims, raw_type, tensor_offset = field.parts
            name = bytes(name_data).decode("utf-8", "replace")
            if name in names:
                raise GGUFError(f"tensor '{name}' appears twice; the header is corrupt")
            names.add(name)
            _check_tensor(name, [int(d) for d in dims], int(raw_type[0]), start_offs + int(tensor_offset[0]),
                          self.alignment, len(self.data))
        super()._build_tensors(start_offs, fields)


def _check_tensor(name: str, dims: list[int], type_id: int, start: int, alignment: int, file_size: int) -> None:
    try:
        ggml_type = GGMLQuantizationType(type_id)
    except ValueError:
        raise GGUFError(f"tensor '{name}' has ggml type id {type_id}, which this build does not know; update "
                        "kimi-cluster (and its gguf package) or re-quantize the file") from None
    if not 1 <= len(dims) <= MAX_DIMS or min(dims) < 1:
        raise GGUFError(f"tensor '{name}' has shape {dims}; a tensor has 1 to {MAX_DIMS} dimensions of at least 1")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if dims[0] % block_size:
        raise GGUFError(f"tensor '{name}' is {ggml_type.name}, whose rows come in blocks of {block_size}, but its "
                        f"rows have {dims[0]} values; the header is corrupt")
    if start % alignment:
        raise GGUFError(f"tensor '{name}' starts at byte {start:,}, not a multiple of the file's alignment "
                        f"{alignment}; the header is corrupt")
    end = start + int(np.prod(dims, dtype=object)) * type_size // block_size
    if end > file_size:
        raise GGUFError(f"tensor '{name}' needs bytes up to {end:,} but the file has only {file_size:,} bytes: "
                        "the file is truncated or corrupt; download it again")
