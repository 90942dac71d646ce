"""What every output writer offers the pipeline.

The pipeline hands a sink one tensor at a time (Hugging Face name and layout, float) with the
plan's decision for it; the sink quantizes it with the named scheme, lays out the bytes its
format wants, and writes them to a staged (temporary) path. ``finish`` writes what can only be
written at the end (index, config, model card) and renames the staged output into place;
``abort`` removes it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from qtool.atomic import StagedOutput
from qtool.plan import KEEP, TensorPlan
from qtool.schemes.base import get_scheme
from qtool.sources.base import Source


class Sink(ABC):
    format: ClassVar[str]   # the output format (a container record's format)

    def __init__(self, out: Path, source: Source, plans: list[TensorPlan], *, force: bool,
                 options: dict[str, Any] | None = None) -> None:
        self.out = Path(out)
        self.source = source
        self.plans = plans
        self.force = force
        self.options = options or {}

    def stage(self, *, is_dir: bool) -> StagedOutput:
        """The staged (temporary) output beside ``self.out``, under the claim the pipeline made
        (``options["output_claim"]``) or a claim made here, which checks the source's files,
        ``--force`` and other runs (see qtool.atomic)."""
        return StagedOutput(self.out, force=self.force, is_dir=is_dir, reads=self.source.local_paths(),
                            claim=self.options.get("output_claim"))

    @classmethod
    def packed_nbytes(cls, plan: TensorPlan) -> int:
        """Bytes a planned tensor will take in this format (for --dry-run and size reports)."""
        raise NotImplementedError

    @classmethod
    def planned_nbytes(cls, plan: TensorPlan, config: dict) -> int:
        """Bytes a planned tensor of a model with this ``config`` takes in this format, where the format
        stores a tensor as pieces the model's architecture decides (GGUF: DeepSeek's kv_b_proj)."""
        return cls.packed_nbytes(plan)

    @classmethod
    def shared_type_groups(cls, names: list[str]) -> list[list[str]]:
        """Tensors of ``names`` this format (or its runtime) needs quantized with one scheme, grouped."""
        return []

    @classmethod
    def overhead_nbytes(cls, source: Source, plans: list[TensorPlan]) -> int:
        """The output's bytes besides the tensors' data (headers, metadata, padding), as --max-size counts
        them: an estimate within a few KB."""
        return 0

    @classmethod
    def check_layout(cls, plans: list[TensorPlan]) -> None:
        """Refuse plans the format cannot lay out (BadArgument), from the plans alone: the pipeline
        calls it before any calibration or reading, and for --dry-run."""

    @classmethod
    def stored_scheme(cls, plan: TensorPlan) -> str:
        """The scheme a planned tensor is really written with (a format may fall back to another)."""
        return plan.scheme

    @classmethod
    def stored_plan(cls, plan: TensorPlan) -> TensorPlan:
        """The plan as the format stores it, which is what calibration must fit: a scheme the format
        falls back to (GGUF: Q4_K -> Q5_0 for rows of 576), or a kept tensor when that is a float
        type (not calibrated)."""
        scheme = plan.scheme if plan.keep else cls.stored_scheme(plan)
        if scheme == plan.scheme:
            return plan
        if get_scheme(scheme).bits >= 16:
            return TensorPlan(plan.name, plan.shape, KEEP)
        return TensorPlan(plan.name, plan.shape, scheme)

    @abstractmethod
    def add(self, plan: TensorPlan, tensor: torch.Tensor, packed: Any = None) -> int:
        """Quantize (unless ``plan.keep``) and write one tensor; return the bytes it takes on disk.
        ``packed``: the tensor already quantized (by a calibration-aware method); written as it is."""

    @abstractmethod
    def finish(self, model_card: str) -> Path:
        """Write the remaining files and move the output into place; return its final path."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written so far."""
