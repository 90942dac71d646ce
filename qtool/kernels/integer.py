"""int8 (per row) and int4 (groups) in one Triton kernel, the bytes of qtool.schemes.int8 / int4.

A *segment* is what gets one scale: a group of ``group_size`` columns of a row, or a whole row
(channel strategy, bitsandbytes' int8). Each program quantizes SEGMENTS segments held as a
[SEGMENTS, BLOCK] tile (BLOCK = segment length rounded up to a power of two, masked).

Modes:
- ``BNB``: bitsandbytes' LLM.int8 rows: values rounded to float16 first (unless some value is
  beyond float16's range: then the launcher runs again in float32, as the CPU path decides from
  the whole matrix), SCB = row absmax, q = round(x * (127 / SCB)).
- ``SYM`` / ``ASYM``: compressed-tensors' qparams: scale = absmax / (range / 2) or
  (max - min) / range, rounded *up* to the scale dtype, integer zero point for ASYM.

``quantize_int_async`` and ``quantize_int8_rows_async`` only enqueue; ``finish`` reads the inf/NaN
flag back (one host sync).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from qtool.schemes import int4 as cpu_int
from qtool.schemes import int8 as cpu_int8
from qtool.kernels import launch, read_flags

_BNB, _SYM, _ASYM = 0, 1, 2
_FP16_MAX = 65504.0
_FP16_MAX_CONSTEXPR = tl.constexpr(_FP16_MAX)
_ELEMENTS_PER_PROGRAM = 4096   # segments up to this long are one tile
_TWO_PASS_BLOCK = 4096          # chunk of a longer segment (one per program)
_TWO_PASS_WARPS = 8


@triton.jit
def _clamp(v, low, high):
    # torch.clamp's rule: a bound replaces v only when v is beyond it, so -0.0 and NaN stay.
    v = tl.where(v < low, low, v)
    return tl.where(v > high, high, v)


@triton.jit
def _rint(v):
    # Round half to even (torch.round) by the 1.5 * 2**23 trick: exact for |v| < 2**22, and every
    # caller clamps to the integer range afterwards.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _magnitude(x):
    # |x| with NaN as +inf: Triton's max drops NaN, and a non-finite weight must still be seen.
    return tl.where(x == x, tl.abs(x), float("inf"))


@triton.jit
def _segment_params(low, high, absmax, scale_ptr, MODE: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    """Per-segment quantization parameters from its min, max and absmax (float32, [S]).
    Returns (multiplier or scale, zero point, stored scale); see _quantize_values."""
    Q_MIN: tl.constexpr = -(1 << (BITS - 1))
    Q_MAX: tl.constexpr = (1 << (BITS - 1)) - 1
    if MODE == 0:
        # Rounding is monotonic, so the absmax of the float16 values is the float16 absmax.
        scb = absmax.to(tl.float16).to(tl.float32) if F16 else absmax
        ratio = tl.where(scb > 0, tl.math.div_rn(tl.full(scb.shape, 1.0, tl.float32), scb) * 127.0, 0.0)
        return ratio, ratio, scb
    else:
        low = tl.where(low > 0, 0.0, low)
        high = tl.where(high < 0, 0.0, high)
        if MODE == 1:
            scale = tl.math.div_rn(tl.maximum(0.0 - low, high), tl.full(low.shape, (Q_MAX - Q_MIN) / 2, tl.float32))
        else:
            scale = tl.math.div_rn(high - low, tl.full(low.shape, Q_MAX - Q_MIN, tl.float32))
        scale = tl.where(scale > 0, scale, 1.0)
        # _round_up_to: the scale in its storage dtype, one step up where rounding went below.
        stored = scale.to(scale_ptr.dtype.element_ty)
        if scale_ptr.dtype.element_ty != tl.float32:
            bits = stored.to(tl.uint16, bitcast=True)
            bits = tl.where(stored.to(tl.float32) < scale, bits + 1, bits)
            stored = bits.to(scale_ptr.dtype.element_ty, bitcast=True)
        scale32 = stored.to(tl.float32)
        zero = _clamp(_rint(Q_MIN - tl.math.div_rn(low, scale32)), Q_MIN, Q_MAX)
        return scale32, zero, stored


@triton.jit
def _quantize_values(x, factor, zero, MODE: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    Q_MIN: tl.constexpr = -(1 << (BITS - 1))
    Q_MAX: tl.constexpr = (1 << (BITS - 1)) - 1
    if MODE == 0:
        if F16:
            x = x.to(tl.float16).to(tl.float32)
        q = _rint(x * factor[:, None])
    elif MODE == 1:
        q = _clamp(_rint(tl.math.div_rn(x, factor[:, None])), Q_MIN, Q_MAX)
    else:
        q = _clamp(_rint(tl.math.div_rn(x, factor[:, None]) + zero[:, None]), Q_MIN, Q_MAX)
    return q.to(tl.int32).to(tl.int8)


@triton.jit
def _int_kernel(x_ptr, q_ptr, scale_ptr, zero_ptr, flags_ptr, wide_ptr, cols, n_groups, segment, n_segments,
                MODE: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr, BLOCK: tl.constexpr,
                SEGMENTS: tl.constexpr, TWO_PASS: tl.constexpr, WIDE: tl.constexpr):
    """WIDE (bitsandbytes rows): 1 = the float16 pass, which also sets *wide_ptr (zeroed before) when
    some value is beyond float16's range; 2 = the float32 pass, which does its work only when
    *wide_ptr is set (so no host sync decides between them); 0 = neither."""
    pid = tl.program_id(0).to(tl.int64)
    segment_ids = pid * SEGMENTS + tl.arange(0, SEGMENTS)
    seg_valid = segment_ids < n_segments
    if WIDE == 2:
        # Everything masked off when not needed: no memory traffic, a few microseconds of issue.
        seg_valid = seg_valid & (tl.load(wide_ptr) != 0)
    row = segment_ids // n_groups
    column0 = (segment_ids % n_groups) * segment
    # Zero stands in for masked elements: it never changes an absmax, and min/max are clamped
    # around 0 anyway (as the CPU path's zero padding).
    if TWO_PASS:
        # Segments longer than a tile: min/max over BLOCK-wide chunks, then quantize them (the second
        # read mostly hits L2).
        low = tl.zeros([SEGMENTS], tl.float32)
        high = tl.zeros([SEGMENTS], tl.float32)
        absmax = tl.zeros([SEGMENTS], tl.float32)
        for start in range(0, segment, BLOCK):
            c = start + tl.arange(0, BLOCK)[None, :]
            valid = seg_valid[:, None] & (c < segment) & (column0[:, None] + c < cols)
            x = tl.load(x_ptr + row[:, None] * cols + column0[:, None] + c, mask=valid, other=0.0).to(tl.float32)
            low = tl.minimum(low, tl.min(x, axis=1))
            high = tl.maximum(high, tl.max(x, axis=1))
            absmax = tl.maximum(absmax, tl.max(_magnitude(x), axis=1))
        factor, zero, stored = _segment_params(low, high, absmax, scale_ptr, MODE, BITS, F16)
        for start in range(0, segment, BLOCK):
            c = start + tl.arange(0, BLOCK)[None, :]
            valid = seg_valid[:, None] & (c < segment) & (column0[:, None] + c < cols)
            offsets = row[:, None] * cols + column0[:, None] + c
            x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
            tl.store(q_ptr + offsets, _quantize_values(x, factor, zero, MODE, BITS, F16), mask=valid)
    else:
        c = tl.arange(0, BLOCK)[None, :]
        valid = seg_valid[:, None] & (c < segment) & (column0[:, None] + c < cols)
        offsets = row[:, None] * cols + column0[:, None] + c
        x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        absmax = tl.max(_magnitude(x), axis=1)
        factor, zero, stored = _segment_params(tl.min(x, axis=1), tl.max(x, axis=1), absmax, scale_ptr,
                                               MODE, BITS, F16)
        tl.store(q_ptr + offsets, _quantize_values(x, factor, zero, MODE, BITS, F16), mask=valid)
    tl.store(scale_ptr + segment_ids, stored, mask=seg_valid)
    # This program's flags: inf/NaN seen (bit 0), for bitsandbytes rows a value beyond float16's
    # range (bit 1). One slot per program: nothing to zero before the launch, no atomics.
    flags = (absmax == float("inf")).to(tl.int32)
    if MODE == 0:
        flags = flags | ((absmax > _FP16_MAX_CONSTEXPR).to(tl.int32) << 1)
    if WIDE != 2:
        flags = tl.max(flags, axis=0)
        tl.store(flags_ptr + pid, flags)
        if WIDE == 1:
            tl.atomic_or(wide_ptr, 1, mask=(flags & 2) != 0)
    if MODE == 2:
        tl.store(zero_ptr + segment_ids, zero.to(tl.int32).to(tl.int8), mask=seg_valid)


def _launch(matrix: torch.Tensor, segment: int, mode: int, bits: int, scale_dtype: torch.dtype,
            f16: bool = False, wide: torch.Tensor | None = None, wide_mode: int = 0,
            out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enqueue the kernel: (q, scale, zero point, flags), nothing read back. flags (int32, on the
    device, one per program, OR-ed by read_flags): bit 0 = some value is inf/NaN, bit 1 = some
    value is beyond float16's range. ``wide``/``wide_mode``: see _int_kernel's WIDE; ``out``: the
    (q, scale, zero) to write instead of new tensors."""
    rows, cols = matrix.shape
    n_groups = -(-cols // segment)
    n_segments = rows * n_groups
    device = matrix.device
    if out is not None:
        q, scale, zero = out
    else:
        q = torch.empty((rows, cols), dtype=torch.int8, device=device)
        scale = torch.empty((rows, n_groups), dtype=scale_dtype, device=device)
        zero = torch.empty((rows, n_groups), dtype=torch.int8, device=device) if mode == _ASYM else q
    if not n_segments:
        return q, scale, zero, torch.zeros(1, dtype=torch.int32, device=device)
    block = 1 << (segment - 1).bit_length()   # the next power of two
    two_pass = block > _ELEMENTS_PER_PROGRAM
    if two_pass:
        block, per_program, num_warps = _TWO_PASS_BLOCK, 1, _TWO_PASS_WARPS
    else:
        per_program = max(1, _ELEMENTS_PER_PROGRAM // block)
        num_warps = min(16, max(4, per_program * block // 512))
    grid = (-(-n_segments // per_program),)
    flags = torch.empty(grid[0], dtype=torch.int32, device=device)
    launch(_int_kernel, grid, matrix, q, scale, zero, flags, flags if wide is None else wide, cols, n_groups,
           segment, n_segments, MODE=mode, BITS=bits, F16=f16, BLOCK=block, SEGMENTS=per_program,
           TWO_PASS=two_pass, WIDE=wide_mode, num_warps=num_warps, enable_fp_fusion=False)
    return q, scale, zero, flags


def finish(packed, flags: torch.Tensor):
    """Read the flags ``quantize_int_async`` left on the device (one host sync); inf/NaN in the
    weight raises NonFiniteWeight, as the CPU path does."""
    read_flags(flags)
    return packed


def quantize_int8_rows_async(weight: torch.Tensor) -> tuple[cpu_int8.PackedInt8Rows, torch.Tensor]:
    """bitsandbytes' int8 rows, enqueued: (packed, flags on the device; ``finish`` reads them).
    Whether the values are rounded to float16 first depends on the whole matrix (not when some
    value is beyond float16's range), which the device decides: a float16 pass that notes any such
    value in a zeroed word, then a float32 pass over the same outputs that runs only if it did."""
    if weight.dim() < 2:
        raise ValueError(f"int8-sym quantizes matrices, got shape {tuple(weight.shape)}")
    matrix = weight.reshape(weight.shape[0], -1).contiguous()
    cols = matrix.shape[1]
    if matrix.dtype == torch.float16:     # nothing is beyond float16's range
        q, scb, _, flags = _launch(matrix, cols, _BNB, 8, torch.float32, f16=True)
    else:
        wide = torch.zeros(1, dtype=torch.int32, device=matrix.device)
        q, scb, zero, flags = _launch(matrix, cols, _BNB, 8, torch.float32, f16=True, wide=wide, wide_mode=1)
        _launch(matrix, cols, _BNB, 8, torch.float32, f16=False, wide=wide, wide_mode=2, out=(q, scb, zero))
    packed = cpu_int8.PackedInt8Rows(weight=q, scb=scb.reshape(-1), shape=tuple(weight.shape), dtype=weight.dtype)
    return packed, flags


def quantize_int8_rows(weight: torch.Tensor) -> cpu_int8.PackedInt8Rows:
    return finish(*quantize_int8_rows_async(weight))


def quantize_int_async(weight: torch.Tensor, bits: int, symmetric: bool, group_size: int | None,
                       scale_dtype: torch.dtype | None = None) -> tuple[cpu_int.PackedInt, torch.Tensor]:
    """compressed-tensors' integer qparams, results and flags left on the device (see ``finish``)."""
    if weight.dim() < 2:
        raise ValueError(f"integer schemes quantize matrices, got shape {tuple(weight.shape)}")
    if group_size is not None and group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    dtype = scale_dtype or weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        # Integer or odd scale dtypes: the torch code on the CPU, moved back (same bytes by definition).
        packed = cpu_int.quantize_int(weight.cpu(), bits, symmetric, group_size, scale_dtype)
        return _to_device(packed, weight.device), torch.zeros(1, dtype=torch.int32, device=weight.device)
    matrix = weight.reshape(weight.shape[0], -1).contiguous()
    segment = matrix.shape[1] if group_size is None else group_size
    q, scale, zero, flags = _launch(matrix, max(segment, 1), _SYM if symmetric else _ASYM, bits, dtype)
    return cpu_int.PackedInt(q=q, scale=scale, zero_point=None if symmetric else zero, bits=bits,
                             group_size=group_size, shape=tuple(weight.shape), dtype=dtype), flags


def quantize_int(weight: torch.Tensor, bits: int, symmetric: bool, group_size: int | None,
                 scale_dtype: torch.dtype | None = None) -> cpu_int.PackedInt:
    return finish(*quantize_int_async(weight, bits, symmetric, group_size, scale_dtype))


def _to_device(packed: cpu_int.PackedInt, device: torch.device) -> cpu_int.PackedInt:
    packed.q = packed.q.to(device)
    packed.scale = packed.scale.to(device)
    if packed.zero_point is not None:
        packed.zero_point = packed.zero_point.to(device)
    return packed


def _int8_sym(weight: torch.Tensor, **params: Any) -> cpu_int8.PackedInt8Rows:
    return quantize_int8_rows(weight)


def _int8_asym(weight: torch.Tensor, **params: Any) -> cpu_int.PackedInt:
    return quantize_int(weight, 8, symmetric=False, group_size=None)


def _int4(symmetric: bool):
    default_group_size = 128

    def quantize(weight: torch.Tensor, **params: Any) -> cpu_int.PackedInt:
        group_size = params.get("group_size", default_group_size)
        return quantize_int(weight, 4, symmetric, None if group_size is None else int(group_size))

    quantize.__name__ = f"quantize_int4_{'sym' if symmetric else 'asym'}"
    return quantize


def _w8a8(weight: torch.Tensor, **params: Any) -> cpu_int.PackedInt:
    return quantize_int(weight, 8, symmetric=True, group_size=None)


FUSED = {"int8-sym": _int8_sym, "int8-asym": _int8_asym, "w8a8": _w8a8, "int4-sym": _int4(True),
         "int4-asym": _int4(False)}
