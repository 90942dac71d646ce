"""Quantized safetensors checkpoints (qtool's, transformers + bitsandbytes', compressed-tensors')
read back as float tensors.

``wrap(source)`` hides the auxiliary tensors (absmax, quant maps, quant state, SCB, scales, zero
points, shapes) and hands out each quantized weight under its Hugging Face name, dequantized with
the matching qtool scheme, so ``qtool eval OUT`` and ``qtool quantize OUT`` work on outputs.
The inner source must offer ``load_raw(name)`` (tensors exactly as stored), as the safetensors
sources do.
"""
from __future__ import annotations

import torch

from qtool.containers import InputQuantization, StoredCheckpoint, by_quant_method, readable_methods
from qtool.errors import CorruptFile, Unsupported
from qtool.sources.base import Source, TensorInfo
from qtool.sources.jsonfile import clip

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class QuantizedSource(Source):
    """A quantized checkpoint seen as the float checkpoint it approximates."""

    def __init__(self, inner: Source) -> None:
        config = dict(inner.config)
        self.quantization_config = config.pop("quantization_config", None) or {}
        if not isinstance(self.quantization_config, dict):
            raise CorruptFile(f"{inner.description}: config.json's quantization_config is a "
                              f"{type(self.quantization_config).__name__}, not an object; fix or re-download it")
        super().__init__(spec=inner.spec, description=inner.description, config=config,
                         revision=inner.revision, is_quantized=True)
        if not hasattr(inner, "load_raw"):
            raise Unsupported(f"{inner.description}: reading a quantized checkpoint needs raw tensor access")
        self.inner = inner
        self.model_dtype = _TORCH_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"),
                                             torch.float32)
        stored = {info.name: info for info in inner.tensors()}
        method = self.quantization_config.get("quant_method")
        self.container = by_quant_method(method)
        if self.container is None:
            raise Unsupported(f"{inner.description}: quantization method {clip(method, 40)} is not one qtool reads "
                              f"({', '.join(readable_methods())})")
        self.checkpoint = StoredCheckpoint(description=inner.description, quantization_config=self.quantization_config,
                                           tensors=stored, load_raw=inner.load_raw, model_dtype=self.model_dtype)
        logical = self.container.read(self.checkpoint)
        hidden = {part for item in logical.values() for part in item.parts}
        # W8A8 (and quant_method fp8) input scales belong to the runtime's input quantization (see input_quantization), not
        # to the float model: a re-quantized output must not carry them.
        hidden |= {name for name in stored
                   if name.endswith((".input_scale", ".input_zero_point", ".input_global_scale", ".activation_scale"))}
        self._logical = logical
        # Each logical tensor takes the place of its first stored part, so file order is kept.
        first_part = {item.parts[0]: item for item in logical.values()}
        self._infos: list[TensorInfo] = []
        for name, info in stored.items():
            if name in first_part:
                self._infos.append(first_part[name].info)
            elif name not in hidden:
                self._infos.append(info)

    def input_quantization(self) -> dict[str, InputQuantization]:
        """The modules whose inputs the file's runtime quantizes (W8A8), by module name; empty for
        weight-only files (the container's record says)."""
        return self.container.input_quantization(self.checkpoint, self._logical)

    # -- the Source protocol -----------------------------------------------------------------------
    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def load(self, name: str) -> torch.Tensor:
        item = self._logical.get(name)
        if item is None:
            return self.inner.load(name)
        raw = {part: self.inner.load_raw(part) for part in item.parts}
        return item.decode(raw)

    def tokenizer_dir(self):
        return self.inner.tokenizer_dir()

    def extra_files(self):
        return self.inner.extra_files()

    def local_paths(self):
        return self.inner.local_paths()

    def close(self) -> None:
        self.inner.close()


def wrap(source: Source) -> Source:
    """``source`` with its quantized weights dequantized (unchanged when it is not quantized)."""
    if not source.config.get("quantization_config"):
        return source
    return QuantizedSource(source)
