"""A GGUF file's header, parsed and validated before anything in it is trusted.

Every count, length and offset is checked against the bytes that are actually left in the
file before it is used, so a truncated or malicious file fails with CorruptFile at once and
never makes us allocate memory in proportion to a claimed size. Tensor data stays in the
memory map; :meth:`GGUFFile.raw` returns a view of one tensor's bytes.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor count, u64 kv
count, kv pairs (string key, u32 type, value), tensor infos (string name, u32 n_dims, u64
dims[n_dims], u32 ggml type, u64 offset), padding to ``general.alignment`` (default 32),
tensor data (each tensor's offset relative to the data start and aligned).
"""
from __future__ import annotations

import itertools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qtool.errors import CorruptFile, NotFound
from qtool.sources.jsonfile import clip, open_regular, require_regular_file

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4              # GGML_MAX_DIMS
MAX_NAME_BYTES = 64       # GGML_MAX_NAME: llama.cpp refuses longer tensor names
# Longest key or tensor name we read (the GGUF spec caps keys at 65535 bytes). A flipped bit in a
# length fails here at once instead of turning megabytes of tensor data into a "name".
MAX_KEY_BYTES = 65535
MAX_ARRAY_DEPTH = 4       # nested arrays are legal in the spec but never used this deep

# Metadata value types (gguf.GGUFValueType): id -> (name, struct format or None).
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                 10: "<u8", 11: "<i8", 12: "<f8"}
# Smallest encoding of one value of each type, to bound counts before reading them.
_MIN_VALUE_BYTES = {8: 8, 9: 12}


def ggml_type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"TYPE_{type_id}"


@dataclass(frozen=True)
class GGUFTensor:
    name: str                  # GGUF name (blk.0.attn_q.weight)
    type_id: int               # GGMLQuantizationType value
    type_name: str             # "Q4_1", "F32", ...
    dims: tuple[int, ...]      # GGML order: ne[0] (contiguous, row length) first
    offset: int                # absolute byte offset in the file
    n_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Torch / numpy shape: GGML dims reversed (rows first)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.dims:
            count *= dim
        return count


class GGUFFile:
    """A parsed, validated GGUF file over a read-only memory map. Use as a context manager or close()."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file_size = require_regular_file(self.path, "GGUF file").st_size
        if self.file_size < 24:
            raise CorruptFile(f"{self.path}: {self.file_size} bytes is too short for a GGUF header; "
                              "the file is truncated or not GGUF")
        with open_regular(self.path, "GGUF file") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._parse()
        except CorruptFile:
            self.close()
            raise
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as exc:
            self.close()
            raise CorruptFile(f"{self.path}: malformed GGUF header ({str(exc)[:100]}); re-download or re-convert "
                              "the file") from None

    # -- parsing -----------------------------------------------------------------------
    def _fail(self, what: str) -> CorruptFile:
        return CorruptFile(f"{self.path}: {what}; the file is truncated or corrupt (re-download or re-convert it)")

    def _need(self, count: int, what: str) -> None:
        if count < 0 or self._pos + count > self.file_size:
            raise self._fail(f"{what} at byte {self._pos} needs {count} bytes but the file has "
                             f"{self.file_size - self._pos} left")

    def _unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size, what)
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += size
        return value

    def _string(self, what: str, max_bytes: int | None = None) -> str:
        length = self._unpack("<Q", f"{what} length")
        if max_bytes is not None and length > max_bytes:
            raise self._fail(f"{what} at byte {self._pos - 8} claims {length} bytes (at most {max_bytes} allowed)")
        self._need(length, what)
        raw = self._map[self._pos:self._pos + length]
        self._pos += length
        return raw.decode("utf-8", errors="replace")

    def _strings(self, count: int, what: str) -> list[str]:
        """``count`` strings in a row (token lists, merges): one tight loop, as these arrays are the
        bulk of a header (and a flipped count can claim millions of strings in the tensor data)."""
        mapping, position, end = self._map, self._pos, self.file_size
        unpack = struct.unpack_from
        values: list[str] = []
        append = values.append
        for index in range(count):
            if position + 8 > end:
                self._pos = position
                raise self._fail(f"{what} element {index} at byte {position} runs past the end of the file")
            (length,) = unpack("<Q", mapping, position)
            position += 8
            if length > end - position:
                self._pos = position - 8
                raise self._fail(f"{what} element {index} at byte {position - 8} claims {length} bytes but the "
                                 f"file has {end - position} left")
            append(mapping[position:position + length].decode("utf-8", errors="replace"))
            position += length
        self._pos = position
        return values

    def _value(self, type_id: int, what: str, depth: int = 0) -> tuple[Any, str]:
        if type_id not in VALUE_TYPES:
            raise self._fail(f"{what} has unknown value type {type_id}")
        name, fmt = VALUE_TYPES[type_id]
        if fmt is not None:
            value = self._unpack(fmt, what)
            return (bool(value) if type_id == 7 else value), name
        if type_id == 8:
            return self._string(what), name
        if depth >= MAX_ARRAY_DEPTH:
            raise self._fail(f"{what} nests arrays deeper than {MAX_ARRAY_DEPTH}")
        elem_type = self._unpack("<I", f"{what} element type")
        count = self._unpack("<Q", f"{what} length")
        if elem_type not in VALUE_TYPES:
            raise self._fail(f"{what} has unknown element type {elem_type}")
        elem_name, elem_fmt = VALUE_TYPES[elem_type]
        min_bytes = struct.calcsize(elem_fmt) if elem_fmt else _MIN_VALUE_BYTES[elem_type]
        # Checked before reading a single element: a huge claimed length fails here.
        self._need(count * min_bytes, f"{what} ({count} elements of {elem_name})")
        if elem_fmt is not None:
            array = np.frombuffer(self._map, dtype=_NUMPY_DTYPES[elem_type], count=count, offset=self._pos)
            self._pos += count * min_bytes
            values = array.astype(bool).tolist() if elem_type == 7 else array.tolist()
        elif elem_type == 8:
            values = self._strings(count, what)
        else:
            values = [self._value(elem_type, what, depth + 1)[0] for _ in range(count)]
            if elem_type == 9:
                elem_name = "ARRAY"
        return values, f"ARRAY[{elem_name}]"

    def _parse(self) -> None:
        self._pos = 0
        magic = self._map[0:4]
        if magic != GGUF_MAGIC:
            raise CorruptFile(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self._pos = 4
        self.version = self._unpack("<I", "version")
        if self.version not in (2, 3):
            raise CorruptFile(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are); "
                              "re-convert the file with a current llama.cpp")
        tensor_count = self._unpack("<Q", "tensor count")
        kv_count = self._unpack("<Q", "metadata count")
        # Each kv needs >= 13 bytes and each tensor info >= 32: absurd counts fail before any loop.
        left = self.file_size - self._pos
        if kv_count * 13 + tensor_count * 32 > left:
            raise self._fail(f"header claims {tensor_count} tensors and {kv_count} metadata keys, "
                             f"more than the {left} bytes left can hold")

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, str] = {}
        for index in range(kv_count):
            key = self._string(f"metadata key #{index}", MAX_KEY_BYTES)
            type_id = self._unpack("<I", f"type of {clip(key)}")
            value, type_name = self._value(type_id, f"metadata {clip(key)}")
            if key in self.metadata:
                raise self._fail(f"metadata key {clip(key)} appears twice")
            self.metadata[key] = value
            self.metadata_types[key] = type_name

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
            raise self._fail(f"general.alignment {clip(alignment, 40)} is not a power of two")
        self.alignment = alignment

        infos = []
        names: set[str] = set()
        for index in range(tensor_count):
            name = self._string(f"tensor #{index} name", MAX_KEY_BYTES)
            if name in names:
                raise self._fail(f"tensor {clip(name)} appears twice")
            names.add(name)
            n_dims = self._unpack("<I", f"tensor {clip(name)} dimension count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise self._fail(f"tensor {clip(name)} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            self._need(8 * n_dims, f"tensor {clip(name)} dimensions")
            dims = struct.unpack_from(f"<{n_dims}q", self._map, self._pos)
            self._pos += 8 * n_dims
            type_id = self._unpack("<I", f"tensor {clip(name)} type")
            offset = self._unpack("<Q", f"tensor {clip(name)} offset")
            infos.append((name, dims, type_id, offset))
        self.header_bytes = self._pos
        self.data_offset = -(-self._pos // alignment) * alignment

        self.tensors: list[GGUFTensor] = []
        data_bytes = self.file_size - self.data_offset
        for name, dims, type_id, offset in infos:
            if any(dim < 0 for dim in dims):
                raise self._fail(f"tensor {clip(name)} has a negative dimension {dims}")
            if type_id not in GGML_QUANT_SIZES:
                raise self._fail(f"tensor {clip(name)} has unknown GGML type {type_id}")
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            if dims[0] % block_size:
                raise self._fail(f"tensor {clip(name)} row length {dims[0]} is not a multiple of the "
                                 f"{ggml_type_name(type_id)} block size {block_size}")
            n_elements = 1
            for dim in dims:
                n_elements *= dim  # Python ints: no overflow; bounded by the size check below
            n_bytes = n_elements // block_size * type_size
            if offset % alignment:
                raise self._fail(f"tensor {clip(name)} offset {offset} is not aligned to {alignment}")
            if offset + n_bytes > data_bytes:
                raise self._fail(f"tensor {clip(name)} ({n_bytes} bytes at data offset {offset}) runs past the end "
                                 f"of the file ({data_bytes} data bytes)")
            self.tensors.append(GGUFTensor(name, type_id, ggml_type_name(type_id), tuple(dims),
                                           self.data_offset + offset, n_bytes))
        ordered = sorted(self.tensors, key=lambda tensor: tensor.offset)
        for first, second in itertools.pairwise(ordered):
            if first.offset + first.n_bytes > second.offset:
                raise self._fail(f"tensors {clip(first.name)} and {clip(second.name)} overlap")
        self._by_name = {tensor.name: tensor for tensor in self.tensors}

    # -- access ------------------------------------------------------------------------
    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self._by_name[name]
        except KeyError:
            raise NotFound(f"{self.path} has no tensor {clip(name)}") from None

    def raw(self, tensor: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory map (no copy)."""
        return np.frombuffer(self._map, dtype=np.uint8, count=tensor.n_bytes, offset=tensor.offset)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def close(self) -> None:
        mapping = getattr(self, "_map", None)
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                # numpy views handed out still point into the map; it closes when they are gone.
                pass
            self._map = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
