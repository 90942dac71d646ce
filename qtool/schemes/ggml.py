"""GGML block types (the tensor encodings of GGUF files), as pure torch numerics.

One small class per GGUF type, registered under the type's GGUF name (``Q4_0``, ``Q4_K``, ...).
Each class implements ``quantize_blocks`` / ``dequantize_blocks`` over *all* blocks of a chunk
of rows at once; the base class does the shape checks, the row chunking (to bound memory) and
the dtype handling. Packed results are :class:`GGMLTensor`: the raw block bytes exactly as they
lie in a GGUF file, one row of the tensor per row of ``data``.

The 32-element types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) reproduce llama.cpp's reference quantizer
byte for byte (``quantize_row_*_ref`` in ggml-quants.c, which ``gguf.quants`` mirrors in numpy).
The K-quants live in :mod:`qtool.schemes.ggml_kquants`.

These torch functions are the reference. On the CPU, C kernels (:mod:`qtool.kernels.cpu`) give the
same bytes several times faster for the common types; on CUDA, Triton kernels (:mod:`qtool.kernels`).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qtool.errors import BadArgument
from qtool.kernels import fused
from qtool.kernels.cpu import cpu_kernel
from qtool.schemes._parallel import CPU_CHUNK_ELEMENTS, run_chunks
from qtool.schemes.base import Scheme, register
from qtool.schemes.errors import NonFiniteWeight, ScaleOverflow
from qtool.schemes.ggml_search import exact_sqrt, nearest_int, qkx3_quants, qx_quants, sequential_sum
from qtool.schemes.grids import (_GROUP_MAX_EPS, AffineGrid, CodebookGrid, Grid, GridParams, SymmetricGrid,
                                 _keep_best_least_squares, _store, _weighted)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qtool.schemes.grids import QuantResult

FLOAT16_MAX = 65504.0
# Inputs of this magnitude or more are refused by every block type's kernels as they load a block
# (with inf and NaN): no GGML type stores them (Q6_K's largest value is 65504 * 127 * 32 < 2^28),
# and past it the float32 sums of the K-quant searches overflow into scales that look finite.
# Smaller values too large for a type show as an inf fp16 scale (GGMLType.check_scales).
LARGEST_INPUT = 2.0 ** 30

QK_K = 256

# Elements per chunk handed to quantize_blocks on a GPU, and to dequantize_blocks: small enough that
# the temporaries of the K-quant scale search stay in the tens of MB, large enough that per-op
# overhead is negligible (the CPU workers' quantization takes _parallel.CPU_CHUNK_ELEMENTS).
_CHUNK_ELEMENTS = 1 << 20


@dataclass
class GGMLTensor:
    """A tensor encoded as one GGML type: the bytes of a GGUF tensor, row by row."""

    type_name: str               # GGUF type name: "Q4_K", "F16", ...
    shape: tuple[int, ...]       # logical shape, torch order (rows first)
    data: torch.Tensor           # uint8, (rows, row_bytes)

    @property
    def nbytes(self) -> int:
        return self.data.numel()


def roundf(values: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round goes to even). Exact for all floats."""
    whole = values.trunc()
    fraction = values - whole      # exact
    return whole + (fraction >= 0.5).to(values.dtype) - (fraction <= -0.5).to(values.dtype)


def divide(values: torch.Tensor, divisor: float) -> torch.Tensor:
    """``values / divisor`` correctly rounded on every device: CUDA computes ``tensor / number`` as a
    product with the number's reciprocal (one rounding more), so the number goes in as a tensor."""
    return values / torch.tensor(divisor, dtype=values.dtype, device=values.device)


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 (..., 1) -> its IEEE half bytes (..., 2), round to nearest even like GGML_FP32_TO_FP16."""
    return values.to(torch.float16).view(torch.uint8)


def fp16_from_bytes(raw: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 2) -> float32 (..., 1)."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def pack_nibbles(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    return (low & 0x0F) | ((high & 0x0F) << 4)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 8*k) of 0/1 -> (..., k) bytes, element i to bit i % 8 of byte i // 8 (little endian)."""
    weights = 1 << torch.arange(8, device=bits.device, dtype=torch.uint8)
    return (bits.reshape(*bits.shape[:-1], -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(raw: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 8*k) of 0/1, the inverse of pack_bits."""
    shifts = torch.arange(8, device=raw.device, dtype=torch.uint8)
    return ((raw.unsqueeze(-1) >> shifts) & 1).reshape(*raw.shape[:-1], -1)


class GGMLType(Scheme):
    """Base of every GGML type: shapes and chunking here, numerics in the subclasses."""

    family: ClassVar[str] = "gguf"
    block_size: ClassVar[int]
    type_size: ClassVar[int]     # bytes per block
    checks_finite = True         # quantize raises NonFiniteWeight / ScaleOverflow itself
    # Byte offsets of the block's fp16 fields (scales, mins): where an out-of-range weight shows.
    fp16_offsets: ClassVar[tuple[int, ...]] = ()
    # The 32-element types' importance-weighted quantizers (llama.cpp's quantize_row_q{4,5}_{0,1}_impl) weigh
    # an element by importance * sqrt(its row's mean square + x^2): the row's sum needs the whole row, so
    # quantize hands quantize_blocks (and the C kernels) these element weights instead of the importance.
    row_weights: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type_size" in cls.__dict__:
            cls.bits = cls.type_size * 8 / cls.block_size

    # -- what subclasses implement -------------------------------------------------------------
    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """float (n_blocks, block_size) -> uint8 (n_blocks, type_size): the reference numerics, which
        the C kernels (qtool.kernels.cpu) and the Triton kernels (qtool.kernels.ggml) reproduce.
        ``importance``: float32 (n_blocks, block_size), each element's importance (types that
        ``takes_importance``)."""
        raise NotImplementedError

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 (n_blocks, type_size) -> float32 (n_blocks, block_size)."""
        raise NotImplementedError

    # -- shared machinery ----------------------------------------------------------------------
    def supports(self, shape: tuple[int, ...]) -> bool:
        """Whether a tensor of this shape can be stored as this type: whole blocks per row, and no
        empty dimension (a zero-element block tensor is not something llama.cpp loads)."""
        return len(shape) >= 1 and all(dim > 0 for dim in shape) and shape[-1] % self.block_size == 0

    def row_bytes(self, n_per_row: int) -> int:
        return n_per_row // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        rows = 1
        for dim in shape[:-1]:
            rows *= dim
        return rows * self.row_bytes(shape[-1])

    def quantize(self, weight: torch.Tensor, importance: torch.Tensor | None = None, **params: Any) -> GGMLTensor:
        """``importance``: one value per column (llama.cpp's importance matrix), for types that take one."""
        shape = tuple(weight.shape)
        if importance is None and self.requires_importance:
            raise BadArgument(f"{self.name} needs an importance matrix: add --method imatrix with --calib or --stats, "
                              "or --imatrix FILE")
        if not self.supports(shape):
            raise BadArgument(f"{self.name} needs rows that are a multiple of {self.block_size} elements and no "
                              f"empty dimension; got a tensor of shape {list(shape)}")
        if not weight.is_floating_point():
            raise BadArgument(f"{self.name} quantizes floating-point tensors; got {weight.dtype}")
        try:
            # Every path raises NonFiniteWeight for inf, NaN or |x| >= LARGEST_INPUT as it reads the
            # weight (no separate pass); what it was is told apart only on that error.
            blocks = weight.reshape(-1, self.block_size)
            if importance is not None:
                self._check_importance(importance, shape)
                if self.row_weights:
                    importance = row_element_weights(weight.reshape(-1, shape[-1]), importance)
            if importance is None and weight.is_cuda and (fused_kernel := fused(self)) is not None:
                return fused_kernel(weight, **params)   # its kernels test the fp16 scales as they store them
            if weight.device.type == "cpu" and (c_kernel := cpu_kernel(self)) is not None:
                out = c_kernel(blocks) if importance is None else c_kernel(blocks, importance)
            else:
                per_block = None if importance is None else self._importance_blocks(importance, shape)
                out = self._quantize_chunks(blocks, per_block)
        except NonFiniteWeight:
            raise self._unstorable(weight) from None
        packed = GGMLTensor(self.name, shape, out.reshape(-1, self.row_bytes(shape[-1])))
        self.check_scales(packed, weight)
        return packed

    def _check_importance(self, importance: torch.Tensor, shape: tuple[int, ...]) -> None:
        if not self.takes_importance:
            raise BadArgument(f"{self.name} does not use an importance matrix; use --method rtn, or imatrix's own search")
        if importance.shape != (shape[-1],):
            raise BadArgument(f"the importance matrix has {importance.numel()} values for a tensor of {shape[-1]} columns")

    def _importance_blocks(self, importance: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """One importance value per column -> (n_blocks, block_size), the same for every row (``row_weights``
        types: their element weights, one per element, as blocks)."""
        if self.row_weights and importance.dim() == 2:
            return importance.reshape(-1, self.block_size)
        rows = math.prod(shape[:-1])
        per_row = importance.to(torch.float32).reshape(1, -1, self.block_size)
        return per_row.expand(rows, -1, -1).reshape(-1, self.block_size)

    def _unstorable(self, weight: torch.Tensor) -> ValueError:
        """The error for a weight this type cannot hold: inf/NaN, or values too large."""
        if not bool(torch.isfinite(weight).all()):
            return NonFiniteWeight("the weight contains inf or nan values")
        largest = float(weight.abs().amax())
        # Types without float16 scales (MXFP4's are E8M0) refuse only what every type refuses as it reads.
        reason = (f"need a {self.name} block scale beyond float16's range (+-{FLOAT16_MAX:g})" if self.fp16_offsets
                  else f"are past the {LARGEST_INPUT:.3g} that no GGML type stores")
        return ScaleOverflow(f"values up to {largest:.3g} {reason}; scale the weights down or keep the tensor "
                             "unquantized")

    def check_scales(self, packed: GGMLTensor, weight: torch.Tensor | None = None) -> None:
        """Raise ScaleOverflow when a block's fp16 scale or min is inf or NaN (the bytes of the torch
        and C paths, or of a calibration method; the Triton kernels test the same as they store the
        scales, read_flags bit 1): one test on a few bytes per block, not on
        the weight. Inf and NaN inputs are caught where the weight is read (NonFiniteWeight); what is
        left here is a finite weight too large for the block's scale."""
        if not self.fp16_offsets or packed.data.numel() == 0:
            return
        blocks = packed.data.reshape(-1, self.type_size)
        # The high byte of a little-endian fp16: exponent bits 0x7C all set means inf or NaN.
        high_bytes = blocks[:, [offset + 1 for offset in self.fp16_offsets]]
        if not bool(((high_bytes & 0x7C) == 0x7C).any()):
            return
        if weight is not None:
            raise self._unstorable(weight)
        raise ScaleOverflow(f"a {self.name} block scale is inf or nan (the weight is too large for the type)")

    def _quantize_chunks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        """quantize_blocks over bounded chunks; on the CPU on several threads (see _parallel)."""
        out = torch.empty((blocks.shape[0], self.type_size), dtype=torch.uint8, device=blocks.device)
        on_cpu = blocks.device.type == "cpu"
        step = max(1, (CPU_CHUNK_ELEMENTS if on_cpu else _CHUNK_ELEMENTS) // self.block_size)

        nonfinite_chunks = []

        def work(starts: Iterable[int]) -> None:
            for start in starts:
                chunk = blocks[start:start + step].to(torch.float32)
                # Per chunk, while it is in cache: the C and Triton kernels test the same as they load
                # (NaN fails the comparison too).
                if not bool((chunk.abs() < LARGEST_INPUT).all()):
                    nonfinite_chunks.append(start)
                    return
                if importance is None:
                    out[start:start + step] = self.quantize_blocks(chunk)
                else:
                    out[start:start + step] = self.quantize_blocks(chunk, importance[start:start + step].to(chunk.device))

        starts = range(0, blocks.shape[0], step)
        if on_cpu:
            run_chunks(starts, work)
        else:
            work(starts)
        if nonfinite_chunks:
            raise NonFiniteWeight("the weight contains inf or nan values")
        return out

    def dequantize(self, packed: GGMLTensor) -> torch.Tensor:
        if packed.type_name != self.name:
            raise BadArgument(f"cannot dequantize a {packed.type_name} tensor as {self.name}")
        raw = packed.data.reshape(-1, self.type_size)
        values = torch.empty((raw.shape[0], self.block_size), dtype=torch.float32, device=raw.device)
        step = max(1, _CHUNK_ELEMENTS // self.block_size)
        for start in range(0, raw.shape[0], step):
            values[start:start + step] = self.dequantize_blocks(raw[start:start + step])
        return values.reshape(packed.shape)


def row_element_weights(rows: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """importance * sqrt(sigma2 + x^2) per element of rows (r, n), sigma2 the row's mean square (its sum
    left to right in float32, as llama.cpp's loop adds): the weights of the 32-element types' searches."""
    x = rows.to(torch.float32)
    sigma2 = divide(sequential_sum(x * x), rows.shape[-1])
    return importance.to(torch.float32) * exact_sqrt(sigma2 + x * x)


def calibrated_blocks(scheme: GGMLType, result: QuantResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A calibrated result of a 32-block type as (levels (n_blocks, 32) uint8, scale, offset (n_blocks, 1)
    float32): the pieces its ``pack_calibrated`` lays out."""
    cols = result.levels.shape[1]
    if cols % scheme.block_size:
        raise BadArgument(f"{scheme.name} needs rows that are a multiple of {scheme.block_size} elements; got {cols}")
    levels = result.levels.to(torch.uint8).reshape(-1, scheme.block_size)
    return levels, result.scale.reshape(-1, 1).to(torch.float32), result.offset.reshape(-1, 1).to(torch.float32)


def calibrated_tensor(scheme: GGMLType, result: QuantResult, parts: list[torch.Tensor]) -> GGMLTensor:
    """The block fields ``parts`` (each (n_blocks, k) bytes) as the GGUF tensor of ``result``'s shape."""
    rows, cols = result.levels.shape
    return GGMLTensor(scheme.name, (rows, cols), torch.cat(parts, dim=-1).reshape(rows, -1))


# ---------------------------------------------------------------------------------------------
# Float types: one "block" is one element.

class _FloatType(GGMLType):
    block_size = 1
    dtype: ClassVar[torch.dtype]

    def quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        return blocks.to(self.dtype).contiguous().view(torch.uint8)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(self.dtype).to(torch.float32)

    def supports(self, shape: tuple[int, ...]) -> bool:
        return True     # any shape, empty ones included

    def quantize(self, weight: torch.Tensor, **params: Any) -> GGMLTensor:
        # No chunking needed, and keep a tensor that already has the right dtype as it is.
        shape = tuple(weight.shape)
        columns = shape[-1] if shape else 1
        rows = math.prod(shape[:-1]) if shape else 1    # explicit: reshape(-1, 0) is ambiguous
        values = weight.reshape(rows, columns).to(self.dtype).contiguous()
        if self.dtype == torch.float16 and values.numel() and not bool(torch.isfinite(values).all()):
            # F16 is the one float type narrower than the weights: refuse what it cannot hold.
            if not bool(torch.isfinite(weight).all()):
                raise NonFiniteWeight("the weight contains inf or nan values")
            raise ScaleOverflow(f"values up to {float(weight.abs().amax()):.3g} overflow float16 "
                                f"(+-{FLOAT16_MAX:g}); keep the tensor as F32 or BF16")
        return GGMLTensor(self.name, shape, values.view(torch.uint8))


@register
class F32(_FloatType):
    name = "F32"
    file_type = "ALL_F32"
    type_size = 4
    dtype = torch.float32


@register
class F16(_FloatType):
    name = "F16"
    file_type = "MOSTLY_F16"
    type_size = 2
    dtype = torch.float16


@register
class BF16(_FloatType):
    name = "BF16"
    file_type = "MOSTLY_BF16"
    type_size = 2
    dtype = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# 32-element types. The rounding follows ggml-quants.c's quantize_row_*_ref exactly:
# truncation of (v + offset + 0.5) for Q4/Q5, roundf for Q8_0, the scale rounded to fp16 only
# when stored (the inverse scale used for rounding comes from the fp32 scale).

def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """The element with the largest magnitude, sign kept (the first one on ties, as the C loop)."""
    index = blocks.abs().argmax(dim=-1, keepdim=True)
    return blocks.gather(-1, index)


def _inverse(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)


@register
class Q8_0(GGMLType):
    name = "Q8_0"
    block_size = 32
    fp16_offsets = (0,)
    type_size = 34
    c_kernel = "quantize_q8_0"
    triton_module = "ggml"
    file_type = "MOSTLY_Q8_0"

    def calibration_grid(self, **_: Any) -> Grid:
        return SymmetricGrid(self.name, 32, 127, 127, negative_scales=True)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> GGMLTensor:
        levels, scale, _ = calibrated_blocks(self, result)
        signed = (levels.to(torch.int16) - 127).to(torch.int8).view(torch.uint8)   # levels 0..254 are q + 127
        return calibrated_tensor(self, result, [fp16_bytes(scale), signed])

    def quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        scale = divide(blocks.abs().amax(dim=-1, keepdim=True), 127)
        quants = roundf(blocks * _inverse(scale)).to(torch.int8).view(torch.uint8)
        return torch.cat([fp16_bytes(scale), quants], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        scale = fp16_from_bytes(blocks[:, :2])
        return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32) * scale


@register
class Q4_0(GGMLType):
    name = "Q4_0"
    block_size = 32
    fp16_offsets = (0,)
    type_size = 18
    c_kernel = "quantize_q4_0"
    takes_importance = row_weights = True
    triton_module = "ggml"
    file_type = "MOSTLY_Q4_0"

    def calibration_grid(self, **_: Any) -> Grid:
        return SymmetricGrid(self.name, 32, 8, 7, negative_scales=True)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> GGMLTensor:
        levels, scale, _ = calibrated_blocks(self, result)
        return calibrated_tensor(self, result, [fp16_bytes(scale), pack_nibbles(levels[:, :16], levels[:, 16:])])

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        if importance is not None:       # make_qx_quants over the element weights
            scale, levels = qx_quants(blocks, importance, 8)
            levels = levels.to(torch.uint8)
            return torch.cat([fp16_bytes(scale), pack_nibbles(levels[:, :16], levels[:, 16:])], dim=-1)
        scale = _signed_absmax(blocks) / -8
        quants = (blocks * _inverse(scale) + 8.5).trunc().clamp(0, 15).to(torch.uint8)
        return torch.cat([fp16_bytes(scale), pack_nibbles(quants[:, :16], quants[:, 16:])], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        scale = fp16_from_bytes(blocks[:, :2])
        packed = blocks[:, 2:]
        quants = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.float32) - 8
        return quants * scale


@register
class Q4_1(GGMLType):
    name = "Q4_1"
    block_size = 32
    fp16_offsets = (0, 2)
    type_size = 20
    c_kernel = "quantize_q4_1"
    takes_importance = row_weights = True
    triton_module = "ggml"
    file_type = "MOSTLY_Q4_1"

    def calibration_grid(self, **_: Any) -> Grid:
        return AffineGrid(self.name, 32, 15, integer_zero=False)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> GGMLTensor:
        levels, scale, offset = calibrated_blocks(self, result)
        return calibrated_tensor(self, result, [fp16_bytes(scale), fp16_bytes(offset),
                                                pack_nibbles(levels[:, :16], levels[:, 16:])])

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        if importance is not None:       # make_qkx3_quants over the element weights
            scale, the_min, levels = qkx3_quants(blocks, importance, 15)
            levels = levels.to(torch.uint8)
            return torch.cat([fp16_bytes(scale), fp16_bytes(-the_min), pack_nibbles(levels[:, :16], levels[:, 16:])],
                             dim=-1)
        low = blocks.amin(dim=-1, keepdim=True)
        scale = divide(blocks.amax(dim=-1, keepdim=True) - low, 15)
        quants = ((blocks - low) * _inverse(scale) + 0.5).trunc().clamp(0, 15).to(torch.uint8)
        return torch.cat([fp16_bytes(scale), fp16_bytes(low), pack_nibbles(quants[:, :16], quants[:, 16:])], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        scale = fp16_from_bytes(blocks[:, :2])
        low = fp16_from_bytes(blocks[:, 2:4])
        packed = blocks[:, 4:]
        quants = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.float32)
        return quants * scale + low


@register
class Q5_0(GGMLType):
    name = "Q5_0"
    block_size = 32
    fp16_offsets = (0,)
    type_size = 22
    c_kernel = "quantize_q5_0"
    takes_importance = row_weights = True
    triton_module = "ggml"
    file_type = "MOSTLY_Q5_0"

    def calibration_grid(self, **_: Any) -> Grid:
        return SymmetricGrid(self.name, 32, 16, 15, negative_scales=True)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> GGMLTensor:
        levels, scale, _ = calibrated_blocks(self, result)
        return calibrated_tensor(self, result, [fp16_bytes(scale), pack_bits(levels >> 4),
                                                pack_nibbles(levels[:, :16], levels[:, 16:])])

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        if importance is not None:       # make_qx_quants over the element weights
            scale, quants = qx_quants(blocks, importance, 16)
            quants = quants.to(torch.uint8)
        else:
            scale = _signed_absmax(blocks) / -16
            quants = (blocks * _inverse(scale) + 16.5).trunc().clamp(0, 31).to(torch.uint8)
        high_bits = pack_bits(quants >> 4)
        return torch.cat([fp16_bytes(scale), high_bits, pack_nibbles(quants[:, :16], quants[:, 16:])], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        scale = fp16_from_bytes(blocks[:, :2])
        high = unpack_bits(blocks[:, 2:6])
        packed = blocks[:, 6:]
        quants = torch.cat([packed & 0x0F, packed >> 4], dim=-1) | (high << 4)
        return (quants.to(torch.float32) - 16) * scale


@register
class Q5_1(GGMLType):
    name = "Q5_1"
    block_size = 32
    fp16_offsets = (0, 2)
    type_size = 24
    c_kernel = "quantize_q5_1"
    takes_importance = row_weights = True
    triton_module = "ggml"
    file_type = "MOSTLY_Q5_1"

    def calibration_grid(self, **_: Any) -> Grid:
        return AffineGrid(self.name, 32, 31, integer_zero=False)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> GGMLTensor:
        levels, scale, offset = calibrated_blocks(self, result)
        return calibrated_tensor(self, result, [fp16_bytes(scale), fp16_bytes(offset), pack_bits(levels >> 4),
                                                pack_nibbles(levels[:, :16], levels[:, 16:])])

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        if importance is not None:       # make_qkx3_quants over the element weights
            scale, the_min, quants = qkx3_quants(blocks, importance, 31)
            low, quants = -the_min, quants.to(torch.uint8)
        else:
            low = blocks.amin(dim=-1, keepdim=True)
            scale = divide(blocks.amax(dim=-1, keepdim=True) - low, 31)
            quants = ((blocks - low) * _inverse(scale) + 0.5).trunc().clamp(0, 31).to(torch.uint8)
        high_bits = pack_bits(quants >> 4)
        return torch.cat([fp16_bytes(scale), fp16_bytes(low), high_bits,
                          pack_nibbles(quants[:, :16], quants[:, 16:])], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        scale = fp16_from_bytes(blocks[:, :2])
        low = fp16_from_bytes(blocks[:, 2:4])
        high = unpack_bits(blocks[:, 4:8])
        packed = blocks[:, 8:]
        quants = torch.cat([packed & 0x0F, packed >> 4], dim=-1) | (high << 4)
        return quants.to(torch.float32) * scale + low


# IQ4_NL: blocks of 32 with one fp16 scale and 4-bit indices into a fixed non-uniform table
# (ggml's kvalues_iq4nl), 4.5 bits per weight like Q4_0 but with levels denser near zero.
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# llama.cpp's quantize_iq4_nl tries the inverse scales (k - 127) / max, k = -7..7, after its first guess.
_IQ4_NL_TRIES = 7


def nearest_table_index(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry (ggml's best_index_int8): halfway goes to the upper entry,
    distances compared as the float differences the C code computes."""
    upper = torch.bucketize(scaled, table, right=True).clamp(1, len(table) - 1)
    low_value = table[upper - 1]
    high_value = table[upper]
    index = torch.where(scaled - low_value < high_value - scaled, upper - 1, upper)
    index = torch.where(scaled <= table[0], torch.zeros_like(index), index)
    return torch.where(scaled >= table[-1], torch.full_like(index, len(table) - 1), index)


def _sequential_sums(weight: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w*q*x) and sum(w*q*q) accumulated left to right in float32, as the C loop does (the
    comparisons between candidate scales depend on the exact sums)."""
    sum_qx = torch.zeros_like(blocks[:, :1])
    sum_q2 = torch.zeros_like(blocks[:, :1])
    wq = weight * value
    for j in range(blocks.shape[1]):
        sum_qx = sum_qx + wq[:, j:j + 1] * blocks[:, j:j + 1]
        sum_q2 = sum_q2 + wq[:, j:j + 1] * value[:, j:j + 1]
    return sum_qx, sum_q2


def _iq4_weights(blocks: torch.Tensor, importance: torch.Tensor | None, super_block: int) -> torch.Tensor:
    """The per-element weights of llama.cpp's IQ4 search over (n, 32) blocks: x^2, or with an importance
    matrix ``imatrix[col] * sqrt(sigma2 + x^2)``, sigma2 twice the mean square of the ``super_block``
    elements around (summed left to right in float32, as the C loop)."""
    if importance is None:
        return blocks * blocks
    rows = blocks.reshape(-1, super_block)
    sum_x2 = torch.zeros_like(rows[:, :1])
    for j in range(super_block):
        sum_x2 = sum_x2 + rows[:, j:j + 1] * rows[:, j:j + 1]
    sigma2 = (sum_x2 * (2.0 / super_block)).repeat_interleave(super_block // 32, dim=0)
    # sqrtf is correctly rounded; torch's vectorized float32 sqrt is not always (float64 then float32 is).
    return importance * torch.sqrt((sigma2 + blocks * blocks).double()).float()


def _iq4_scales(blocks: torch.Tensor, weight: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float32 (n, 1) scale of each block of 32 by quantize_row_iq4_nl_impl's search: the scale mapping the
    largest-magnitude element onto the table's end, then the inverse scales ``(k - 127) / max`` for
    k = -7..7, each with its weighted least-squares scale; 0 for a block below GROUP_MAX_EPS or whose
    weights are all zero."""
    peak = _signed_absmax(blocks)
    empty = peak.abs() < 1e-15                 # GROUP_MAX_EPS: the block stays zero

    def candidate(inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = table[nearest_table_index(inverse * blocks, table)]
        return _sequential_sums(weight, value, blocks)

    safe_peak = torch.where(empty, torch.ones_like(peak), peak)
    sum_qx, sum_q2 = candidate(1 / divide(safe_peak, 127))
    scale = torch.where(sum_q2 > 0, sum_qx / torch.where(sum_q2 > 0, sum_q2, torch.ones_like(sum_q2)),
                        torch.zeros_like(sum_q2))
    best = scale * sum_qx
    for step in range(-_IQ4_NL_TRIES, _IQ4_NL_TRIES + 1):
        sum_qx, sum_q2 = candidate((step + table[0]) / safe_peak)
        better = (sum_q2 > 0) & (sum_qx * sum_qx > best * sum_q2)
        scale = torch.where(better, sum_qx / torch.where(better, sum_q2, torch.ones_like(sum_q2)), scale)
        best = torch.where(better, scale * sum_qx, best)
    return torch.where(empty, torch.zeros_like(scale), scale)


def _iq4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=device)


def _iq4_indices(packed: torch.Tensor) -> torch.Tensor:
    """(n, 16 * k) nibble bytes -> (n, 32 * k) indices: per 32 elements, element j in the low nibble of
    byte j, element j + 16 in its high nibble."""
    packed = packed.reshape(packed.shape[0], -1, 16)
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()


def _iq4_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """The inverse of _iq4_indices."""
    groups = indices.reshape(indices.shape[0], -1, 32)
    return pack_nibbles(groups[..., :16], groups[..., 16:]).reshape(indices.shape[0], -1)


@register
class IQ4_NL(GGMLType):
    name = "IQ4_NL"
    block_size = 32
    fp16_offsets = (0,)
    type_size = 18
    c_kernel = "quantize_iq4_nl"
    file_type = "MOSTLY_IQ4_NL"
    takes_importance = True

    def calibration_grid(self, **_: Any) -> Grid:
        return IQ4NLGrid()

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> GGMLTensor:
        levels, scale, _ = calibrated_blocks(self, result)
        return calibrated_tensor(self, result, [fp16_bytes(scale), pack_nibbles(levels[:, :16], levels[:, 16:])])

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        table = _iq4_table(blocks.device)
        scale = _iq4_scales(blocks, _iq4_weights(blocks, importance, 32), table)
        # The indices are chosen again for the final (float32) scale; an empty block (scale 0) gets
        # the index nearest 0, as llama.cpp writes it.
        indices = nearest_table_index(_inverse(scale) * blocks, table).to(torch.uint8)
        return torch.cat([fp16_bytes(scale), _iq4_nibbles(indices)], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        scale = fp16_from_bytes(blocks[:, :2])
        return _iq4_table(blocks.device)[_iq4_indices(blocks[:, 2:])] * scale


@register
class IQ4_XS(GGMLType):
    """IQ4_NL's table in super-blocks of 256: one fp16 scale d, and per block of 32 a 6-bit signed
    scale l (d * l the block's scale: 4 low bits in scales_l, 2 high bits in scales_h), 4.25 bits per
    weight. Block layout: d (2 bytes), scales_h (uint16), scales_l (4 bytes), 128 bytes of nibbles."""

    name = "IQ4_XS"
    block_size = QK_K
    fp16_offsets = (0,)
    type_size = 136
    file_type = "MOSTLY_IQ4_XS"
    c_kernel = "quantize_iq4_xs"
    fallback = "IQ4_NL"
    takes_importance = True

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        table = _iq4_table(blocks.device)
        n = blocks.shape[0]
        subs = blocks.reshape(-1, 32)
        sub_importance = importance.reshape(-1, 32) if importance is not None else None
        scales = _iq4_scales(subs, _iq4_weights(subs, sub_importance, QK_K), table).reshape(n, 8)
        # The sub-block scale of largest magnitude (the first on ties) sets d = -max / 32.
        peak = _signed_absmax(scales)
        d = -torch.where(peak != 0, peak, torch.zeros_like(peak)) / 32   # all zero: C's +0 maximum, so d = -0
        codes = nearest_int(_inverse(d) * scales).clamp(-32, 31)
        sub_scale = (d * codes).reshape(-1, 1)
        indices = nearest_table_index(_inverse(sub_scale) * subs, table).to(torch.uint8).reshape(n, QK_K)
        codes = (codes + 32).to(torch.int32)
        low = (codes & 0xF).to(torch.uint8)
        scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
        scales_h = ((codes >> 4) << (2 * torch.arange(8, device=blocks.device, dtype=torch.int32))).sum(-1, keepdim=True)
        scales_h = torch.cat([scales_h & 0xFF, scales_h >> 8], dim=-1).to(torch.uint8)
        return torch.cat([fp16_bytes(d), scales_h, scales_l, _iq4_nibbles(indices)], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(blocks[:, :2])
        scales_h = blocks[:, 2].to(torch.int32) | (blocks[:, 3].to(torch.int32) << 8)
        low = torch.stack([blocks[:, 4:8] & 0x0F, blocks[:, 4:8] >> 4], dim=-1).reshape(-1, 8).to(torch.int32)
        high = (scales_h.unsqueeze(-1) >> (2 * torch.arange(8, device=blocks.device, dtype=torch.int32))) & 3
        sub_scale = d * (low | (high << 4)).to(torch.float32).sub(32)
        values = _iq4_table(blocks.device)[_iq4_indices(blocks[:, 8:])].reshape(-1, 8, 32)
        return (values * sub_scale.unsqueeze(-1)).reshape(-1, QK_K)


class IQ4NLGrid(CodebookGrid):
    """IQ4_NL: value = d * table[level] per block of 32, d a signed fp16 scale; the fit is llama.cpp's
    search (the scale mapping the largest-magnitude element to the table's end, then inverse scales
    ``(k - 127) / max`` for k = -7..7, each with its weighted least-squares scale)."""

    def __init__(self) -> None:
        super().__init__("IQ4_NL", 32, torch.tensor(IQ4_NL_VALUES, dtype=torch.float32))
        self.scale_dtype = torch.float16

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        weights = _weighted(w, weights)
        table = self.codebook.to(w.device)
        absmax, where = w.abs().max(dim=-1, keepdim=True)
        peak = torch.gather(w, -1, where)
        empty = absmax < _GROUP_MAX_EPS
        peak = torch.where(empty, torch.ones_like(peak), peak)
        best_score = torch.full_like(peak, -1.0)
        best_scale = torch.zeros_like(peak)
        for inverse in [127 / peak] + [(step - 127) / peak for step in range(-7, 8)]:
            levels = self.encode(w, 1 / inverse, torch.zeros_like(w))
            best_score, best_scale = _keep_best_least_squares(w, weights, table[levels.long()], best_score, best_scale)
        best_scale = _store(torch.where(empty, torch.zeros_like(best_scale), best_scale), self.scale_dtype)
        return GridParams(best_scale, torch.zeros_like(best_scale))

    def unit_values(self, levels: torch.Tensor) -> torch.Tensor | None:
        return self.codebook.to(levels.device)[levels.long()]


def ggml_type(name: str) -> GGMLType:
    """The registered GGML type called ``name`` (a GGUF type name)."""
    from qtool.schemes.base import SCHEMES, scheme_names

    scheme_names()   # every family module loaded (the K-quants register in ggml_kquants.py)
    scheme = SCHEMES.get(name)
    if not isinstance(scheme, GGMLType):
        raise BadArgument(f"unknown GGUF type {name!r}; choose one of: {', '.join(scheme_names('gguf'))}")
    return scheme


# MXFP4 (OCP microscaling, what gpt-oss ships in): blocks of 32, an E8M0 exponent byte e and 16 bytes of
# 4-bit indices into kvalues_mxfp4 (the E2M1 values doubled), value = kvalue * 2^(e - 128); element j of the
# block in the low nibble of byte j, element j + 16 in its high nibble, as Q4_0.
MXFP4_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@register
class MXFP4(GGMLType):
    name = "MXFP4"
    block_size = 32
    type_size = 17
    file_type = "MOSTLY_MXFP4_MOE"

    def quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """llama.cpp's quantize_row_mxfp4_ref: e = floor(log2(absmax)) - 2 + 127 (0 for an all-zero block),
        each element the kvalue nearest x / 2^(e - 128), the lowest index on ties (float32 errors)."""
        blocks = blocks.to(torch.float32)
        absmax = blocks.abs().amax(dim=-1, keepdim=True)
        exponent = torch.floor(torch.log2(torch.where(absmax > 0, absmax, torch.ones_like(absmax)))) - 2 + 127
        # C converts the float to uint8 through int: a block below 2^-125 wraps around, as there.
        exponent = torch.where(absmax > 0, exponent, torch.zeros_like(exponent)).to(torch.int32) & 0xFF
        half = torch.ldexp(torch.ones_like(absmax), exponent - 128)
        table = torch.tensor(MXFP4_KVALUES, dtype=torch.float32, device=blocks.device)
        errors = (table * half.unsqueeze(-1) - blocks.unsqueeze(-1)).abs()       # (n, 32, 16)
        indices = errors.argmin(dim=-1).to(torch.uint8)                          # the first minimum
        return torch.cat([exponent.to(torch.uint8), pack_nibbles(indices[:, :16], indices[:, 16:])], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        half = torch.ldexp(torch.ones((blocks.shape[0], 1), device=blocks.device), blocks[:, :1].to(torch.int32) - 128)
        packed = blocks[:, 1:]
        indices = torch.cat([packed & 0x0F, packed >> 4], dim=-1).long()
        table = torch.tensor(MXFP4_KVALUES, dtype=torch.float32, device=blocks.device)
        return table[indices] * half
