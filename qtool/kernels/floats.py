"""FP8 per output channel and NVFP4 weights in Triton kernels, the bytes of qtool.schemes.floats.

The torch code takes the range and the scale in the weight's dtype and divides in it (bfloat16 or
float16 results rounded to that dtype): here every value is taken in float32, divided correctly
rounded (``div_rn``) and rounded to the weight's dtype where the torch code's result has that dtype
(``_in_dtype``), so the stored bytes are the same. FP8 values are cast round-to-nearest-even from the
clamped quotient; E2M1 codes follow ``e2m1_codes``' thresholds (ties to the even code).

- fp8: one program per row, two passes over the row in chunks (absmax, then quantize);
- nvfp4: the global scale from the tensor's absmax in a few torch ops on the device (no host sync),
  then one program per GROUPS groups of 16 (absmax, E4M3 group scale, E2M1 codes packed two a byte).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from qtool.kernels import launch, read_flags
from qtool.schemes import floats as cpu_floats

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ROW_BLOCK = 2048            # fp8: columns per chunk of a row
_GROUPS = 256                # nvfp4: groups of 16 per program


@triton.jit
def _in_dtype(v, DT: tl.constexpr):
    """float32 ``v`` rounded to the weight's dtype (0 float32, 1 bfloat16, 2 float16) and back."""
    if DT == 1:
        return v.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    elif DT == 2:
        return v.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        return v


@triton.jit
def _magnitude(x):
    # |x| with NaN as +inf: Triton's max drops NaN, and a non-finite weight must still be seen.
    return tl.where(x == x, tl.abs(x), float("inf"))


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, scale_ptr, flags_ptr, cols, EPS: tl.constexpr, DT: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * cols
    absmax = tl.zeros([BLOCK], tl.float32)
    for start in range(0, cols, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + c, mask=c < cols, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, _magnitude(x))
    peak = tl.max(absmax, axis=0)
    scale = _in_dtype(tl.div_rn(peak, 448.0), DT)
    scale = tl.where(scale == 0.0, EPS, scale)
    for start in range(0, cols, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + c, mask=c < cols, other=0.0).to(tl.float32)
        v = _in_dtype(tl.div_rn(x, scale), DT)
        v = tl.where(v < -448.0, -448.0, v)
        v = tl.where(v > 448.0, 448.0, v)
        tl.store(q_ptr + base + c, v.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=c < cols)
    tl.store(scale_ptr + row, scale)
    tl.store(flags_ptr + row, (peak == float("inf")).to(tl.int32))


@triton.jit
def _e2m1_index(m):
    """Magnitude index 0..7 of |value| ``m`` on the E2M1 grid, ties to the even index."""
    return ((m > 0.25).to(tl.int32) + (m >= 0.75).to(tl.int32) + (m > 1.25).to(tl.int32)
            + (m >= 1.75).to(tl.int32) + (m > 2.5).to(tl.int32) + (m >= 3.5).to(tl.int32) + (m > 5.0).to(tl.int32))


@triton.jit
def _nvfp4_kernel(x_ptr, packed_ptr, scale_ptr, global_ptr, flags_ptr, n_groups, DT: tl.constexpr,
                  GROUPS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = pid * GROUPS + tl.arange(0, GROUPS)
    valid = g < n_groups
    e = tl.arange(0, 16)
    x = tl.load(x_ptr + g[:, None] * 16 + e[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    absmax = tl.max(_magnitude(x), axis=1)
    global_scale = tl.load(global_ptr)
    local = global_scale * _in_dtype(tl.div_rn(absmax, 6.0), DT)
    local = tl.where(local < -448.0, -448.0, local)
    local = tl.where(local > 448.0, 448.0, local)
    local = local.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
    local = tl.where(local == 0.0, 0.125, local)
    step = tl.div_rn(local, global_scale)
    q = tl.div_rn(x, step[:, None])
    code = _e2m1_index(tl.minimum(tl.abs(q), 6.0)) | ((q < 0.0).to(tl.int32) << 3)
    even, odd = tl.split(tl.reshape(code, [GROUPS, 8, 2]))
    byte = (even | (odd << 4)).to(tl.uint8)
    tl.store(packed_ptr + g[:, None] * 8 + tl.arange(0, 8)[None, :], byte, mask=valid[:, None])
    tl.store(scale_ptr + g, local.to(tl.float8e4nv), mask=valid)
    flags = tl.max((absmax == float("inf")).to(tl.int32), axis=0)
    tl.store(flags_ptr + pid, flags)


def _fp8(weight: torch.Tensor, **params: Any) -> cpu_floats.PackedFloat:
    matrix = cpu_floats._matrix(weight, "fp8")
    if matrix.dtype not in _DTYPES or matrix.numel() == 0:
        return cpu_floats.quantize_fp8(weight)
    matrix = matrix.contiguous()
    rows, cols = matrix.shape
    values = torch.empty((rows, cols), dtype=cpu_floats.FP8, device=matrix.device)
    scale = torch.empty((rows, 1), dtype=matrix.dtype, device=matrix.device)
    flags = torch.empty(rows, dtype=torch.int32, device=matrix.device)
    launch(_fp8_rows_kernel, (rows,), matrix, values, scale, flags, cols, EPS=torch.finfo(matrix.dtype).eps,
           DT=_DTYPES[matrix.dtype], BLOCK=min(_ROW_BLOCK, triton.next_power_of_2(cols)), num_warps=8,
           enable_fp_fusion=False)
    read_flags(flags)
    return cpu_floats.PackedFloat(values, scale, None, tuple(weight.shape), weight.dtype)


def _nvfp4(weight: torch.Tensor, **params: Any) -> cpu_floats.PackedFloat:
    matrix = cpu_floats._matrix(weight, "nvfp4", cpu_floats.NVFP4_GROUP)
    if matrix.dtype not in _DTYPES or matrix.numel() == 0:
        return cpu_floats.quantize_nvfp4(weight, params.get("global_absmax"))
    matrix = matrix.contiguous()
    rows, cols = matrix.shape
    # The torch code's global scale, on the device (no host sync).
    low, high = torch.aminmax(matrix)          # one read, no |x| temporary (NaN propagates: flagged below)
    global_scale = cpu_floats.nvfp4_global_scale(torch.maximum(-low, high), params.get("global_absmax"))
    n_groups = rows * cols // cpu_floats.NVFP4_GROUP
    packed = torch.empty((rows, cols // 2), dtype=torch.uint8, device=matrix.device)
    scale = torch.empty((rows, cols // cpu_floats.NVFP4_GROUP), dtype=cpu_floats.FP8, device=matrix.device)
    grid = (triton.cdiv(n_groups, _GROUPS),)
    flags = torch.empty(grid[0], dtype=torch.int32, device=matrix.device)
    launch(_nvfp4_kernel, grid, matrix, packed, scale, global_scale, flags, n_groups, DT=_DTYPES[matrix.dtype],
           GROUPS=_GROUPS, num_warps=4, enable_fp_fusion=False)
    read_flags(flags)
    return cpu_floats.PackedFloat(packed, scale, global_scale, tuple(weight.shape), weight.dtype)


FUSED = {"fp8": _fp8, "nvfp4a16": _nvfp4, "nvfp4": _nvfp4}
