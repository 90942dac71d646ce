"""What every checkpoint source offers to the rest of the pipe.

A source hides where the bytes come from (Hub, folder, .safetensors, .gguf). Tensors are
returned one at a time, in Hugging Face naming and layout (``model.layers.0.self_attn.q_proj.weight``),
as floating-point torch tensors (GGUF blocks are dequantized on demand).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class TensorInfo:
    name: str                  # Hugging Face name
    shape: tuple[int, ...]     # Hugging Face (torch) shape, rows first
    stored_dtype: str          # as stored: "BF16", "F16", "F32", "Q4_1", ...
    stored_bytes: int          # bytes on disk for this tensor


@dataclass
class Source(ABC):
    spec: str                                  # what the user typed
    description: str                           # one line for reports: path or repo@revision
    config: dict = field(default_factory=dict)  # Hugging Face config.json contents
    revision: str | None = None                # resolved commit for Hub sources
    is_quantized: bool = False                 # True when tensors are dequantized from a lossy format

    @abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """Every tensor, in file order, without reading its data."""

    @abstractmethod
    def load(self, name: str) -> torch.Tensor:
        """One tensor as a float torch tensor (source dtype where it is float, else float32)."""

    def tokenizer_dir(self) -> Path | None:
        """A folder with Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, ...)."""
        return None

    def extra_files(self) -> dict[str, Path]:
        """Other files worth copying next to a quantized output (generation_config.json, ...)."""
        return {}

    def input_quantization(self) -> dict[str, Any]:
        """Modules whose inputs the checkpoint's runtime quantizes (W8A8), by name; none for float
        checkpoints (see qtool.sources.quantized.InputQuantization)."""
        return {}

    def local_paths(self) -> list[Path]:
        """The files and folders on this machine the source reads (a Hub repo: its cache files), so
        that no output is written over them. Sources that wrap another return the inner one's."""
        return []

    def close(self) -> None:
        """Release memory maps and temporary folders."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
