"""Safetensors checkpoints on disk: one ``.safetensors`` file, or a Hugging Face folder
(``config.json`` + single or sharded safetensors with ``model.safetensors.index.json``).

Headers are validated by :mod:`qtool.sources.safetensors_file` first. ``load`` then gives each
tensor its own short-lived memory map of just its bytes (private, so writable without touching the
file), released when the tensor is: no copy, and none of the long-lived whole-file map that kept
every page read so far resident (pages of a mapping count as the process's resident memory for as
long as it lives), so the resident memory stays about one tensor. Where a map cannot be made the
bytes are read (pread) into a buffer of its own. ``load_raw`` (exact stored tensors, for the
dequantizing wrapper) and dtypes torch has no plain equivalent for go through ``safe_open``.
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy
import torch

from qtool.errors import CorruptFile, NotFound, Unsupported
from qtool.sources.base import Source, TensorInfo
from qtool.sources.jsonfile import clip
from qtool.sources.layout import (EXTRA_FILES, INDEX_NAME, PICKLE_SUFFIXES, TOKENIZER_FILES,  # noqa: F401
                                  check_folder_files, check_index, read_index, read_json, shard_files)
from qtool.sources.safetensors_file import SafetensorsHeader, SafetensorsTensor, read_header


# safetensors dtypes read directly into a torch buffer (little-endian, as the format stores them).
_PLAIN_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_READ_STEP = 1 << 26     # bytes per read call (a read is capped near 2 GiB on Linux)


class SafetensorsSource(Source):
    """A folder or single file of safetensors, read lazily."""

    def __init__(self, spec: str, files: list[Path], *, folder: Path | None, description: str | None = None,
                 revision: str | None = None, weight_map: dict[str, str] | None = None) -> None:
        config: dict = {}
        if folder is not None:
            check_folder_files(folder)
            if os.path.lexists(folder / "config.json"):
                config = read_json(folder / "config.json", "model config")
        super().__init__(spec=spec, description=description or str(folder or files[0]), config=config,
                         revision=revision)
        self.folder = folder
        self.reads_folder = False       # a model folder (open_folder), not a file with a config beside it
        self.files = files
        self.headers: list[SafetensorsHeader] = [read_header(path) for path in files]
        self._where: dict[str, tuple[int, SafetensorsTensor]] = {}
        for file_index, header in enumerate(self.headers):
            for tensor in header.tensors:
                if tensor.name in self._where:
                    other = self.files[self._where[tensor.name][0]].name
                    raise CorruptFile(f"tensor {clip(tensor.name)} is in both {other} and {header.path.name}; "
                                      "the checkpoint is inconsistent")
                self._where[tensor.name] = (file_index, tensor)
        if folder is not None and weight_map is not None:
            check_index(folder, weight_map, {header.path.name: [tensor.name for tensor in header.tensors]
                                             for header in self.headers})
        self._handles: dict[int, object] = {}
        self._files: dict[int, int] = {}     # file index -> OS file descriptor for plain reads

    @property
    def metadata(self) -> dict[str, str]:
        """``__metadata__`` of the first file (where transformers and qtool record the format)."""
        return dict(self.headers[0].metadata) if self.headers else {}

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(tensor.name, tensor.shape, tensor.dtype, tensor.n_bytes)
                for header in self.headers for tensor in header.tensors]

    def _handle(self, file_index: int):
        handle = self._handles.get(file_index)
        if handle is None:
            from safetensors import safe_open

            try:
                handle = safe_open(str(self.files[file_index]), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for bad files
                raise CorruptFile(f"{self.files[file_index]}: safetensors cannot open it "
                                  f"({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__})") from None
            self._handles[file_index] = handle
        return handle

    def load_raw(self, name: str) -> torch.Tensor:
        """The tensor exactly as stored (packed integer tensors stay integers)."""
        try:
            file_index, _ = self._where[name]
        except KeyError:
            raise NotFound(f"{self.description} has no tensor {clip(name)}") from None
        try:
            return self._handle(file_index).get_tensor(name)
        except (TypeError, ValueError) as exc:
            raise Unsupported(f"{self.files[file_index]}: tensor {clip(name)} has a dtype torch cannot load "
                              f"({str(exc).splitlines()[0][:80]})") from None

    def _fd(self, file_index: int) -> int:
        fd = self._files.get(file_index)
        if fd is None:
            fd = os.open(self.files[file_index], os.O_RDONLY | getattr(os, "O_BINARY", 0))
            self._files[file_index] = fd
        return fd

    def _map(self, file_index: int, entry: SafetensorsTensor, dtype: torch.dtype) -> torch.Tensor:
        """The tensor over a private map of its own bytes (unmapped once the tensor is freed)."""
        start = entry.begin - entry.begin % mmap.ALLOCATIONGRANULARITY
        skip = entry.begin - start
        if entry.n_bytes == 0 or skip % torch.empty((), dtype=dtype).element_size():
            return self._read(file_index, entry, dtype)
        try:
            mapped = mmap.mmap(self._fd(file_index), entry.end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):
            return self._read(file_index, entry, dtype)
        array = numpy.frombuffer(mapped, dtype=numpy.uint8, count=entry.n_bytes, offset=skip)
        return torch.from_numpy(array).view(dtype).view(entry.shape)

    def _read(self, file_index: int, entry: SafetensorsTensor, dtype: torch.dtype) -> torch.Tensor:
        """The tensor's bytes read (pread) into a fresh buffer of its own."""
        fd = self._fd(file_index)
        raw = torch.empty(entry.n_bytes, dtype=torch.uint8)
        view = memoryview(raw.numpy()) if entry.n_bytes else memoryview(b"")
        done = 0
        while done < entry.n_bytes:
            got = os.preadv(fd, [view[done:done + _READ_STEP]], entry.begin + done)
            if got <= 0:
                raise CorruptFile(f"{self.files[file_index]}: ended inside tensor {entry.name!r}; "
                                  "the file is truncated (re-download or re-save it)")
            done += got
        return raw.view(dtype).view(entry.shape)

    def load(self, name: str) -> torch.Tensor:
        try:
            file_index, entry = self._where[name]
        except KeyError:
            raise NotFound(f"{self.description} has no tensor {clip(name)}") from None
        dtype = _PLAIN_DTYPES.get(entry.dtype)
        tensor = self._map(file_index, entry, dtype) if dtype is not None else self.load_raw(name)
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        return tensor

    def tokenizer_dir(self) -> Path | None:
        if self.folder is not None and any((self.folder / name).is_file() for name in TOKENIZER_FILES):
            return self.folder
        return None

    def extra_files(self) -> dict[str, Path]:
        if self.folder is None:
            return {}
        return {name: self.folder / name for name in EXTRA_FILES if (self.folder / name).is_file()}

    def local_paths(self) -> list[Path]:
        paths = list(self.files)
        if self.folder is not None:
            if self.reads_folder:
                paths.append(self.folder)
            names = ("config.json", INDEX_NAME, *TOKENIZER_FILES, *EXTRA_FILES)
            paths += [self.folder / name for name in names if os.path.lexists(self.folder / name)]
        return paths

    def close(self) -> None:
        self._handles.clear()
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def open_folder(folder: Path, spec: str, *, description: str | None = None,
                revision: str | None = None) -> SafetensorsSource:
    source = SafetensorsSource(spec, shard_files(folder), folder=folder, description=description,
                               revision=revision, weight_map=read_index(folder))
    source.reads_folder = True      # its listing decides which shards are read
    return source


def open_file(path: Path, spec: str) -> SafetensorsSource:
    """A single .safetensors file; a config.json beside it is used when present."""
    folder = path.parent if os.path.lexists(path.parent / "config.json") else None
    source = SafetensorsSource(spec, [path], folder=folder, description=str(path))
    return source
