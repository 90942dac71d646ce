"""Integer weight quantization in the compressed-tensors layout: int4 groups (sym/asym), and the
shared numerics that int8-asym (qtool/schemes/int8.py) uses per output channel.

compressed-tensors dequantizes ``(q - zero_point) * scale`` in the scale's dtype (the model's
dtype), with one scale (and zero point) per group of ``group_size`` input columns, or per row
for the channel strategy. We therefore round the scale to that dtype *before* choosing the
integers, and round it up, so that no value of a group is pushed past the integer range by the
rounding: every element then satisfies ``|w - deq| <= scale / 2`` (plus the final rounding of
``deq`` to the dtype).

The ranges follow compressed-tensors' ``calculate_qparams``: symmetric scale = absmax /
(range / 2) (7.5 for int4, so +absmax -> 7 and -absmax -> -8 both stay within half a step), and
asymmetric scale = (max - min) / range with min <= 0 <= max and an integer zero point.
"""
from __future__ import annotations

from collections.abc import Iterable

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qtool.kernels import fused
from qtool.schemes._parallel import cpu_workers, run_chunks
from qtool.schemes.base import Scheme, register
from qtool.schemes.errors import NonFiniteWeight
from qtool.schemes.grids import AffineGrid, Grid, SymmetricGrid

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qtool.schemes.grids import QuantResult


@dataclass
class PackedInt:
    """Integers plus scales, before the sink packs them into compressed-tensors' int32 words."""

    q: torch.Tensor                     # int8 [rows, cols], values in [-2**(bits-1), 2**(bits-1) - 1]
    scale: torch.Tensor                 # [rows, groups] in ``dtype``
    zero_point: torch.Tensor | None     # int8 [rows, groups] (asymmetric) or None
    bits: int
    group_size: int | None              # None: one scale per row ("channel" strategy)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None


def _round_up_to(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` (float32) in ``dtype``, never smaller than the float32 value."""
    rounded = scale.to(dtype)
    too_small = rounded.float() < scale
    if bool(too_small.any()):
        rounded = torch.where(too_small, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)
    return rounded


def _groups(weight: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """float32 view [rows, groups, group_size] (last group zero-padded) and the column count."""
    rows = weight.shape[0]
    matrix = weight.reshape(rows, -1).float()
    cols = matrix.shape[1]
    size = cols if group_size is None else group_size
    n_groups = -(-cols // size)
    if n_groups * size != cols:
        matrix = torch.nn.functional.pad(matrix, (0, n_groups * size - cols))
    return matrix.view(rows, n_groups, size), cols


def quantize_int(weight: torch.Tensor, bits: int, symmetric: bool, group_size: int | None,
                 scale_dtype: torch.dtype | None = None) -> PackedInt:
    if weight.dim() < 2:
        raise ValueError(f"integer schemes quantize matrices, got shape {tuple(weight.shape)}")
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    dtype = scale_dtype or weight.dtype
    matrix = weight.reshape(weight.shape[0], -1)
    if weight.device.type == "cpu":
        q, scale, zero_point = _quantize_int_cpu(matrix, bits, symmetric, group_size, dtype)
    else:
        q, scale, zero_point = _quantize_int_rows(matrix, bits, symmetric, group_size, dtype)
    return PackedInt(q=q, scale=scale, zero_point=zero_point, bits=bits,
                     group_size=group_size, shape=tuple(weight.shape), dtype=dtype)


def _quantize_int_rows(matrix: torch.Tensor, bits: int, symmetric: bool, group_size: int | None,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int8 [rows, cols], scale [rows, groups], zero point int8 or None) of some rows."""
    groups, cols = _groups(matrix, group_size)
    q_min, q_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    # Zero padding of the last group never widens its [min, max], which always contains 0.
    low = groups.amin(dim=2)
    high = groups.amax(dim=2)
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise NonFiniteWeight("the weight contains inf or nan values")
    low = low.clamp(max=0)
    high = high.clamp(min=0)
    if symmetric:
        scale = torch.maximum(-low, high) / ((q_max - q_min) / 2)
    else:
        scale = (high - low) / (q_max - q_min)
    # An all-zero group: any positive scale gives q = zero point and dequantizes to 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _round_up_to(scale, dtype)
    scale32 = scale.float()
    if symmetric:
        zero_point = None
        q = torch.round(groups / scale32.unsqueeze(2))
    else:
        zero_point = torch.round(q_min - low / scale32).clamp(q_min, q_max)
        q = torch.round(groups / scale32.unsqueeze(2) + zero_point.unsqueeze(2))
        zero_point = zero_point.to(torch.int8)
    q = q.clamp(q_min, q_max).to(torch.int8).reshape(matrix.shape[0], -1)[:, :cols]
    return q.contiguous(), scale, zero_point


_CPU_CHUNK_ELEMENTS = 1 << 17


def _quantize_int_cpu(matrix: torch.Tensor, bits: int, symmetric: bool, group_size: int | None,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every row is independent: chunks of rows on the CPU workers (qtool/schemes/_parallel.py)."""
    rows, cols = matrix.shape
    step = max(1, _CPU_CHUNK_ELEMENTS // max(cols, 1))
    if rows <= step:
        with cpu_workers():
            return _quantize_int_rows(matrix, bits, symmetric, group_size, dtype)
    n_groups = -(-cols // (cols if group_size is None else group_size)) if cols else 0
    q = torch.empty((rows, cols), dtype=torch.int8)
    scale = torch.empty((rows, n_groups), dtype=dtype)
    zero_point = None if symmetric else torch.empty((rows, n_groups), dtype=torch.int8)

    def work(starts: Iterable[int]) -> None:
        for start in starts:
            end = min(start + step, rows)
            part_q, part_scale, part_zero = _quantize_int_rows(matrix[start:end], bits, symmetric, group_size, dtype)
            q[start:end] = part_q
            scale[start:end] = part_scale
            if zero_point is not None:
                zero_point[start:end] = part_zero

    run_chunks(range(0, rows, step), work)
    return q, scale, zero_point


def dequantize_int(packed: PackedInt) -> torch.Tensor:
    """compressed-tensors' dequantization: ``(q - zero_point) * scale`` in the scale's dtype."""
    rows, cols = packed.q.shape
    size = cols if packed.group_size is None else packed.group_size
    n_groups = packed.scale.shape[1]
    values = torch.nn.functional.pad(packed.q, (0, n_groups * size - cols)).view(rows, n_groups, size)
    values = values.to(packed.scale.dtype)
    if packed.zero_point is not None:
        values = values - packed.zero_point.to(packed.scale.dtype).unsqueeze(2)
    values = values * packed.scale.unsqueeze(2)
    return values.reshape(rows, -1)[:, :cols].to(packed.dtype).reshape(packed.shape)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing of ``bits``-bit ints along the last dim of a matrix.

    Each value is offset to unsigned (``+ 2**(bits-1)``); element i of a row occupies bits
    ``i*bits .. i*bits+bits-1`` of the row's little-endian bit stream; rows are padded to 32 elements.
    """
    if 32 % bits:
        raise ValueError(f"packing supports 1, 2, 4 or 8 bits, got {bits}")
    rows, cols = values.shape
    per_word = 32 // bits
    words = -(-cols // per_word)
    unsigned = (values.to(torch.int32) + (1 << (bits - 1)))
    unsigned = torch.nn.functional.pad(unsigned, (0, words * per_word - cols)).view(rows, words, per_word)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=values.device)
    # Summing disjoint bit fields is an OR; int32 wraps around for the top field as C does.
    return (unsigned << shifts).sum(dim=2, dtype=torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    fields = (packed.unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    return (fields.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


class _IntScheme(Scheme):
    family = "compressed"
    checks_finite = True        # quantize raises NonFiniteWeight itself
    bits = 4.0
    symmetric = True
    default_group_size: int | None = 128
    group_size = 128
    params = ("group_size",)
    triton_module = "integer"

    def calibration_grid(self, *, group_size: int | None = None, **_: Any) -> Grid:
        # Scales rounded to bfloat16, which the stored weight_scale (the model's dtype) holds exactly.
        if self.symmetric:
            return SymmetricGrid(self.name, group_size or 128, 8, 7, negative_scales=False, scale_dtype=torch.bfloat16)
        return AffineGrid(self.name, group_size or 128, 15, integer_zero=True, scale_dtype=torch.bfloat16)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> PackedInt:
        """compressed-tensors int4 groups: signed levels (level - 8) and, asymmetric, zero points."""
        rows, cols = result.levels.shape
        q = result.levels.to(torch.int16) - 8
        zero_point = None if self.symmetric else (result.extra["zero_point"].to(torch.int16) - 8).to(torch.int8)
        return PackedInt(q=q.to(torch.int8).contiguous(), scale=result.scale.to(dtype), zero_point=zero_point,
                         bits=4, group_size=int(params.get("group_size", 128)), shape=(rows, cols), dtype=dtype)

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedInt:
        if weight.is_cuda and (fused_kernel := fused(self)) is not None:
            return fused_kernel(weight, **params)
        group_size = params.get("group_size", self.default_group_size) if self.default_group_size else None
        return quantize_int(weight, int(self.bits), self.symmetric, None if group_size is None else int(group_size))

    def dequantize(self, packed: PackedInt) -> torch.Tensor:
        return dequantize_int(packed)


@register
class Int4Sym(_IntScheme):
    name = "int4-sym"
    bits = 4.0
    symmetric = True


@register
class Int4Asym(_IntScheme):
    name = "int4-asym"
    bits = 4.0
    symmetric = False
    # In a file mixing config groups transformers' compressed-tensors (0.19) builds unpacked zero points,
    # and this format's are packed: the load fails (size mismatch). Written alone it loads.
    mixes: ClassVar[bool] = False
