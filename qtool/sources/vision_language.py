"""A vision-language checkpoint under the names transformers 5 gives its modules.

Qwen2-VL checkpoints store the language model as ``model.layers.N`` and the vision tower as
``visual``; Gemma 3's store ``language_model.model.layers.N``. transformers 5 loads both into
``model.language_model.layers.N`` (and ``model.visual`` / ``model.vision_tower``), renaming as it
loads. The wrapper here does the same renaming once, at the source, so plans, calibration,
evaluation and the sinks all see the module paths the runtime has: a compressed-tensors
``targets`` list then names modules that exist, and qtool's outputs load without renaming.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qtool.architectures import VisionLanguage, vision_language
from qtool.errors import CorruptFile
from qtool.sources.base import Source, TensorInfo


class VisionLanguageSource(Source):
    """``inner`` with each tensor under its transformers 5 name (see module doc)."""

    def __init__(self, inner: Source, record: VisionLanguage) -> None:
        super().__init__(spec=inner.spec, description=inner.description, config=inner.config,
                         revision=inner.revision, is_quantized=inner.is_quantized)
        self.inner = inner
        self.record = record
        self._stored: dict[str, str] = {}      # runtime name -> stored name
        self._infos: list[TensorInfo] = []
        for info in inner.tensors():
            runtime = record.runtime_name(info.name)
            if runtime in self._stored:
                raise CorruptFile(f"{inner.description}: tensors {self._stored[runtime]} and {info.name} are both "
                                  f"{runtime} for transformers; the checkpoint mixes two naming schemes")
            self._stored[runtime] = info.name
            self._infos.append(info if runtime == info.name else TensorInfo(runtime, info.shape, info.stored_dtype,
                                                                            info.stored_bytes))

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def load(self, name: str) -> torch.Tensor:
        return self.inner.load(self._stored.get(name, name))

    def tokenizer_dir(self) -> Path | None:
        return self.inner.tokenizer_dir()

    def extra_files(self) -> dict[str, Path]:
        return self.inner.extra_files()

    def input_quantization(self) -> dict[str, Any]:
        return {self.record.runtime_name(module): spec for module, spec in self.inner.input_quantization().items()}

    def local_paths(self) -> list[Path]:
        return self.inner.local_paths()

    def close(self) -> None:
        self.inner.close()


def wrap(source: Source) -> Source:
    """``source`` under transformers 5 names when it is a vision-language checkpoint, else unchanged."""
    record = vision_language(source.config)
    return source if record is None else VisionLanguageSource(source, record)
