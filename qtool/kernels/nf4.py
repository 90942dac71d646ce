"""NF4 / FP4 with double quantization in two Triton launches, the bytes of qtool.schemes.nf4.

1. ``_quantize_4bit_kernel``: per block of ``block_size`` elements the absmax, the scaled values
   (``x * (1 / absmax)`` for whole blocks, ``x / absmax`` for the trailing partial one, as
   bitsandbytes' torch kernel), the 4-bit code (the number of sorted code midpoints strictly below
   the value: torch.bucketize's rule, so a value on a midpoint takes the lower code; FP4 then maps
   the sorted position to its bit pattern) and two codes per byte, high nibble first.
2. ``_quantize_dynamic_kernel`` (double quantization): ``absmax - offset`` in blocks of 256 with
   bitsandbytes' 8-bit dynamic map, through the same 65536-bin table as the CPU path.

The offset (mean of the absmax) is a float64 sum rounded once to float32, like the CPU path's
``nested_offset`` helper: a float32 mean depends on the summation order, which differs between
devices, CPU vector widths and thread counts.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from qtool.schemes import nf4 as cpu

# Elements per program of the 4-bit kernel (whole blocks) and its warps: an H100 wants enough bytes
# in flight per SM; 4096 bf16 elements (8 KB) per program with 4 warps keeps 16 elements per thread.
_ELEMENTS_PER_PROGRAM = 4096
_NUM_WARPS = 4
_NESTED_ROWS = 8          # nested blocks (of 256) per program of the dynamic kernel


@triton.jit
def _clamp(v, low, high):
    # torch.clamp's rule: a bound replaces v only when v is beyond it, so -0.0 and NaN stay.
    v = tl.where(v < low, low, v)
    return tl.where(v > high, high, v)


@triton.jit
def _bucketize16(v, bounds_ptr):
    """Number of the 15 sorted midpoints strictly below v (torch.bucketize's index), by binary
    search: 4 comparisons and 11 selects instead of 15 comparisons and additions."""
    b0 = tl.load(bounds_ptr + 0)
    b1 = tl.load(bounds_ptr + 1)
    b2 = tl.load(bounds_ptr + 2)
    b3 = tl.load(bounds_ptr + 3)
    b4 = tl.load(bounds_ptr + 4)
    b5 = tl.load(bounds_ptr + 5)
    b6 = tl.load(bounds_ptr + 6)
    b7 = tl.load(bounds_ptr + 7)
    b8 = tl.load(bounds_ptr + 8)
    b9 = tl.load(bounds_ptr + 9)
    b10 = tl.load(bounds_ptr + 10)
    b11 = tl.load(bounds_ptr + 11)
    b12 = tl.load(bounds_ptr + 12)
    b13 = tl.load(bounds_ptr + 13)
    b14 = tl.load(bounds_ptr + 14)
    upper8 = v > b7
    upper4 = v > tl.where(upper8, b11, b3)
    upper2 = v > tl.where(upper8, tl.where(upper4, b13, b9), tl.where(upper4, b5, b1))
    upper1 = v > tl.where(upper8, tl.where(upper4, tl.where(upper2, b14, b12), tl.where(upper2, b10, b8)),
                          tl.where(upper4, tl.where(upper2, b6, b4), tl.where(upper2, b2, b0)))
    return (upper8.to(tl.int32) * 8 + upper4.to(tl.int32) * 4 + upper2.to(tl.int32) * 2 + upper1.to(tl.int32))


@triton.jit
def _quantize_4bit_kernel(x_ptr, data_ptr, absmax_ptr, bounds_ptr, n, n_blocks, order_table,
                          BLOCK: tl.constexpr, ROWS: tl.constexpr, FP4: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    block_ids = pid * ROWS + tl.arange(0, ROWS)
    offsets = block_ids[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    # 1e-38 is a float32 subnormal (a Python float that small would make Triton use float64): an
    # all-zero block scales by 1e38 instead of dividing by zero.
    clamped = _clamp(absmax, tl.full([ROWS], 1e-38, tl.float32), float("inf"))
    inverse = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), clamped)
    if (pid + 1) * ROWS * BLOCK > n:
        partial = (block_ids + 1) * BLOCK > n
        scaled = tl.where(partial[:, None], tl.math.div_rn(x, clamped[:, None]), x * inverse[:, None])
        absmax = tl.where(partial, clamped, absmax)
    else:
        scaled = x * inverse[:, None]
    scaled = _clamp(scaled, -1.0, 1.0)
    code = _bucketize16(scaled, bounds_ptr)
    if FP4:
        # Sorted position -> FP4 bit pattern, a 16-nibble table in one integer.
        code = ((order_table >> (code.to(tl.int64) * 4)) & 15).to(tl.int32)
    high, low = tl.split(tl.reshape(code, [ROWS, BLOCK // 2, 2]))
    packed = ((high << 4) | low).to(tl.uint8)
    byte_offsets = block_ids[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    tl.store(data_ptr + byte_offsets, packed, mask=byte_offsets < (n + 1) // 2)
    tl.store(absmax_ptr + block_ids, absmax, mask=block_ids < n_blocks)


@triton.jit
def _quantize_dynamic_kernel(values_ptr, offset_ptr, codes_ptr, absmax_ptr, lut_ptr, n, n_blocks,
                             BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    block_ids = pid * ROWS + tl.arange(0, ROWS)
    offsets = block_ids[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    valid = offsets < n
    offset = tl.load(offset_ptr)
    # The CPU path pads (values - offset) with zeros, which never raise a block's absmax.
    values = tl.where(valid, tl.load(values_ptr + offsets, mask=valid, other=0.0) - offset, 0.0)
    absmax = tl.max(tl.abs(values), axis=1)
    reciprocal = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), absmax)
    inverse = tl.where(absmax > 0, reciprocal, 0.0)
    scaled = _clamp(values * inverse[:, None], -1.0, 1.0)
    bins = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)
    codes = tl.load(lut_ptr + bins)
    codes = tl.where(absmax[:, None] == 0, 0, codes).to(tl.uint8)
    tl.store(codes_ptr + offsets, codes, mask=valid)
    tl.store(absmax_ptr + block_ids, absmax, mask=block_ids < n_blocks)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Constant tables, built once on the CPU by the CPU path's own functions and copied to the
    device: built there, torch would divide by a constant through its reciprocal and could move a
    bin; built per call, the host-to-device copy would also stall the stream every call.
    kinds: "bounds:nf4|fp4" (sorted code midpoints), "code:nf4|fp4", "dynamic" (the 256-value map),
    "lut" (its 65536-bin table)."""
    key = (kind, device)
    if key not in _TABLES:
        cpu_device = torch.device("cpu")
        if kind == "lut":
            table = cpu._dynamic_lut(cpu_device)
        elif kind == "dynamic":
            table = cpu.dynamic_map(cpu_device)
        elif kind.startswith("code:"):
            table = cpu.code_4bit(kind[5:], cpu_device)
        else:
            table = cpu._bounds_4bit(kind[7:], cpu_device)[0]
        _TABLES[key] = table.contiguous().to(device)
    return _TABLES[key]


def _order_table(quant_type: str) -> int:
    if quant_type != "fp4":
        return 0
    return sum(code << (4 * position) for position, code in enumerate(cpu._FP4_ORDER))


def nested_offset(absmax: torch.Tensor) -> torch.Tensor:
    """Mean of the float32 absmax as a float32 0-d tensor: a float64 sum, rounded once."""
    return (absmax.double().sum() / absmax.numel()).float()


def quantize_dynamic(values: torch.Tensor, block_size: int, offset: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``qtool.schemes.nf4.quantize_dynamic(values - offset, block_size)`` in one launch."""
    values = values.reshape(-1).float().contiguous()
    if offset is None:
        offset = torch.zeros((), dtype=torch.float32, device=values.device)
    n = values.numel()
    n_blocks = -(-n // block_size)
    codes = torch.empty(n, dtype=torch.uint8, device=values.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=values.device)
    rows = _NESTED_ROWS if block_size <= 1024 else 1
    grid = (triton.cdiv(n_blocks, rows),)
    _quantize_dynamic_kernel[grid](values, offset.reshape(1), codes, absmax, _table("lut", values.device), n,
                                   n_blocks, BLOCK=block_size, ROWS=rows, num_warps=4, enable_fp_fusion=False)
    return codes, absmax


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64,
                  double_quant: bool = True) -> cpu.Packed4bit:
    if block_size not in cpu.BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {cpu.BLOCK_SIZES}, got {block_size}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization takes float32/float16/bfloat16, got {weight.dtype}")
    device = weight.device
    bounds = _table(f"bounds:{quant_type}", device)
    flat = weight.reshape(-1).contiguous()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    data = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    rows = max(1, _ELEMENTS_PER_PROGRAM // block_size)
    grid = (triton.cdiv(n_blocks, rows),)
    _quantize_4bit_kernel[grid](flat, data, absmax, bounds, n, n_blocks, _order_table(quant_type),
                                BLOCK=block_size, ROWS=rows, FP4=quant_type == "fp4", num_warps=_NUM_WARPS,
                                enable_fp_fusion=False)
    packed = cpu.Packed4bit(quant_type=quant_type, data=data.unsqueeze(1), absmax=absmax, block_size=block_size,
                            shape=tuple(weight.shape), dtype=weight.dtype, quant_map=_table(f"code:{quant_type}", device).clone())
    if double_quant:
        offset = nested_offset(absmax)
        packed.absmax, packed.nested_absmax = quantize_dynamic(absmax, cpu.NESTED_BLOCK_SIZE, offset)
        packed.nested_quant_map = _table("dynamic", device).clone()
        packed.nested_offset = offset.item()
    return packed


def _scheme_quantize(quant_type: str):
    def quantize(weight: torch.Tensor, **params: Any) -> cpu.Packed4bit:
        block_size, double_quant = cpu._params(params)
        return quantize_4bit(weight, quant_type, block_size, double_quant)

    quantize.__name__ = f"quantize_{quant_type}"
    return quantize


FUSED = {"nf4": _scheme_quantize("nf4"), "fp4": _scheme_quantize("fp4")}
