"""Experts a checkpoint stores fused (gpt-oss: ``mlp.experts.gate_up_proj`` [E, H, 2I] with biases), seen
as one matrix and bias per expert (``mlp.experts.3.gate_proj.weight``), as the other mixtures of experts'
checkpoints store them. Plans, calibration, the sinks and the report then treat every architecture's
experts alike; the architecture record's FusedExperts says how to split and how to fuse back (the
evaluator fuses for transformers' modules).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from qtool.architectures import FusedExperts, block_record
from qtool.errors import CorruptFile
from qtool.sources.base import Source, TensorInfo


class FusedExpertsSource(Source):
    """``inner`` with its fused experts split per expert (see module doc)."""

    def __init__(self, inner: Source, layout: FusedExperts, experts: str) -> None:
        super().__init__(spec=inner.spec, description=inner.description, config=inner.config,
                         revision=inner.revision, is_quantized=inner.is_quantized)
        self.inner = inner
        self.layout = layout
        fused_re = re.compile(rf"^(.+\.{re.escape(experts)})\.({'|'.join(map(re.escape, layout.stored))})$")
        self._parts: dict[str, tuple[str, str, int]] = {}    # per-expert name -> (fused name, leaf, expert)
        self._infos: list[TensorInfo] = []
        for info in inner.tensors():
            match = fused_re.match(info.name)
            if match is None:
                self._infos.append(info)
                continue
            if len(info.shape) < 2:
                raise CorruptFile(f"{inner.description}: {info.name} has shape {tuple(info.shape)}; fused experts "
                                  "are [experts, ...]")
            count = info.shape[0]
            pieces = layout.unfuse(match.group(2), torch.empty(info.shape, device="meta"))
            for leaf, piece in pieces.items():
                for expert in range(count):
                    name = f"{match.group(1)}.{expert}.{leaf}"
                    self._parts[name] = (info.name, leaf, expert)
                    self._infos.append(TensorInfo(name, tuple(piece.shape[1:]), info.stored_dtype,
                                                  info.stored_bytes // (count * len(pieces))))
        self._cached: tuple[str, dict[str, torch.Tensor]] | None = None   # the last fused tensor, split

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def load(self, name: str) -> torch.Tensor:
        part = self._parts.get(name)
        if part is None:
            return self.inner.load(name)
        fused, leaf, expert = part
        # Plans take an expert tensor's experts one after another: the fused tensor is read once.
        if self._cached is None or self._cached[0] != fused:
            self._cached = None    # the previous fused tensor goes before the next one is read
            self._cached = (fused, self.layout.unfuse(fused.rpartition(".")[2], self.inner.load(fused)))
        return self._cached[1][leaf][expert].contiguous()

    def tokenizer_dir(self) -> Path | None:
        return self.inner.tokenizer_dir()

    def extra_files(self) -> dict[str, Path]:
        return self.inner.extra_files()

    def input_quantization(self) -> dict[str, Any]:
        return self.inner.input_quantization()

    def local_paths(self) -> list[Path]:
        return self.inner.local_paths()

    def close(self) -> None:
        self._cached = None
        self.inner.close()


def wrap(source: Source) -> Source:
    """``source`` with its fused experts seen per expert, when its architecture stores them fused."""
    record = block_record(source.config)
    if record is None or record.fused_experts is None or record.experts is None:
        return source
    return FusedExpertsSource(source, record.fused_experts, record.experts)
