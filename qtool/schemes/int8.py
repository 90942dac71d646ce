"""8-bit per-output-channel schemes.

- ``int8-sym``: bitsandbytes' LLM.int8 weight layout (``Int8Params``): ``weight`` int8 and
  ``SCB`` = the row absmax (float32); q = round(w * (127 / SCB)). bitsandbytes first casts the
  weight to float16, so we do the same (identical bytes to ``int8_vectorwise_quant``); a weight
  beyond float16's range, where bitsandbytes would produce inf, is quantized from float32 instead.
- ``int8-asym``: compressed-tensors' channel strategy with a zero point (see int4.py).
"""
from __future__ import annotations

from collections.abc import Iterable

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from qtool.kernels import fused
from qtool.schemes._parallel import cpu_workers, run_chunks
from qtool.schemes.base import Scheme, register
from qtool.schemes.errors import NonFiniteWeight
from qtool.schemes.grids import Grid, SymmetricGrid
from qtool.schemes.int4 import PackedInt, dequantize_int, quantize_int

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qtool.schemes.grids import QuantResult

_FP16_MAX = 65504.0
# bitsandbytes dequantizes with this float constant (1/127) after multiplying by SCB.
_INV_127 = 7.874015718698502e-3


@dataclass
class PackedInt8Rows:
    weight: torch.Tensor    # int8 [rows, cols]
    scb: torch.Tensor       # float32 [rows]: absmax of each row
    shape: tuple[int, ...]
    dtype: torch.dtype


def quantize_int8_rows(weight: torch.Tensor) -> PackedInt8Rows:
    if weight.dim() < 2:
        raise ValueError(f"int8-sym quantizes matrices, got shape {tuple(weight.shape)}")
    matrix = weight.reshape(weight.shape[0], -1)
    if matrix.device.type == "cpu":
        with cpu_workers():
            result = _int8_rows_cpu(matrix)
            q, scb = result if result is not None else _int8_rows_torch(matrix)
    else:
        q, scb = _int8_rows_torch(matrix)
    return PackedInt8Rows(weight=q, scb=scb, shape=tuple(weight.shape), dtype=weight.dtype)


def _int8_rows_torch(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any device: the whole matrix at once."""
    if matrix.dtype == torch.float16 or bool(matrix.abs().max() <= _FP16_MAX):
        matrix = matrix.to(torch.float16)
    else:
        matrix = matrix.float()
    scb = matrix.abs().amax(dim=1).float()
    if not bool(torch.isfinite(scb).all()):
        raise NonFiniteWeight("the weight contains inf or nan values")
    # A zero row has SCB 0: bitsandbytes gets 0 * inf = nan there; we write zeros.
    ratio = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb))
    q = torch.round(matrix * ratio.unsqueeze(1)).to(torch.int8)
    return q, scb


_CPU_CHUNK_ELEMENTS = 1 << 17


_LOCAL = threading.local()


def _scratch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float16, float32, float32 buffers of ``size`` elements, kept per thread for the next tensors."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None or buffers[0].numel() < size:
        size = max(size, _CPU_CHUNK_ELEMENTS)
        buffers = _LOCAL.buffers = (torch.empty(size, dtype=torch.float16), torch.empty(size, dtype=torch.float32),
                                    torch.empty(size, dtype=torch.float32))
    return buffers


def _int8_rows_cpu(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The same numbers in chunks of rows through reused buffers, on the CPU workers (see
    qtool/schemes/_parallel.py). Assumes the float16 route; None (use the whole-matrix path) when
    a row's absmax reaches float16's limit (float32 route, or inf/nan) so that rare case stays
    decided in one place."""
    rows, cols = matrix.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    scb = torch.empty(rows, dtype=torch.float32)
    if q.numel() == 0:
        return None
    step = max(1, _CPU_CHUNK_ELEMENTS // max(cols, 1))
    is_half = matrix.dtype == torch.float16

    def work(starts: Iterable[int]) -> None:
        half, values, scratch = _scratch(min(step, rows) * cols)
        for start in starts:
            end = min(start + step, rows)
            n = (end - start) * cols
            # float16 -> float32 is exact: the absmax and the product are those of the float16 values.
            v = values[:n].view(end - start, cols).copy_(matrix[start:end])
            if not is_half:
                # Rounded to float16 through float32 (bfloat16 -> float32 is exact, and torch's
                # bfloat16 -> float16 copy is several times slower than these two).
                v.copy_(half[:n].view(end - start, cols).copy_(v))
            row_absmax = scb[start:end]
            torch.amax(torch.abs(v, out=scratch[:n].view(end - start, cols)), dim=1, out=row_absmax)
            ratio = torch.where(row_absmax > 0, 127.0 / row_absmax, torch.zeros_like(row_absmax))
            v.mul_(ratio.unsqueeze(1)).round_()
            q[start:end].copy_(v)

    run_chunks(range(0, rows, step), work)
    if not bool((scb < _FP16_MAX).all()):
        return None
    return q, scb


def dequantize_int8_rows(packed: PackedInt8Rows) -> torch.Tensor:
    values = packed.weight * packed.scb.unsqueeze(1) * _INV_127
    return values.to(packed.dtype).reshape(packed.shape)


def fake_quantize_input(x: torch.Tensor, *, bits: int = 8, symmetric: bool = True, per_token: bool = True,
                        scale: torch.Tensor | None = None, zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """A Linear's input quantized and dequantized as compressed-tensors' runtime does it: with a
    stored per-tensor ``scale`` (and ``zero_point``), or dynamically from the range of each token
    (the features of a [batch, tokens, features] input; a 2-D input has one range, as there) or of
    the whole input. The range always includes 0; symmetric steps are absmax / ((qmax - qmin) / 2)
    (127.5 for int8), asymmetric ones (max - min) / (qmax - qmin) with the zero point rounded; a zero
    step becomes its dtype's eps. The range bounds are float32 0-dim tensors on x's device, as
    there: divisions stay divisions on CUDA, and dtype promotion follows the same rules."""
    if x.numel() == 0:
        return x
    q_min = torch.tensor(float(-(1 << (bits - 1))), device=x.device)
    q_max = torch.tensor(float((1 << (bits - 1)) - 1), device=x.device)
    if scale is None:
        dims = tuple(range(2, x.dim()))
        if per_token and dims:
            low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        else:
            low, high = x.amin(), x.amax()
        low, high = torch.minimum(low, torch.zeros_like(low)), torch.maximum(high, torch.zeros_like(high))
        steps = q_max - q_min
        if symmetric:
            scale = torch.maximum(low.abs(), high.abs()) / (steps.to(low.dtype) / 2)
        else:
            scale = (high - low) / steps.to(high.dtype)
            # 0 / 0 for an all-zero range: its zero point is irrelevant (every value quantizes to it).
            zero_point = torch.nan_to_num(torch.clamp(q_min - low / scale, q_min, q_max), nan=0.0).round()
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale.dtype).eps, dtype=scale.dtype,
                                                     device=scale.device), scale)
    else:
        scale = scale.to(x.dtype)
    scaled = x / scale
    if zero_point is not None:
        scaled = scaled + zero_point.to(x.dtype)
    levels = torch.clamp(scaled, q_min, q_max).round().to(scale.dtype)
    if zero_point is not None:
        levels = levels - zero_point.to(scale.dtype)
    return levels * scale



@register
class Int8Sym(Scheme):
    name = "int8-sym"
    family = "bnb"
    bits = 8.0
    checks_finite = True        # quantize raises NonFiniteWeight itself
    triton_module = "integer"

    def calibration_grid(self, *, group_size: int | None = None, columns: int | None = None, **_: Any) -> Grid:
        # One group spans the row (bitsandbytes' per-row SCB); a calibrated result is not packed yet.
        return SymmetricGrid(self.name, group_size or columns or 1 << 30, 127, 127, negative_scales=False)

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedInt8Rows:
        if weight.is_cuda and (fused_kernel := fused(self)) is not None:
            return fused_kernel(weight, **params)
        return quantize_int8_rows(weight)

    def dequantize(self, packed: PackedInt8Rows) -> torch.Tensor:
        return dequantize_int8_rows(packed)


class _Int8Compressed(Scheme):
    """int8 per output channel in compressed-tensors' ``int-quantized`` layout."""

    family = "compressed"
    bits = 8.0
    checks_finite = True        # quantize raises NonFiniteWeight itself
    symmetric: bool
    triton_module = "integer"

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedInt:
        if weight.is_cuda and (fused_kernel := fused(self)) is not None:
            return fused_kernel(weight, **params)
        return quantize_int(weight, 8, symmetric=self.symmetric, group_size=None)

    def dequantize(self, packed: PackedInt) -> torch.Tensor:
        return dequantize_int(packed)


@register
class Int8Asym(_Int8Compressed):
    name = "int8-asym"
    symmetric = False


# W8A8's choices of how a Linear's input scale is found (qtool.calibration.activation): the range
# calibration picks (--act-range) and static per-tensor or dynamic per-token scales (--act-strategy).
ACT_RANGES = ("minmax", "percentile", "mse")
ACT_STRATEGIES = ("tensor", "token")


@register
class W8A8(_Int8Compressed):
    """int8 weights, symmetric per output channel, for compressed-tensors' ``int-quantized`` W8A8
    format; the inputs' int8 scales come from calibration (qtool.calibration.activation) and are
    the sink's business, not the weight numerics'."""

    name = "w8a8"
    symmetric = True
    act_strategies = ACT_STRATEGIES

    def calibration_grid(self, *, columns: int | None = None, **_: Any) -> Grid:
        # int8 per output channel (one group spanning the row), scales rounded to bfloat16, which the
        # stored weight_scale (model dtype: float32, bfloat16 or float16) holds exactly.
        if columns is None:
            raise ValueError("w8a8's calibration grid spans a row: give the weight's columns")
        return SymmetricGrid(self.name, columns, 127, 127, negative_scales=False, scale_dtype=torch.bfloat16)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> PackedInt:
        """compressed-tensors int8 per output channel: levels 0..254 are q = level - 127."""
        rows, cols = result.levels.shape
        q = (result.levels.to(torch.int16) - 127).to(torch.int8).contiguous()
        return PackedInt(q=q, scale=result.scale.reshape(rows, 1).to(dtype), zero_point=None, bits=8,
                         group_size=None, shape=(rows, cols), dtype=dtype)
    # How the inputs are quantized (qtool.calibration.activation) and smoothed first.
    params = ("act_range", "act_strategy", "act_percentile", "act_symmetric", "smooth", "smooth_down")
