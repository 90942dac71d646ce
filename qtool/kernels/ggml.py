"""GGML block types in Triton, the bytes of qtool.schemes.ggml / ggml_kquants.

- 32-element types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): one kernel, the type a compile-time switch.
  Each program takes ROWS consecutive blocks (blocks never straddle rows, so the flat tensor is a
  list of blocks) and writes their bytes in place.
- Q4_K / Q5_K: the scale-and-min search of ``_search_scale_min`` over all sub-blocks of a
  program's super-blocks, the 6-bit sub-block scales, then the one-step refinement, all in
  registers; sums in the fixed pairwise order of ``pairwise_sum`` (sum of neighbours, level by
  level), which the CPU path uses too.

Rounding helpers mirror the CPU code: ``roundf`` (halves away from zero) for Q8_0, truncation of
``v + 0.5`` for Q4/Q5, and llama.cpp's nearest_int (1.5 * 2**23 trick, halves to even, like
torch.round) for the K-quants. Every division is ``div_rn`` (Triton's ``/`` is approximate), and
kernels are compiled without FMA contraction.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from qtool.errors import BadArgument
from qtool.schemes.ggml import QK_K

_KIND = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q5_0": 3, "Q5_1": 4}
_TYPE_SIZE = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176}
_ROWS_32 = 128            # 32-element blocks per program
_NUM_WARPS_32 = 4
_SUPER_BLOCKS = 2         # K-quant super-blocks per program
_NUM_WARPS_K = 2


# ---------------------------------------------------------------------------------------------
# helpers

@triton.jit
def _rint(v):
    # nearest_int: adding 1.5 * 2**23 leaves no fraction bits, so the float addition rounds half to
    # even. Exact for |v| < 2**22; every caller clamps to a small range afterwards, where larger
    # |v| (and inf) land on the same bound as torch.round's result would.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _clamp(v, low, high):
    # torch.clamp's rule: a bound replaces v only when v is beyond it, so -0.0 and NaN stay.
    v = tl.where(v < low, low, v)
    return tl.where(v > high, high, v)


@triton.jit
def _recip(v):
    return tl.math.div_rn(tl.full(v.shape, 1.0, tl.float32), v)


@triton.jit
def _store_fp16(ptr, value, mask):
    bits = value.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    tl.store(ptr, (bits & 255).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def _fp16_round(value):
    return value.to(tl.float16).to(tl.float32)


@triton.jit
def _sum32(t, R: tl.constexpr):
    """[R, 32] -> [R]: pairwise_sum's order, (t0 + t1) + (t2 + t3) ... level by level."""
    a, b = tl.split(tl.reshape(t, [R, 16, 2]))
    t = a + b
    a, b = tl.split(tl.reshape(t, [R, 8, 2]))
    t = a + b
    a, b = tl.split(tl.reshape(t, [R, 4, 2]))
    t = a + b
    a, b = tl.split(tl.reshape(t, [R, 2, 2]))
    t = a + b
    a, b = tl.split(t)
    return a + b


@triton.jit
def _halves(t, R: tl.constexpr):
    """[R, 32] -> ([R, 16], [R, 16]): first and second half of each row."""
    return tl.split(tl.permute(tl.reshape(t, [R, 2, 16]), (0, 2, 1)))


# ---------------------------------------------------------------------------------------------
# 32-element types

@triton.jit
def _quantize_32_kernel(x_ptr, out_ptr, n_blocks, KIND: tl.constexpr, TYPE_SIZE: tl.constexpr,
                        ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    block_ids = pid * ROWS + tl.arange(0, ROWS)
    valid = block_ids < n_blocks
    cols = tl.arange(0, 32)
    x = tl.load(x_ptr + block_ids[:, None] * 32 + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    base = out_ptr + block_ids * TYPE_SIZE
    if KIND == 0:   # Q8_0: d = absmax / 127, q = roundf(x / d)
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full([ROWS], 127.0, tl.float32))
        inverse = tl.where(scale == 0, 0.0, _recip(scale))
        v = x * inverse[:, None]
        magnitude = tl.abs(v)
        whole = magnitude.to(tl.int32).to(tl.float32)
        rounded = whole + (magnitude - whole >= 0.5).to(tl.float32)
        q = tl.where(v < 0, -rounded, rounded).to(tl.int32).to(tl.int8).to(tl.uint8, bitcast=True)
        _store_fp16(base, scale, valid)
        tl.store(base[:, None] + 2 + cols[None, :], q, mask=valid[:, None])
    else:
        if KIND == 1 or KIND == 3:   # Q4_0 / Q5_0: d = signed absmax / -8 (-16)
            index = tl.argmax(tl.abs(x), axis=1, tie_break_left=True)
            peak = tl.max(tl.where(cols[None, :] == index[:, None], x, float("-inf")), axis=1)
            divisor = -8.0 if KIND == 1 else -16.0
            scale = tl.math.div_rn(peak, tl.full([ROWS], divisor, tl.float32))
            inverse = tl.where(scale == 0, 0.0, _recip(scale))
            bias = 8.5 if KIND == 1 else 16.5
            v = x * inverse[:, None] + bias
            header = 2
        else:                        # Q4_1 / Q5_1: d = (max - min) / 15 (31), m = min
            low = tl.min(x, axis=1)
            steps = 15.0 if KIND == 2 else 31.0
            scale = tl.math.div_rn(tl.max(x, axis=1) - low, tl.full([ROWS], steps, tl.float32))
            inverse = tl.where(scale == 0, 0.0, _recip(scale))
            v = (x - low[:, None]) * inverse[:, None] + 0.5
            header = 4
            _store_fp16(base + 2, low, valid)
        top = 15 if KIND <= 2 else 31
        q = _clamp(v.to(tl.int32), 0, top)    # .to(int32) truncates toward zero
        _store_fp16(base, scale, valid)
        if KIND >= 3:   # fifth bits: element i -> bit i % 8 of byte i // 8
            high_bits = tl.sum((q >> 4).to(tl.int64) << cols[None, :].to(tl.int64), axis=1)
            for k in tl.static_range(4):
                tl.store(base + header + k, ((high_bits >> (8 * k)) & 255).to(tl.uint8), mask=valid)
            header += 4
        first, second = _halves(q, ROWS)
        packed = ((first & 15) | ((second & 15) << 4)).to(tl.uint8)
        tl.store(base[:, None] + header + tl.arange(0, 16)[None, :], packed, mask=valid[:, None])


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K

@triton.jit
def _weighted_error(scale, offset, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl):
    # ggml_kquants' error(): Σ w (scale*l + offset - x)^2 expanded, evaluated left to right.
    return (scale * scale * sum_l2 + 2 * scale * offset * sum_l - 2 * scale * sum_xl
            + offset * offset * sum_w - 2 * offset * sum_x + sum_x2)


@triton.jit
def _kquant_asym_kernel(x_ptr, out_ptr, steps_ptr, n_super, SB: tl.constexpr, NMAX: tl.constexpr,
                        NSTEP: tl.constexpr, Q5: tl.constexpr):
    G: tl.constexpr = SB * 8
    TYPE_SIZE: tl.constexpr = 176 if Q5 else 144
    pid = tl.program_id(0).to(tl.int64)
    groups = pid * G + tl.arange(0, G)
    cols = tl.arange(0, 32)
    x = tl.load(x_ptr + groups[:, None] * 32 + cols[None, :], mask=(groups < n_super * 8)[:, None],
                other=0.0).to(tl.float32)

    # _rms_weights: sqrt(mean(x^2)) + |x|
    rms = tl.sqrt_rn(_sum32(x * x, G) * 0.03125)
    w = rms[:, None] + tl.abs(x)

    # _search_scale_min
    low = tl.min(x, axis=1)
    low = tl.where(low > 0, 0.0, low)
    span = tl.max(x, axis=1) - low
    flat = span == 0
    span = tl.where(flat, 1.0, span)
    shifted = x - low[:, None]
    sum_w = _sum32(w, G)
    wx = w * x
    sum_x = _sum32(wx, G)
    sum_x2 = _sum32(wx * x, G)
    # Candidate 0 is the plain min/max grid (nmax / span, the fit not solved); candidates 1.. are
    # least-squares fits, each kept only when strictly better and det > 0 (a NaN error never wins,
    # a NaN best error is never replaced, as the CPU loop's comparisons do). ``scalar / span`` is
    # torch's __rtruediv__: span's reciprocal times the scalar, two roundings.
    reciprocal_span = _recip(span)
    inverse = reciprocal_span * tl.load(steps_ptr)
    best_scale = _recip(inverse)
    best_min = low
    levels = _clamp(_rint(inverse[:, None] * shifted), 0.0, NMAX)
    wl = w * levels
    best_error = _weighted_error(best_scale, best_min, sum_w, sum_x, sum_x2,
                                 _sum32(wl, G), _sum32(wl * levels, G), _sum32(wx * levels, G))
    for step in tl.static_range(1, NSTEP + 2):
        inverse = reciprocal_span * tl.load(steps_ptr + step)
        levels = _clamp(_rint(inverse[:, None] * shifted), 0.0, NMAX)
        wl = w * levels
        sum_l = _sum32(wl, G)
        sum_l2 = _sum32(wl * levels, G)
        sum_xl = _sum32(wx * levels, G)
        det = sum_w * sum_l2 - sum_l * sum_l
        scale = tl.math.div_rn(sum_w * sum_xl - sum_x * sum_l, det)
        offset = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, det)
        positive = offset > 0
        scale = tl.where(positive, tl.math.div_rn(sum_xl, sum_l2), scale)
        offset = tl.where(positive, 0.0, offset)
        candidate = _weighted_error(scale, offset, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl)
        better = (det > 0) & (candidate < best_error)
        best_error = tl.where(better, candidate, best_error)
        best_scale = tl.where(better, scale, best_scale)
        best_min = tl.where(better, offset, best_min)
    scales = tl.reshape(tl.where(flat, 0.0, best_scale), [SB, 8])
    # Negation as a product: Triton's unary minus is 0 - v, which turns -(+0.0) into +0.0.
    mins = tl.reshape(tl.where(flat, low * -1.0, best_min * -1.0), [SB, 8])

    # _quantize_k_asymmetric: 6-bit sub-block scales against the super-block's largest
    max_scale = tl.max(scales, axis=1)
    max_scale = tl.where(max_scale < 0, 0.0, max_scale)
    max_min = tl.max(mins, axis=1)
    max_min = tl.where(max_min < 0, 0.0, max_min)
    inv_scale = tl.where(max_scale > 0, _recip(tl.where(max_scale > 0, max_scale, 1.0)) * 63, 0.0)
    inv_min = tl.where(max_min > 0, _recip(tl.where(max_min > 0, max_min, 1.0)) * 63, 0.0)
    ls = _clamp(_rint(inv_scale[:, None] * scales), 0.0, 63.0)
    lm = _clamp(_rint(inv_min[:, None] * mins), 0.0, 63.0)
    d_store = tl.math.div_rn(max_scale, tl.full([SB], 63.0, tl.float32))
    dmin_store = tl.math.div_rn(max_min, tl.full([SB], 63.0, tl.float32))
    d = tl.reshape(tl.broadcast_to(_fp16_round(d_store)[:, None], [SB, 8]), [G])
    dmin = tl.reshape(tl.broadcast_to(_fp16_round(dmin_store)[:, None], [SB, 8]), [G])

    # _refine_asymmetric: the scale code as rounded, one below, one above; lowest error wins
    ls_g = tl.reshape(ls, [G])
    offset = dmin * tl.reshape(lm, [G])
    best_ls = ls_g
    best_levels = levels
    best_err = sum_w
    for trial in tl.static_range(3):
        codes = _clamp(ls_g + (0.0 if trial == 0 else (-1.0 if trial == 1 else 1.0)), 0.0, 63.0)
        scale = d * codes
        safe = tl.where(scale == 0, 1.0, scale)
        trial_levels = _clamp(_rint(tl.math.div_rn(x + offset[:, None], safe[:, None])), 0.0, NMAX)
        trial_levels = tl.where(scale[:, None] == 0, 0.0, trial_levels)
        diff = scale[:, None] * trial_levels - offset[:, None] - x
        err = _sum32(diff * diff, G)
        if trial == 0:
            best_err = err
            best_levels = trial_levels
        else:
            better = err < best_err
            best_err = tl.where(better, err, best_err)
            best_ls = tl.where(better, codes, best_ls)
            best_levels = tl.where(better[:, None], trial_levels, best_levels)

    # bytes: d, dmin, 12 bytes of scales, (qh,) qs
    sb_ids = pid * SB + tl.arange(0, SB)
    sb_valid = sb_ids < n_super
    base = out_ptr + sb_ids * TYPE_SIZE
    _store_fp16(base, d_store, sb_valid)
    _store_fp16(base + 2, dmin_store, sb_valid)
    ls_i = tl.reshape(best_ls, [SB, 8]).to(tl.int32)
    lm_i = lm.to(tl.int32)
    ls_lo, ls_hi = tl.split(tl.permute(tl.reshape(ls_i, [SB, 2, 4]), (0, 2, 1)))
    lm_lo, lm_hi = tl.split(tl.permute(tl.reshape(lm_i, [SB, 2, 4]), (0, 2, 1)))
    k4 = tl.arange(0, 4)[None, :]
    scale_ptr = base[:, None] + 4 + k4
    tl.store(scale_ptr, (ls_lo | ((ls_hi >> 4) << 6)).to(tl.uint8), mask=sb_valid[:, None])
    tl.store(scale_ptr + 4, (lm_lo | ((lm_hi >> 4) << 6)).to(tl.uint8), mask=sb_valid[:, None])
    tl.store(scale_ptr + 8, ((ls_hi & 15) | ((lm_hi & 15) << 4)).to(tl.uint8), mask=sb_valid[:, None])
    level_i = best_levels.to(tl.int32)
    qs_offset = 16
    if Q5:
        # qh[j] bit k: fifth bit of element 32k + j
        high = (tl.reshape(level_i, [SB, 8, 32]) >> 4) << tl.arange(0, 8)[None, :, None]
        qh = tl.sum(high, axis=1)
        tl.store(base[:, None] + 16 + cols[None, :], qh.to(tl.uint8), mask=sb_valid[:, None])
        qs_offset = 48
    low_part, high_part = tl.split(tl.permute(tl.reshape(level_i, [SB, 4, 2, 32]), (0, 1, 3, 2)))
    qs = ((low_part & 15) | ((high_part & 15) << 4)).to(tl.uint8)
    qs_ptr = (base[:, None, None] + qs_offset + tl.arange(0, 4)[None, :, None] * 32 + cols[None, None, :])
    tl.store(qs_ptr, qs, mask=sb_valid[:, None, None])


# ---------------------------------------------------------------------------------------------
# launchers

def _f32(value: float) -> float:
    return float(np.float32(value))


_STEP_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}
# (nmax, rmin, rdelta, nstep) of make_qkx2_quants as ggml_kquants calls it
_K_PARAMS = {"Q4_K": (15, -1.0, 0.2, 10), "Q5_K": (31, -0.5, 0.2, 7)}


def _steps(name: str, device: torch.device) -> torch.Tensor:
    key = (name, device)
    if key not in _STEP_TABLES:
        nmax, rmin, rdelta, nstep = _K_PARAMS[name]
        values = [float(nmax)] + [_f32(_f32(rmin) + _f32(rdelta) * step + nmax) for step in range(nstep + 1)]
        _STEP_TABLES[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _STEP_TABLES[key]


def _check(name: str, weight: torch.Tensor, block_size: int) -> None:
    shape = tuple(weight.shape)
    if not (len(shape) >= 1 and shape[-1] % block_size == 0):
        raise BadArgument(f"{name} needs rows that are a multiple of {block_size} "
                          f"elements; got a tensor of shape {list(shape)}")
    if not weight.is_floating_point():
        raise BadArgument(f"{name} quantizes floating-point tensors; got {weight.dtype}")


def quantize_ggml(weight: torch.Tensor, name: str):
    from qtool.schemes.ggml import GGMLTensor

    k_quant = name in _K_PARAMS
    block_size = QK_K if k_quant else 32
    _check(name, weight, block_size)
    shape = tuple(weight.shape)
    flat = weight.reshape(-1).contiguous()
    n_blocks = flat.numel() // block_size
    type_size = _TYPE_SIZE[name]
    out = torch.empty(n_blocks * type_size, dtype=torch.uint8, device=weight.device)
    if n_blocks:
        if k_quant:
            nmax, _, _, nstep = _K_PARAMS[name]
            grid = (triton.cdiv(n_blocks, _SUPER_BLOCKS),)
            _kquant_asym_kernel[grid](flat, out, _steps(name, weight.device), n_blocks, SB=_SUPER_BLOCKS,
                                      NMAX=nmax, NSTEP=nstep, Q5=name == "Q5_K", num_warps=_NUM_WARPS_K,
                                      enable_fp_fusion=False)
        else:
            grid = (triton.cdiv(n_blocks, _ROWS_32),)
            _quantize_32_kernel[grid](flat, out, n_blocks, KIND=_KIND[name], TYPE_SIZE=type_size, ROWS=_ROWS_32,
                                      num_warps=_NUM_WARPS_32, enable_fp_fusion=False)
    row_bytes = shape[-1] // block_size * type_size
    return GGMLTensor(name, shape, out.reshape(-1, row_bytes))


def _scheme_quantize(name: str):
    def quantize(weight: torch.Tensor, **params: Any):
        return quantize_ggml(weight, name)

    quantize.__name__ = f"quantize_{name}"
    return quantize


FUSED = {name: _scheme_quantize(name) for name in _TYPE_SIZE}
