"""GGML block types in Triton, the bytes of qtool.schemes.ggml / ggml_kquants.

- 32-element types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): one kernel, the type a compile-time switch.
  Each program takes ROWS consecutive blocks (blocks never straddle rows, so the flat tensor is a
  list of blocks) and writes their bytes in place.
- Q4_K / Q5_K: ``_quantize_k32``: the scale-and-min search over all sub-blocks of a program's
  super-blocks, the 6-bit sub-block scales, then the rounds of the code fit, all in registers;
  sums in the fixed pairwise order of ``pairwise_sum`` (sum of neighbours, level by level),
  which the CPU path uses too. Q6_K: ``_search_scale_symmetric`` per group of 16, the
  8-bit group scales, the refinement.

  The K-quant kernels give each thread one sub-block (32 elements, Q6_K: 16) held as a tuple of
  [G] tensors, one per element: a pairwise sum is then register additions in exactly the CPU's
  order, with no shuffles or layout conversions (a [G, 32] tile split level by level needed both,
  and spilled). The candidate and refinement loops are runtime loops, which keeps the compiled
  kernel short. The bytes of neighbouring sub-blocks that share a byte are combined at the end as
  64-bit words (their bits are disjoint).

Rounding helpers mirror the CPU code: ``roundf`` (halves away from zero) for Q8_0, truncation of
``v + 0.5`` for Q4/Q5, and llama.cpp's nearest_int (1.5 * 2**23 trick, halves to even, like
torch.round) for the K-quants. Every division is ``div_rn`` (Triton's ``/`` is approximate), and
kernels are compiled without FMA contraction.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from qtool.errors import BadArgument
from qtool.kernels import launch, read_flags
from qtool.schemes import ggml_kquants as kq
from qtool.schemes.ggml import QK_K

_KIND = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q5_0": 3, "Q5_1": 4}
_TYPE_SIZE = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_ROWS_32 = 128            # 32-element blocks per program
_NUM_WARPS_32 = 4
_SUPER_BLOCKS = 16        # K-quant super-blocks per program: 128 sub-blocks, one per thread
_NUM_WARPS_K = 4
# Register cap for Q4_K/Q5_K: uncapped the compiler takes about 130 per thread; at 96 (no spills)
# more threads hide each other's latency: 1.15x on an H100 (88 spills and is slower again).
_MAX_REGISTERS_K = 96
_SUPER_BLOCKS_Q6 = 8      # Q6_K super-blocks per program: 128 groups of 16, one per thread
_NUM_WARPS_Q6 = 4


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
def _level_bits(level):
    """An integer-valued float in [0, 255] as int32, without a float-to-int conversion (those run
    at a fraction of the arithmetic rate): after adding 1.5 * 2**23 the value is the low bits."""
    return (level + 12582912.0).to(tl.int32, bitcast=True) & 255


@triton.jit
def _byte_word(levels, first: tl.constexpr, MASK: tl.constexpr, SHIFT: tl.constexpr):
    """Eight levels from ``first`` on as the bytes of a little-endian 64-bit word, each byte
    (level >> SHIFT) & MASK; built as two 32-bit halves (64-bit shifts cost twice as much)."""
    low = (_level_bits(levels[first]) >> SHIFT) & MASK
    high = (_level_bits(levels[first + 4]) >> SHIFT) & MASK
    for j in tl.static_range(1, 4):
        low = low | (((_level_bits(levels[first + j]) >> SHIFT) & MASK) << (8 * j))
        high = high | (((_level_bits(levels[first + 4 + j]) >> SHIFT) & MASK) << (8 * j))
    return low.to(tl.int64) | (high.to(tl.int64) << 32)


@triton.jit
def _store_fp16(ptr, value, mask):
    """Stores value as fp16 bytes; returns 2 (read_flags bit 1) when a stored value is inf or NaN
    (a finite weight too large for the block's scale), else 0."""
    bits = value.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    tl.store(ptr, (bits & 255).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)
    return tl.max((((bits & 0x7C00) == 0x7C00) & mask).to(tl.int32), axis=0) * 2


@triton.jit
def _fp16_round(value):
    return value.to(tl.float16).to(tl.float32)


@triton.jit
def _halves(t, R: tl.constexpr):
    """[R, 32] -> ([R, 16], [R, 16]): first and second half of each row."""
    return tl.split(tl.permute(tl.reshape(t, [R, 2, 16]), (0, 2, 1)))


@triton.jit
def _special_bits(x):
    """1 where x is inf, NaN or of magnitude 2^30 or more (exponent field >= 157, as cpu_ggml.c's
    load_block; qtool.schemes.ggml.LARGEST_INPUT), else 0: a bit test the compiler cannot fold."""
    return ((x.to(tl.int32, bitcast=True) & 0x7F800000) >= (157 << 23)).to(tl.int32)


@triton.jit
def _row_nonfinite(x, N: tl.constexpr):
    """1 when any thread's row (a tuple of N [G] tensors) holds a _special_bits value, else 0."""
    special = _special_bits(x[0])
    for i in tl.static_range(1, N):
        special = special | _special_bits(x[i])
    return tl.max(special, axis=0)


# ---------------------------------------------------------------------------------------------
# 32-element types

@triton.jit
def _quantize_32_kernel(x_ptr, out_ptr, flags_ptr, n_blocks, KIND: tl.constexpr, TYPE_SIZE: tl.constexpr,
                        ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    block_ids = pid * ROWS + tl.arange(0, ROWS)
    valid = block_ids < n_blocks
    cols = tl.arange(0, 32)
    x = tl.load(x_ptr + block_ids[:, None] * 32 + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    # read_flags bit 0: inf, NaN or a value no GGML type stores (NaN would vanish in tl.max)
    flag = tl.max(tl.max(_special_bits(x), axis=1), axis=0)
    base = out_ptr + block_ids * TYPE_SIZE
    if KIND == 0:   # Q8_0: d = absmax / 127, q = roundf(x / d)
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full([ROWS], 127.0, tl.float32))
        inverse = tl.where(scale == 0, 0.0, _recip(scale))
        v = x * inverse[:, None]
        magnitude = tl.abs(v)
        whole = magnitude.to(tl.int32).to(tl.float32)
        rounded = whole + (magnitude - whole >= 0.5).to(tl.float32)
        q = tl.where(v < 0, -rounded, rounded).to(tl.int32).to(tl.int8).to(tl.uint8, bitcast=True)
        flag = flag | _store_fp16(base, scale, valid)
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
            flag = flag | _store_fp16(base + 2, low, valid)
        top = 15 if KIND <= 2 else 31
        q = _clamp(v.to(tl.int32), 0, top)    # .to(int32) truncates toward zero
        flag = flag | _store_fp16(base, scale, valid)
        if KIND >= 3:   # fifth bits: element i -> bit i % 8 of byte i // 8
            high_bits = tl.sum((q >> 4).to(tl.int64) << cols[None, :].to(tl.int64), axis=1)
            for k in tl.static_range(4):
                tl.store(base + header + k, ((high_bits >> (8 * k)) & 255).to(tl.uint8), mask=valid)
            header += 4
        first, second = _halves(q, ROWS)
        packed = ((first & 15) | ((second & 15) << 4)).to(tl.uint8)
        tl.store(base[:, None] + header + tl.arange(0, 16)[None, :], packed, mask=valid[:, None])
    tl.store(flags_ptr + pid, flag)


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K

@triton.jit
def _load_row(x_ptr, rows, valid, N: tl.constexpr, BF16_WORDS: tl.constexpr):
    """Row ``rows`` of N elements (one row per thread) as a tuple of N float32 [G] tensors. With
    BF16_WORDS (bf16 input, 8-byte aligned) the row is read as 64-bit words, 4 elements each: a
    quarter of the load instructions (each thread's row is its own line). Q4_K/Q5_K 5% faster on an
    H100 (694 against 658 GB/s of GPU time, same process); Q6_K about the same."""
    x = ()
    if BF16_WORDS:
        words = (x_ptr + rows * N).to(tl.pointer_type(tl.int64))
        for j in tl.static_range(N // 4):
            word = tl.load(words + j, mask=valid, other=0)
            for half in tl.static_range(2):
                bits = (word >> (32 * half)).to(tl.int32)
                # bf16 is the top half of a float32: low element shifted up, high element masked
                x = x + ((bits << 16).to(tl.float32, bitcast=True), (bits & -65536).to(tl.float32, bitcast=True))
    else:
        for i in tl.static_range(N):
            x = x + (tl.load(x_ptr + rows * N + i, mask=valid, other=0.0).to(tl.float32),)
    return x


@triton.jit
def _code_error(scale, offset, sum_l, sum_l2, sum_xl, sum_x):
    # ggml_kquants._code_error: Σ (scale*l - offset - x)^2 less Σx², left to right.
    return (scale * scale * sum_l2 - 2 * scale * offset * sum_l - 2 * scale * sum_xl
            + 32 * offset * offset + 2 * offset * sum_x)


@triton.jit
def _tuple_sum(t, N: tl.constexpr):
    """pairwise_sum of a tuple of N tensors (N a power of two): neighbours first, level by level."""
    if N == 1:
        return t[0]
    else:
        half = ()
        for i in tl.static_range(N // 2):
            half = half + (t[2 * i] + t[2 * i + 1],)
        return _tuple_sum(half, N // 2)


@triton.jit
def _level_sums(levels, x):
    """ggml_kquants._level_sums: Σl, Σl², Σx·l of a sub-block's levels (tuples of 32). Σl² as a
    chain of fused multiply-adds: every partial sum is an integer below 2**24, exact in any order
    and with or without the product's rounding, so it equals the pairwise sum at half the cost."""
    xl = ()
    sum_l2 = levels[0] * levels[0]
    for i in tl.static_range(32):
        xl = xl + (x[i] * levels[i],)
        if i > 0:
            sum_l2 = tl.fma(levels[i], levels[i], sum_l2)
    return _tuple_sum(levels, 32), sum_l2, _tuple_sum(xl, 32)


@triton.jit
def _fit_codes(d, dmin, ls, lm, sum_l, sum_l2, sum_xl, sum_x):
    """ggml_kquants._fit_codes: the codes or a neighbour pair (the given pair first, then ls by
    0, -1, +1 and within each lm by 0, -1, +1), the first strictly best fit."""
    best_ls = ls
    best_lm = lm
    best_error = _code_error(d * ls, dmin * lm, sum_l, sum_l2, sum_xl, sum_x)
    for a in tl.static_range(3):
        for b in tl.static_range(3):
            if a * 3 + b > 0:
                trial_ls = _clamp(ls + (a == 2) * 1.0 - (a == 1) * 1.0, 0.0, 63.0)
                trial_lm = _clamp(lm + (b == 2) * 1.0 - (b == 1) * 1.0, 0.0, 63.0)
                error = _code_error(d * trial_ls, dmin * trial_lm, sum_l, sum_l2, sum_xl, sum_x)
                better = error < best_error
                best_error = tl.where(better, error, best_error)
                best_ls = tl.where(better, trial_ls, best_ls)
                best_lm = tl.where(better, trial_lm, best_lm)
    return best_ls, best_lm


@triton.jit
def _levels_for(x, scale, offset, NMAX: tl.constexpr):
    """ggml_kquants._levels_for: rint((x + offset) * (1 / scale)) in [0, nmax]; zero scale: zeros."""
    positive = scale > 0
    inverse = tl.where(positive, _recip(tl.where(positive, scale, 1.0)), 0.0)
    levels = ()
    for i in tl.static_range(32):
        # max/min differ from the CPU's clamp only for NaN, whose bytes are undefined on the CPU too
        levels = levels + (tl.minimum(tl.maximum(_rint((x[i] + offset) * inverse), 0.0), NMAX * 1.0),)
    return levels


@triton.jit(do_not_specialize=["n_super"])
def _kquant_asym_kernel(x_ptr, out_ptr, flags_ptr, candidates_ptr, n_super, SB: tl.constexpr, NMAX: tl.constexpr,
                        CANDIDATES: tl.constexpr, ROUNDS: tl.constexpr, Q5: tl.constexpr,
                        BF16_WORDS: tl.constexpr):
    """ggml_kquants._quantize_k32. One thread per sub-block of 32: its elements are a tuple of 32
    [G] tensors, so every sum of pairwise_sum's order is plain register additions (no shuffles,
    no layout conversions)."""
    G: tl.constexpr = SB * 8
    TYPE_SIZE: tl.constexpr = 176 if Q5 else 144
    pid = tl.program_id(0).to(tl.int64)
    groups = pid * G + tl.arange(0, G)
    valid = groups < n_super * 8
    x = _load_row(x_ptr, groups, valid, 32, BF16_WORDS)
    flag = _row_nonfinite(x, 32)

    # _search_k32
    low = x[0]
    high = x[0]
    for i in tl.static_range(1, 32):
        low = tl.minimum(low, x[i])
        high = tl.maximum(high, x[i])
    low = tl.where(low > 0, 0.0, low)
    span = high - low
    flat = span == 0
    span = tl.where(flat, 1.0, span)
    shifted = ()
    for i in tl.static_range(32):
        shifted = shifted + (x[i] - low,)
    sum_x = _tuple_sum(x, 32)
    reciprocal = _recip(span)
    best_scale = span
    best_offset = low
    best_error = span
    best_l = span
    best_l2 = span
    best_xl = span
    # A runtime loop: the candidates share nothing but the running best, and unrolled they make a
    # long kernel to compile. Candidate 0 always replaces the initial values above. shifted >= 0,
    # so the rounded levels need only the upper clamp.
    for k in range(0, CANDIDATES):
        inverse = reciprocal * tl.load(candidates_ptr + k)
        levels = ()
        for i in tl.static_range(32):
            levels = levels + (tl.minimum(_rint(inverse * shifted[i]), NMAX * 1.0),)
        sum_l, sum_l2, sum_xl = _level_sums(levels, x)
        det = sum_l2 * 32.0 - sum_l * sum_l
        offset = tl.math.div_rn(sum_l2 * sum_x - sum_l * sum_xl, det)
        through_zero = (offset > 0) | (det <= 0) | (det != det)
        # one division for either scale (a division costs ten instructions here)
        scale = tl.math.div_rn(tl.where(through_zero, sum_xl, sum_xl * 32.0 - sum_x * sum_l),
                               tl.where(through_zero, sum_l2, det))
        offset = tl.where(through_zero, 0.0, offset)
        error = -(scale * sum_xl + offset * sum_x)
        better = (k == 0) | (error < best_error)
        best_error = tl.where(better, error, best_error)
        best_scale = tl.where(better, scale, best_scale)
        best_offset = tl.where(better, offset, best_offset)
        best_l = tl.where(better, sum_l, best_l)
        best_l2 = tl.where(better, sum_l2, best_l2)
        best_xl = tl.where(better, sum_xl, best_xl)
    scales = tl.reshape(tl.where(flat, 0.0, best_scale), [SB, 8])
    # Negation as a product: Triton's unary minus is 0 - v, which turns -(+0.0) into +0.0.
    mins = tl.reshape(tl.where(flat, low * -1.0, best_offset * -1.0), [SB, 8])

    # 6-bit sub-block scales against the super-block's largest: llama.cpp's running max from +0
    # with `>`: +0 for all-zero blocks (mins of -0.0), NaN never wins.
    max_scale = tl.max(tl.where(scales > 0, scales, 0.0), axis=1)
    max_min = tl.max(tl.where(mins > 0, mins, 0.0), axis=1)
    inv_scale = tl.where(max_scale > 0, _recip(tl.where(max_scale > 0, max_scale, 1.0)) * 63, 0.0)
    inv_min = tl.where(max_min > 0, _recip(tl.where(max_min > 0, max_min, 1.0)) * 63, 0.0)
    ls = tl.reshape(_clamp(_rint(inv_scale[:, None] * scales), 0.0, 63.0), [G])
    lm = tl.reshape(_clamp(_rint(inv_min[:, None] * mins), 0.0, 63.0), [G])
    d_store = tl.math.div_rn(max_scale, tl.full([SB], 63.0, tl.float32))
    dmin_store = tl.math.div_rn(max_min, tl.full([SB], 63.0, tl.float32))
    d = tl.reshape(tl.broadcast_to(_fp16_round(d_store)[:, None], [SB, 8]), [G])
    dmin = tl.reshape(tl.broadcast_to(_fp16_round(dmin_store)[:, None], [SB, 8]), [G])

    # rounds of the code fit, then the levels for the chosen codes
    sum_l, sum_l2, sum_xl = best_l, best_l2, best_xl
    for _ in tl.static_range(ROUNDS):
        ls, lm = _fit_codes(d, dmin, ls, lm, sum_l, sum_l2, sum_xl, sum_x)
        best_levels = _levels_for(x, d * ls, dmin * lm, NMAX)
        sum_l, sum_l2, sum_xl = _level_sums(best_levels, x)
    best_ls = ls

    # bytes: d, dmin, 12 bytes of scales, (qh,) qs
    sb_ids = pid * SB + tl.arange(0, SB)
    sb_valid = sb_ids < n_super
    base = out_ptr + sb_ids * TYPE_SIZE
    flag = flag | _store_fp16(base, d_store, sb_valid) | _store_fp16(base + 2, dmin_store, sb_valid)
    tl.store(flags_ptr + pid, flag)
    ls_i = tl.reshape(best_ls, [SB, 8]).to(tl.int32)
    lm_i = tl.reshape(lm, [SB, 8]).to(tl.int32)
    ls_lo, ls_hi = tl.split(tl.permute(tl.reshape(ls_i, [SB, 2, 4]), (0, 2, 1)))
    lm_lo, lm_hi = tl.split(tl.permute(tl.reshape(lm_i, [SB, 2, 4]), (0, 2, 1)))
    k4 = tl.arange(0, 4)[None, :]
    scale_ptr = base[:, None] + 4 + k4
    tl.store(scale_ptr, (ls_lo | ((ls_hi >> 4) << 6)).to(tl.uint8), mask=sb_valid[:, None])
    tl.store(scale_ptr + 4, (lm_lo | ((lm_hi >> 4) << 6)).to(tl.uint8), mask=sb_valid[:, None])
    tl.store(scale_ptr + 8, ((ls_hi & 15) | ((lm_hi & 15) << 4)).to(tl.uint8), mask=sb_valid[:, None])
    # Each thread packs its 32 levels as four little-endian 64-bit words of bytes (low nibbles,
    # and for Q5 the fifth bits at bit ``sub-block index`` of each byte); the words of a pair of
    # sub-blocks (qs) or of all 8 (qh) are then combined, their bits being disjoint.
    qs_offset: tl.constexpr = 48 if Q5 else 16
    sub_block = (groups % 8).to(tl.int64)
    group_base = out_ptr + (groups // 8) * TYPE_SIZE
    pair_valid, _ = tl.split(tl.reshape(valid.to(tl.int32), [G // 2, 2]))
    for c in tl.static_range(4):
        nibbles = _byte_word(best_levels, 8 * c, 15, 0)
        if Q5:
            fifth = _byte_word(best_levels, 8 * c, 1, 4)
            qh = tl.sum(tl.reshape(fifth << sub_block, [SB, 8]), axis=1)
            qh_ptr = (out_ptr + sb_ids * TYPE_SIZE + 16 + 8 * c).to(tl.pointer_type(tl.int64))
            tl.store(qh_ptr, qh, mask=sb_valid)
        # sub-block 2k gives the low nibbles of qs[32k:32k+32], sub-block 2k+1 the high ones
        even, odd = tl.split(tl.reshape(nibbles, [G // 2, 2]))
        pair_ptr = tl.reshape(group_base + qs_offset + (sub_block // 2) * 32 + 8 * c, [G // 2, 2])
        first_ptr, _ = tl.split(pair_ptr)
        tl.store(first_ptr.to(tl.pointer_type(tl.int64)), even | (odd << 4), mask=pair_valid != 0)


@triton.jit
def _q6k_fit(inverse, x, weights, weighted_x):
    """make_qx_quants' fit for one candidate: Σ w·x·l and Σ w·l² with l = clamp(rint(inverse·x), -32, 31)."""
    lx = ()
    l2 = ()
    for i in tl.static_range(16):
        level = tl.minimum(tl.maximum(_rint(inverse * x[i]), -32.0), 31.0)
        lx = lx + (weighted_x[i] * level,)
        l2 = l2 + ((weights[i] * level) * level,)
    return _tuple_sum(lx, 16), _tuple_sum(l2, 16)


@triton.jit(do_not_specialize=["n_super"])
def _q6k_kernel(x_ptr, out_ptr, flags_ptr, steps_ptr, n_super, SB: tl.constexpr, BF16_WORDS: tl.constexpr):
    """Q6_K (ggml_kquants.Q6_K): one thread per group of 16 elements, as a tuple of 16 [G] tensors."""
    G: tl.constexpr = SB * 16
    pid = tl.program_id(0).to(tl.int64)
    groups = pid * G + tl.arange(0, G)
    valid = groups < n_super * 16
    x = _load_row(x_ptr, groups, valid, 16, BF16_WORDS)
    flag = _row_nonfinite(x, 16)

    # _search_scale_symmetric(nmax=32, nstep=4, rdelta=0.2): the signed absmax (first of equals)
    peak = x[0]
    magnitude = tl.abs(x[0])
    weights = ()
    weighted_x = ()
    for i in tl.static_range(16):
        if i > 0:
            larger = tl.abs(x[i]) > magnitude
            peak = tl.where(larger, x[i], peak)
            magnitude = tl.where(larger, tl.abs(x[i]), magnitude)
        weights = weights + (x[i] * x[i],)
        weighted_x = weighted_x + (weights[i] * x[i],)
    zero_group = tl.abs(peak) < 1e-15
    reciprocal_peak = _recip(tl.where(zero_group, 1.0, peak))
    best_scale = reciprocal_peak
    best = reciprocal_peak
    # Candidate 0 (-nmax / peak) sets the best unconditionally; the others must be strictly better:
    # the best least-squares scale maximizes sum_lx^2 / sum_l2.
    for step in range(0, 9):
        sum_lx, sum_l2 = _q6k_fit(reciprocal_peak * tl.load(steps_ptr + step), x, weights, weighted_x)
        scale = tl.math.div_rn(sum_lx, sum_l2)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        first_scale = tl.where(sum_l2 > 0, scale, 0.0)
        first = step == 0
        best_scale = tl.where(first, first_scale, tl.where(better, scale, best_scale))
        best = tl.where(first, first_scale * sum_lx, tl.where(better, scale * sum_lx, best))
    scales = tl.reshape(tl.where(zero_group, 0.0, best_scale), [SB, 16])

    # 8-bit group scales against the super-block's signed absmax
    index = tl.argmax(tl.abs(scales), axis=1, tie_break_left=True)
    columns = tl.arange(0, 16)[None, :]
    sb_peak = tl.max(tl.where(columns == index[:, None], scales, float("-inf")), axis=1)
    nonzero = tl.abs(sb_peak) >= 1e-15
    inverse = tl.where(nonzero, _recip(tl.where(nonzero, sb_peak, 1.0)) * -128.0, 0.0)
    codes = _clamp(_rint(inverse[:, None] * scales), -128.0, 127.0)
    d_store = tl.where(nonzero, _recip(tl.where(nonzero, inverse, 1.0)), 0.0)
    d = tl.reshape(tl.broadcast_to(_fp16_round(d_store)[:, None], [SB, 16]), [G])

    # _refine_symmetric: the code as rounded, one below, one above; lowest error wins
    codes = tl.reshape(codes, [G])
    best_codes = codes
    best_levels = x
    best_err = d
    for trial in range(3):
        # trial 0 keeps the code (and always replaces the initial values), 1 tries one below, 2 one above
        trial_codes = _clamp(codes + tl.where(trial == 0, 0.0, tl.where(trial == 1, -1.0, 1.0)), -128.0, 127.0)
        scale = d * trial_codes
        safe = tl.where(scale == 0, 1.0, scale)
        levels = ()
        squares = ()
        for i in tl.static_range(16):
            level = tl.minimum(tl.maximum(_rint(tl.math.div_rn(x[i], safe)), -32.0), 31.0)
            level = tl.where(scale == 0, 0.0, level)
            diff = scale * level - x[i]
            levels = levels + (level,)
            squares = squares + (diff * diff,)
        err = _tuple_sum(squares, 16)
        better = (trial == 0) | (err < best_err)
        best_err = tl.where(better, err, best_err)
        best_codes = tl.where(better, trial_codes, best_codes)
        chosen = ()
        for i in tl.static_range(16):
            chosen = chosen + (tl.where(better, levels[i], best_levels[i]),)
        best_levels = chosen

    # bytes: ql[128], qh[64], scales[16] (int8), d. Group j = 8h + 2q + half holds elements
    # 128h + 32q + 16half + i: its low nibbles go to ql[64h + 32(q % 2) + 16half + i] (high nibble
    # for q >= 2), its top two bits to qh[32h + 16half + i] at bit 2q. Each thread packs two
    # 64-bit words of bytes per part; the words sharing bytes are combined (disjoint bits). 210-byte
    # blocks are only 2-byte aligned: the words are stored as four 16-bit halves.
    sb_ids = pid * SB + tl.arange(0, SB)
    sb_valid = sb_ids < n_super
    tl.store(out_ptr + groups // 16 * 210 + 192 + groups % 16, best_codes.to(tl.int32).to(tl.int8).to(tl.uint8, bitcast=True),
             mask=valid)
    tl.store(flags_ptr + pid, flag | _store_fp16(out_ptr + sb_ids * 210 + 208, d_store, sb_valid))
    q = ((groups % 8) // 2).to(tl.int64)
    sb4 = (pid * SB + tl.arange(0, SB)).to(tl.int64)[:, None, None, None]
    part4 = tl.arange(0, 2)[None, :, None, None]
    mid4 = tl.arange(0, 2)[None, None, :, None]
    half4 = tl.arange(0, 2)[None, None, None, :]
    ql_offsets = sb4 * 210 + part4 * 64 + mid4 * 32 + half4 * 16
    valid4 = sb4 < n_super
    sb3 = (pid * SB + tl.arange(0, SB)).to(tl.int64)[:, None, None]
    qh_offsets = sb3 * 210 + 128 + tl.arange(0, 2)[None, :, None] * 32 + tl.arange(0, 2)[None, None, :] * 16
    valid3 = sb3 < n_super
    for c in tl.static_range(2):
        nibbles = tl.zeros([G], tl.int64)
        tops = tl.zeros([G], tl.int64)
        for k in tl.static_range(8):
            level = _level_bits(best_levels[8 * c + k] + 32.0).to(tl.int64)
            nibbles = nibbles | ((level & 15) << (8 * k))
            tops = tops | ((level >> 4) << (8 * k))
        # ql: [SB, h, q // 2, q % 2, half], summed over q // 2 (nibble position)
        ql = tl.sum(tl.reshape(nibbles << (4 * (q // 2)), [SB, 2, 2, 2, 2]), axis=2)
        # qh: [SB, h, q, half], summed over q
        qh = tl.sum(tl.reshape(tops << (2 * q), [SB, 2, 4, 2]), axis=2)
        for k in tl.static_range(4):
            tl.store((out_ptr + ql_offsets + 8 * c + 2 * k).to(tl.pointer_type(tl.int16)),
                     ((ql >> (16 * k)) & 65535).to(tl.int16), mask=valid4)
            tl.store((out_ptr + qh_offsets + 8 * c + 2 * k).to(tl.pointer_type(tl.int16)),
                     ((qh >> (16 * k)) & 65535).to(tl.int16), mask=valid3)


# ---------------------------------------------------------------------------------------------
# launchers

_CANDIDATE_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _candidates(name: str, device: torch.device) -> torch.Tensor:
    """The search constants a K-quant kernel reads, as a float32 tensor on ``device``: Q4_K/Q5_K's
    candidates (ggml_kquants.SEARCH_CANDIDATES); for Q6_K the inverse-scale factors -nmax, then
    -candidate (the kernel multiplies them by 1 / peak)."""
    key = (name, device)
    if key not in _CANDIDATE_TABLES:
        values = kq.SEARCH_CANDIDATES[name]
        if name == "Q6_K":
            values = (-32.0, *(-value for value in values))
        _CANDIDATE_TABLES[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _CANDIDATE_TABLES[key]


def _bf16_words(flat: torch.Tensor) -> bool:
    """Whether a kernel may read ``flat`` as 64-bit words of 4 bf16 elements (see _load_row)."""
    return flat.dtype == torch.bfloat16 and flat.data_ptr() % 8 == 0


def _check(name: str, weight: torch.Tensor, block_size: int) -> None:
    shape = tuple(weight.shape)
    if not (len(shape) >= 1 and shape[-1] % block_size == 0):
        raise BadArgument(f"{name} needs rows that are a multiple of {block_size} "
                          f"elements; got a tensor of shape {list(shape)}")
    if not weight.is_floating_point():
        raise BadArgument(f"{name} quantizes floating-point tensors; got {weight.dtype}")


def quantize_ggml(weight: torch.Tensor, name: str):
    k_quant = name in kq.K32_CANDIDATES or name == "Q6_K"
    block_size = QK_K if k_quant else 32
    _check(name, weight, block_size)
    shape = tuple(weight.shape)
    flat = weight if weight.is_contiguous() else weight.contiguous()   # the kernels index it flat
    n_blocks = flat.numel() // block_size
    type_size = _TYPE_SIZE[name]
    out = torch.empty(n_blocks * type_size, dtype=torch.uint8, device=weight.device)
    if n_blocks:
        if name == "Q6_K":
            grid = (-(-n_blocks // _SUPER_BLOCKS_Q6),)
            flags = torch.empty(grid, dtype=torch.int32, device=weight.device)   # one word per program
            launch(_q6k_kernel, grid, flat, out, flags, _candidates("Q6_K", weight.device), n_blocks,
                   SB=_SUPER_BLOCKS_Q6, BF16_WORDS=_bf16_words(flat), num_warps=_NUM_WARPS_Q6, enable_fp_fusion=False)
        elif k_quant:
            grid = (-(-n_blocks // _SUPER_BLOCKS),)
            flags = torch.empty(grid, dtype=torch.int32, device=weight.device)
            launch(_kquant_asym_kernel, grid, flat, out, flags, _candidates(name, weight.device), n_blocks,
                   SB=_SUPER_BLOCKS, NMAX=kq.K32_NMAX[name], CANDIDATES=len(kq.K32_CANDIDATES[name]),
                   ROUNDS=kq.K32_CODE_ROUNDS, Q5=name == "Q5_K", BF16_WORDS=_bf16_words(flat),
                   num_warps=_NUM_WARPS_K, maxnreg=_MAX_REGISTERS_K, enable_fp_fusion=False)
        else:
            grid = (-(-n_blocks // _ROWS_32),)
            flags = torch.empty(grid, dtype=torch.int32, device=weight.device)
            launch(_quantize_32_kernel, grid, flat, out, flags, n_blocks, KIND=_KIND[name], TYPE_SIZE=type_size,
                   ROWS=_ROWS_32, num_warps=_NUM_WARPS_32, enable_fp_fusion=False)
        # Bit 0 (inf, NaN or huge input) raises NonFiniteWeight in read_flags; bit 1 (an fp16 scale
        # overflowed) the same here: GGMLType.quantize tells the two apart.
        if read_flags(flags) & 2:
            from qtool.schemes.errors import NonFiniteWeight

            raise NonFiniteWeight("a block scale overflowed float16")
    from qtool.schemes.ggml import GGMLTensor   # after the launch: the schemes import this module

    row_bytes = shape[-1] // block_size * type_size
    return GGMLTensor(name, shape, out.reshape(-1, row_bytes))


def _scheme_quantize(name: str):
    def quantize(weight: torch.Tensor, **params: Any):
        return quantize_ggml(weight, name)

    quantize.__name__ = f"quantize_{name}"
    return quantize


FUSED = {name: _scheme_quantize(name) for name in _TYPE_SIZE}
