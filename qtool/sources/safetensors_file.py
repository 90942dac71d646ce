"""A ``.safetensors`` file's header, parsed and validated before the library touches the file.

Layout: u64 little-endian header length N, N bytes of JSON (``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}``), then the data; offsets are
relative to the data start. We check the length against the file size (and the format's
100 MB cap) before reading it, and every tensor's dtype, shape, byte count and range, and
that the tensors fill the data area exactly, back to back (as the safetensors library
requires), so ``safe_open`` only ever sees a consistent file. Names must be valid Unicode
(no lone surrogates); control characters are kept (printing escapes them).
"""
from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import CorruptFile
from qtool.sources.jsonfile import clip, load_json, open_regular, require_regular_file

# safetensors' own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class SafetensorsTensor:
    name: str
    dtype: str                 # safetensors dtype string: "BF16", "U8", ...
    shape: tuple[int, ...]
    begin: int                 # absolute byte offsets in the file
    end: int

    @property
    def n_bytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsHeader:
    path: Path
    file_size: int
    header_bytes: int          # 8 + JSON length
    metadata: dict[str, str]   # __metadata__
    tensors: list[SafetensorsTensor]  # in data order


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate; CorruptFile naming the file and the problem when anything is off."""
    path = Path(path)

    def fail(what: str) -> CorruptFile:
        return CorruptFile(f"{path}: {what}; the file is truncated or corrupt (re-download or re-save it)")

    file_size = require_regular_file(path, "safetensors file").st_size
    with open_regular(path, "safetensors file") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise fail(f"{file_size} bytes is too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > file_size - 8:
            raise fail(f"header length {length} is larger than the {file_size - 8} bytes after it")
        if length > MAX_HEADER_BYTES:
            raise fail(f"header length {length} exceeds the safetensors limit of {MAX_HEADER_BYTES}")
        raw = handle.read(length)
    if len(raw) < length:
        raise fail(f"ended inside the {length}-byte header")
    if len(raw) < 2 or raw[:1] != b"{":
        raise fail("header is not a JSON object")
    header = load_json(raw, "header", origin=path, max_bytes=MAX_HEADER_BYTES, reject_duplicates=True)

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise fail("__metadata__ must map strings to strings")
    data_start = 8 + length
    data_bytes = file_size - data_start
    tensors = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(f"entry for tensor {clip(name)} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise fail(f"tensor {clip(name)} has unknown dtype {clip(dtype, 40)}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise fail(f"tensor {clip(name)} has a bad shape {clip(shape, 60)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise fail(f"tensor {clip(name)} has bad data_offsets {clip(offsets, 60)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise fail(f"tensor {clip(name)} data_offsets {clip(offsets, 60)} fall outside the "
                       f"{data_bytes} data bytes")
        elements = 1
        for dim in shape:
            elements *= dim
            if elements * DTYPE_BITS[dtype] > 8 * data_bytes:
                # Stop multiplying absurd dims early (no huge ints, no overflow downstream).
                raise fail(f"tensor {clip(name)} shape {clip(shape, 60)} needs more bytes than the file holds")
        if (elements * DTYPE_BITS[dtype] + 7) // 8 != end - begin:
            raise fail(f"tensor {clip(name)} has {end - begin} bytes but {dtype} {clip(shape, 60)} needs "
                       f"{(elements * DTYPE_BITS[dtype] + 7) // 8}")
        tensors.append(SafetensorsTensor(name, dtype, tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda tensor: (tensor.begin, tensor.end))
    # The safetensors library's rule: tensors back to back from the data start to the file's end.
    if tensors and tensors[0].begin != data_start:
        raise fail(f"{tensors[0].begin - data_start} data bytes before the first tensor "
                   f"{clip(tensors[0].name)} belong to no tensor")
    for first, second in itertools.pairwise(tensors):
        if first.end > second.begin:
            raise fail(f"tensors {clip(first.name)} and {clip(second.name)} overlap")
        if first.end < second.begin:
            raise fail(f"{second.begin - first.end} data bytes between tensors {clip(first.name)} and "
                       f"{clip(second.name)} belong to no tensor")
    data_end = tensors[-1].end if tensors else data_start
    if data_end != file_size:
        raise fail(f"{file_size - data_end} data bytes after the last tensor belong to no tensor")
    return SafetensorsHeader(path, file_size, data_start, metadata, tensors)
