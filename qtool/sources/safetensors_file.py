"""A ``.safetensors`` file's header, parsed and validated before the library touches the file.

Layout: u64 little-endian header length N, N bytes of JSON (``{name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}``), then the data; offsets are
relative to the data start. We check the length against the file size (and the format's
100 MB cap) before reading it, and every tensor's dtype, shape, byte count and range,
so ``safe_open`` only ever sees a consistent file.
"""
from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import CorruptFile, NotFound

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


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate; CorruptFile naming the file and the problem when anything is off."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path} does not exist; check the path")

    def fail(what: str) -> CorruptFile:
        return CorruptFile(f"{path}: {what}; the file is truncated or corrupt (re-download or re-save it)")

    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise fail(f"{file_size} bytes is too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > file_size - 8:
            raise fail(f"header length {length} is larger than the {file_size - 8} bytes after it")
        if length > MAX_HEADER_BYTES:
            raise fail(f"header length {length} exceeds the safetensors limit of {MAX_HEADER_BYTES}")
        raw = handle.read(length)
    if len(raw) < 2 or raw[:1] != b"{":
        raise fail("header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise fail(f"header names {exc.args[0]!r} twice") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise fail(f"header is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
    if not isinstance(header, dict):
        raise fail("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise fail("__metadata__ must map strings to strings")
    data_start = 8 + length
    data_bytes = file_size - data_start
    tensors = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(f"entry for tensor {name!r} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise fail(f"tensor {name!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise fail(f"tensor {name!r} has a bad shape {str(shape)[:60]}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise fail(f"tensor {name!r} has bad data_offsets {str(offsets)[:60]}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise fail(f"tensor {name!r} data_offsets [{begin}, {end}] fall outside the "
                       f"{data_bytes} data bytes")
        elements = 1
        for dim in shape:
            elements *= dim
            if elements * DTYPE_BITS[dtype] > 8 * data_bytes:
                # Stop multiplying absurd dims early (no huge ints, no overflow downstream).
                raise fail(f"tensor {name!r} shape {shape} needs more bytes than the file holds")
        if (elements * DTYPE_BITS[dtype] + 7) // 8 != end - begin:
            raise fail(f"tensor {name!r} has {end - begin} bytes but {dtype} {shape} needs "
                       f"{(elements * DTYPE_BITS[dtype] + 7) // 8}")
        tensors.append(SafetensorsTensor(name, dtype, tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda tensor: (tensor.begin, tensor.end))
    for first, second in itertools.pairwise(tensors):
        if first.end > second.begin:
            raise fail(f"tensors {first.name!r} and {second.name!r} overlap")
    return SafetensorsHeader(path, file_size, data_start, metadata, tensors)
