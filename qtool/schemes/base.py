"""Scheme registry: one record per encoding. A scheme is numerics only: pure torch, any device, no
I/O, no printing.

Each scheme family lives in one module of this package (int8.py, int4.py, nf4.py, ggml.py,
ggml_kquants.py) and registers its schemes by name with ``@register``. The registered class is the
encoding's whole record: name, family (the container that writes it), bits, geometry, the
reference ``quantize`` / ``dequantize``, its calibration grid (``calibration_grid``) and the packer
of a calibrated result (``pack_calibrated``), its optional fast kernels (``c_kernel``,
``triton_module``) and, for GGML types, its GGUF file type and fallback. The CLI's choices,
GPTQ's grids, the packers, the kernels and the GGUF sink read these records, never a second list.
Adding an encoding is adding a class; a new family is a new module here (found without a list).
"""
from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qtool.errors import BadArgument

if TYPE_CHECKING:
    from qtool.schemes.grids import Grid
    from qtool.schemes.gptq import QuantResult


class Scheme(ABC):
    name: ClassVar[str]           # "nf4", "int8-sym", "Q4_K", ...
    family: ClassVar[str]         # which sink writes it: "bnb", "compressed" or "gguf"
    bits: ClassVar[float]         # nominal bits per weight, for plans and reports
    # The recipe params quantize() reads (their checks: qtool.plan.PARAM_CHECKS); others are refused.
    params: ClassVar[tuple[str, ...]] = ()

    # Geometry. block_size: elements stored with one set of scales (GGML block; NF4's default
    # block); group_size: default input columns per scale of a group scheme; sub_block_size: the
    # K-quants' sub-blocks inside a 256-element super-block. None where it does not apply.
    block_size: ClassVar[int | None] = None
    group_size: ClassVar[int | None] = None
    sub_block_size: ClassVar[int | None] = None

    # Optional fast paths giving the reference's bytes: the C function in qtool/kernels/cpu_ggml.c
    # (qtool.kernels.cpu) and the Triton kernel module in qtool/kernels/ (its FUSED holds the name).
    c_kernel: ClassVar[str | None] = None
    triton_module: ClassVar[str | None] = None

    # Schemes whose runtime quantizes a Linear's inputs (W8A8): the --act-strategy choices they offer, the
    # first being the default ("tensor": a static scale from calibration; "token": dynamic per token), and
    # the largest input level a static scale maps the clipped range to (127 for int8, 448 for FP8).
    act_strategies: ClassVar[tuple[str, ...]] = ()
    act_max: ClassVar[float] = 127.0
    act_type: ClassVar[str] = "int8"      # what the inputs become, for the report

    # GGML types: general.file_type (a gguf.LlamaFileType member name) of a file mostly of this
    # type, and the type llama-quantize falls back to when a row does not divide into blocks.
    file_type: ClassVar[str | None] = None
    fallback: ClassVar[str | None] = None
    # Encodings whose own quantize(weight, importance=...) weighs each element by an importance matrix
    # (llama.cpp's quant_weights: one value per column, from `qtool calibrate` or a llama-imatrix file;
    # what --method imatrix then uses), and those that cannot quantize without one.
    takes_importance: ClassVar[bool] = False
    requires_importance: ClassVar[bool] = False
    # Whether its container's runtimes load it next to other encodings in one file (--target-bpw / --max-size).
    mixes: ClassVar[bool] = True

    @abstractmethod
    def quantize(self, weight: torch.Tensor, **params: Any) -> Any:
        """Packed representation of ``weight`` (a family-specific dataclass of tensors)."""

    @abstractmethod
    def dequantize(self, packed: Any) -> torch.Tensor:
        """Float tensor with the original shape."""

    def calibration_grid(self, *, group_size: int | None = None, double_quant: bool = False,
                         columns: int | None = None, absmax: float | None = None) -> Grid | None:
        """The grid (qtool.schemes.grids) GPTQ and the importance search fit for this encoding, or
        None: no calibration-aware quantization. ``group_size``: the plan's group or block size;
        ``columns``: the weight's row length (for per-channel schemes); ``absmax``: the whole weight's
        largest magnitude (for a per-tensor scale)."""
        return None

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> Any:
        """``result`` (levels and scales a calibration method chose on ``calibration_grid``) in this
        encoding's packed form, as ``quantize`` returns it; ``dtype``: the source weight's dtype."""
        raise BadArgument(f"packing calibrated {self.name} tensors is not supported yet; use --method rtn")

    @property
    def packs_calibrated(self) -> bool:
        return type(self).pack_calibrated is not Scheme.pack_calibrated


SCHEMES: dict[str, Scheme] = {}
_families_loaded = False


def register(cls: type[Scheme]) -> type[Scheme]:
    SCHEMES[cls.name] = cls()
    return cls


def get_scheme(name: str) -> Scheme:
    _load_families()
    try:
        return SCHEMES[name]
    except KeyError:
        raise BadArgument(f"unknown scheme {name!r}; choose one of: {', '.join(sorted(SCHEMES))}") from None


def all_schemes() -> dict[str, Scheme]:
    _load_families()
    return dict(SCHEMES)


def scheme_names(family: str | None = None) -> tuple[str, ...]:
    """Registered names, in registration order; of one family (container) if given."""
    _load_families()
    return tuple(name for name, scheme in SCHEMES.items() if family is None or scheme.family == family)


def _load_families() -> None:
    """Import every public module of this package once: importing a family module registers its
    schemes (torch-heavy modules stay unloaded until a scheme is asked for)."""
    global _families_loaded
    if _families_loaded:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    _families_loaded = True
