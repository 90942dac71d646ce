"""Safetensors checkpoints on disk: one ``.safetensors`` file, or a Hugging Face folder
(``config.json`` + single or sharded safetensors with ``model.safetensors.index.json``).

Headers are validated by :mod:`qtool.sources.safetensors_file` first; tensors are then read
one at a time through memory-mapped ``safe_open`` handles.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qtool.errors import CorruptFile, NotFound, Unsupported
from qtool.sources.base import Source, TensorInfo
from qtool.sources.layout import EXTRA_FILES, INDEX_NAME, PICKLE_SUFFIXES, TOKENIZER_FILES, read_json, shard_files  # noqa: F401
from qtool.sources.safetensors_file import SafetensorsHeader, SafetensorsTensor, read_header


class SafetensorsSource(Source):
    """A folder or single file of safetensors, read lazily."""

    def __init__(self, spec: str, files: list[Path], *, folder: Path | None, description: str | None = None,
                 revision: str | None = None) -> None:
        config: dict = {}
        if folder is not None and (folder / "config.json").is_file():
            config = read_json(folder / "config.json", "model config")
        super().__init__(spec=spec, description=description or str(folder or files[0]), config=config,
                         revision=revision)
        self.folder = folder
        self.files = files
        self.headers: list[SafetensorsHeader] = [read_header(path) for path in files]
        self._where: dict[str, tuple[int, SafetensorsTensor]] = {}
        for file_index, header in enumerate(self.headers):
            for tensor in header.tensors:
                if tensor.name in self._where:
                    other = self.files[self._where[tensor.name][0]].name
                    raise CorruptFile(f"tensor {tensor.name!r} is in both {other} and {header.path.name}; "
                                      "the checkpoint is inconsistent")
                self._where[tensor.name] = (file_index, tensor)
        self._handles: dict[int, object] = {}

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
            raise NotFound(f"{self.description} has no tensor {name!r}") from None
        try:
            return self._handle(file_index).get_tensor(name)
        except (TypeError, ValueError) as exc:
            raise Unsupported(f"{self.files[file_index]}: tensor {name!r} has a dtype torch cannot load "
                              f"({str(exc).splitlines()[0][:80]})") from None

    def load(self, name: str) -> torch.Tensor:
        tensor = self.load_raw(name)
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

    def close(self) -> None:
        self._handles.clear()


def open_folder(folder: Path, spec: str, *, description: str | None = None,
                revision: str | None = None) -> SafetensorsSource:
    return SafetensorsSource(spec, shard_files(folder), folder=folder, description=description, revision=revision)


def open_file(path: Path, spec: str) -> SafetensorsSource:
    """A single .safetensors file; a config.json beside it is used when present."""
    folder = path.parent if (path.parent / "config.json").is_file() else None
    source = SafetensorsSource(spec, [path], folder=folder, description=str(path))
    return source
