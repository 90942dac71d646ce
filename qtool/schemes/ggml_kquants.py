"""K-quants (super-blocks of 256 with quantized sub-block scales), as pure torch numerics.

Layouts are llama.cpp's (block_q2_K ... block_q6_K in ggml-common.h) and round-trip through
``gguf.quants.dequantize``. The quantizers follow the structure of llama.cpp's reference
quantizers (quantize_row_qX_K_ref in ggml-quants.c): a per-sub-block scale (and min) search,
then the sub-block scales quantized against the super-block's largest, then every element
rounded again with the scales as they will be decoded. The searches differ so that they run
over all sub-blocks at once, and so that a GPU runs them at memory speed:

- candidate scales are evaluated in closed form (the squared error of a least-squares fit
  follows from the sums Σw·l, Σw·l², Σw·l·x), so one pass per candidate suffices;
- Q4_K / Q5_K search 4 candidates without weights, then fit the quantized codes to the levels
  (``_quantize_k32``); llama.cpp searches 21 with weights rms + |x|;
- Q3_K uses the candidate search of make_qx_quants instead of make_q3_quants' element-by-element
  coordinate descent, which is sequential by nature.

After the sub-block scales are quantized they are refined (Q4_K/Q5_K: the code fit; the others:
each scale code also tried one step up and down, the lower error kept), where llama.cpp only takes
the nearest code. This more than pays for the shorter searches: tests check the error against
llama.cpp's own quantizer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qtool.errors import BadArgument
from qtool.schemes.base import register
from qtool.schemes.ggml import (QK_K, GGMLTensor, GGMLType, divide, fp16_bytes, fp16_from_bytes, nearest_int,
                                pack_nibbles)
from qtool.schemes.grids import Grid, KQuantGrid
from qtool.schemes.ggml_kweighted import k32_fields, q2_k_fields, q3_k_fields, q6_k_fields

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qtool.schemes.grids import QuantResult

GROUP_MAX_EPS = 1e-15


def _f32(value: float) -> float:
    """A constant rounded to float32, as the C code computes it."""
    return float(np.float32(value))


def pairwise_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) in a fixed order, keepdim: neighbours first, level by
    level, ((v0 + v1) + (v2 + v3)) + ... A float32 sum's bytes depend on its order, and torch's
    own ``sum`` takes a different one on each CPU vector width, under torch.compile, and on CUDA;
    this one is what the Triton K-quant kernel (qtool/kernels/ggml.py) computes too."""
    while values.shape[-1] > 1:
        values = values[..., 0::2] + values[..., 1::2]
    return values


# ---------------------------------------------------------------------------------------------
# Sub-block scale searches. Inputs are (n_groups, group_size) float32; outputs (n_groups, 1).

def _closed_form_error(scale, offset, sum_w, sum_x, sum_x2, sum_l, sum_l2, sum_xl):
    """Σ w (scale*l + offset - x)^2, expanded in the per-group sums."""
    return (scale * scale * sum_l2 + 2 * scale * offset * sum_l - 2 * scale * sum_xl
            + offset * offset * sum_w - 2 * offset * sum_x + sum_x2)


def _group_range(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per group (row of x): the min clamped to <= 0, the span max - min (1 where 0), whether it was
    0 (a flat group), and x - min."""
    low = x.amin(dim=-1, keepdim=True).clamp(max=0)
    span = x.amax(dim=-1, keepdim=True) - low
    flat = span == 0
    return low, torch.where(flat, torch.ones_like(span), span), flat, x - low


def _search_scale_min(x: torch.Tensor, weights: torch.Tensor, nmax: int,
                      candidates: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qkx2_quants: x ≈ scale * l + min with l in [0, nmax] and min <= 0, weighted least squares
    over the plain grid nmax / (max - min), then the inverse scales candidate / (max - min) (see
    SEARCH_CANDIDATES), every group at once. Returns (scale, -min), each (n_groups, 1).

    The candidates are a short Python loop over whole tensors (a (groups, candidates, n) tensor
    would be the same arithmetic with a larger temporary)."""
    low, span, flat, shifted = _group_range(x)
    sum_w = pairwise_sum(weights)
    weighted_x = weights * x
    sum_x = pairwise_sum(weighted_x)
    sum_x2 = pairwise_sum(weighted_x * x)
    group_sums = (sum_w, sum_x, sum_x2)

    def fit(levels):
        sum_l = pairwise_sum(weights * levels)
        sum_l2 = pairwise_sum(weights * levels * levels)
        sum_xl = pairwise_sum(weighted_x * levels)
        return sum_l, sum_l2, sum_xl

    # The plain min/max grid first; a least-squares fit replaces it only when strictly better.
    inverse = nmax / span
    best_scale = 1 / inverse
    best_min = low
    best_error = _closed_form_error(best_scale, best_min, *group_sums,
                                    *fit(nearest_int(inverse * shifted).clamp_(0, nmax)))
    for candidate in candidates:
        inverse = candidate / span
        sum_l, sum_l2, sum_xl = fit(nearest_int(inverse * shifted).clamp_(0, nmax))
        det = sum_w * sum_l2 - sum_l * sum_l
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = offset > 0
        scale = torch.where(positive, sum_xl / sum_l2, scale)
        offset = torch.where(positive, torch.zeros_like(offset), offset)
        error = _closed_form_error(scale, offset, *group_sums, sum_l, sum_l2, sum_xl)
        better = (det > 0) & (error < best_error)
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, offset, best_min)
    zero = torch.zeros_like(best_scale)
    return torch.where(flat, zero, best_scale), torch.where(flat, -low, -best_min)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))


def _search_scale_symmetric(x: torch.Tensor, nmax: int, candidates: tuple[float, ...]) -> torch.Tensor:
    """make_qx_quants with rmse_type 1: x ≈ scale * l, l in [-nmax, nmax-1], weights x², over the
    inverse scales -nmax / max, then -candidate / max (see SEARCH_CANDIDATES)."""
    peak = _signed_absmax(x)
    zero_group = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero_group, torch.ones_like(peak), peak)
    weights = x * x
    weighted_x = weights * x

    def fit(inverse):
        levels = nearest_int(inverse * x).clamp_(-nmax, nmax - 1)
        sum_lx = pairwise_sum(weighted_x * levels)
        sum_l2 = pairwise_sum(weights * levels * levels)
        return sum_lx, sum_l2

    sum_lx, sum_l2 = fit(-nmax / peak)
    best_scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    best = best_scale * sum_lx
    # The best least-squares scale maximizes sum_lx^2 / sum_l2; a candidate must be strictly better.
    for candidate in candidates:
        sum_lx, sum_l2 = fit(-candidate / peak)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        scale = sum_lx / sum_l2
        best_scale = torch.where(better, scale, best_scale)
        best = torch.where(better, scale * sum_lx, best)
    return torch.where(zero_group, torch.zeros_like(best_scale), best_scale)


# ---------------------------------------------------------------------------------------------
# Quantized sub-block scales, with the one-step-up/down refinement.

def _refine_asymmetric(x: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor,
                       nmax: int, smax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Given decoded super-block scales d, dmin (n, 1, 1) and quantized sub-block scale/min codes
    ls, lm (n, s, 1), try ls±1 and keep per sub-block the code with the lowest squared error.
    x is (n, s, group). Returns (ls, levels)."""
    best_error = None
    best_ls = ls
    best_levels = None
    for delta in (0, -1, 1):
        codes = (ls + delta).clamp(0, smax)
        scale = d * codes
        offset = dmin * lm
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        levels = nearest_int((x + offset) / safe).clamp_(0, nmax)
        levels = torch.where(scale == 0, torch.zeros_like(levels), levels)
        err = pairwise_sum((scale * levels - offset - x).square())
        if best_error is None:
            best_error, best_levels = err, levels
            continue
        better = err < best_error
        best_error = torch.where(better, err, best_error)
        best_ls = torch.where(better, codes, best_ls)
        best_levels = torch.where(better, levels, best_levels)
    return best_ls, best_levels


def _refine_symmetric(x: torch.Tensor, d: torch.Tensor, codes: torch.Tensor, nmax: int, cmin: int, cmax: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Like _refine_asymmetric for symmetric types: levels in [-nmax, nmax-1], codes in [cmin, cmax]."""
    best_error = None
    best_codes = codes
    best_levels = None
    for delta in (0, -1, 1):
        trial = (codes + delta).clamp(cmin, cmax)
        scale = d * trial
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        levels = nearest_int(x / safe).clamp_(-nmax, nmax - 1)
        levels = torch.where(scale == 0, torch.zeros_like(levels), levels)
        err = pairwise_sum((scale * levels - x).square())
        if best_error is None:
            best_error, best_levels = err, levels
            continue
        better = err < best_error
        best_error = torch.where(better, err, best_error)
        best_codes = torch.where(better, trial, best_codes)
        best_levels = torch.where(better, levels, best_levels)
    return best_codes, best_levels


def _pack_crumbs(levels: torch.Tensor) -> torch.Tensor:
    """(n, 256) 2-bit values -> (n, 64): byte 32*h + l holds levels 128h + l + 32k at bits 2k."""
    parts = levels.reshape(-1, 2, 4, 32).to(torch.uint8)
    return (parts[:, :, 0] | (parts[:, :, 1] << 2) | (parts[:, :, 2] << 4) | (parts[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_crumbs(raw: torch.Tensor) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=raw.device).reshape(1, 1, 4, 1)
    return ((raw.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> 12 bytes (get_scale_min_k4's layout)."""
    ls = ls.to(torch.uint8)
    lm = lm.to(torch.uint8)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([first, second, third], dim=-1)


def _unpack_scale_min_k4(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    first, second, third = raw[:, 0:4], raw[:, 4:8], raw[:, 8:12]
    ls = torch.cat([first & 0x3F, (third & 0x0F) | ((first >> 6) << 4)], dim=-1)
    lm = torch.cat([second & 0x3F, (third >> 4) | ((second >> 6) << 4)], dim=-1)
    return ls.to(torch.float32), lm.to(torch.float32)


def pack_k_blocks(d_raw: torch.Tensor, dmin_raw: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor,
                  levels: torch.Tensor, five_bit: bool) -> torch.Tensor:
    """Q4_K / Q5_K block bytes from the fp16 bytes of d and dmin (n, 2), the 6-bit sub-block scale
    and min codes (n, 8) and the levels (n, 256): [d][dmin][scales 12][qh 32, Q5_K only][qs 128]."""
    levels = levels.to(torch.uint8)
    parts = [d_raw, dmin_raw, _pack_scale_min_k4(ls, lm)]
    if five_bit:
        # qh[j] bit k is the fifth bit of element 32k + j.
        high = (levels >> 4).reshape(-1, 8, 32)
        weights = (1 << torch.arange(8, dtype=torch.uint8, device=levels.device)).reshape(1, 8, 1)
        parts.append((high * weights).sum(dim=1, dtype=torch.uint8))
    halves = levels.reshape(-1, 4, 2, 32)
    parts.append(pack_nibbles(halves[:, :, 0], halves[:, :, 1]).reshape(-1, 128))
    return torch.cat(parts, dim=-1)


class _KQuant(GGMLType):
    block_size = QK_K
    sub_block_size = 32
    triton_module = "ggml"
    # The float32 constants of the sub-block scale search, which the C and Triton kernels take too.
    search_candidates: tuple[float, ...] = ()
    # With an importance matrix: llama.cpp's own weighted quantizer (ggml_kweighted.py), byte for byte.
    takes_importance = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.c_kernel = f"quantize_{cls.name.lower()}"
            cls.search_candidates = SEARCH_CANDIDATES[cls.name]


class _K32Quant(_KQuant):
    """Q4_K / Q5_K: sub-blocks of 32 with 6-bit scales and mins, which GPTQ and the importance
    search fit (KQuantGrid) and pack_k_blocks lays out."""

    def calibration_grid(self, **_: Any) -> Grid:
        return KQuantGrid(self.name, K32_NMAX[self.name])

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> GGMLTensor:
        rows, cols = result.levels.shape
        if cols % QK_K:
            raise BadArgument(f"{self.name} needs rows that are a multiple of {QK_K} elements; got {cols}")

        def blocks(tensor: torch.Tensor, block: int) -> torch.Tensor:
            return tensor.reshape(-1, block)

        data = pack_k_blocks(fp16_bytes(result.extra["d"].reshape(-1, 1).to(torch.float32)),
                             fp16_bytes(result.extra["dmin"].reshape(-1, 1).to(torch.float32)),
                             blocks(result.extra["sub_scale"], 8), blocks(result.extra["sub_min"], 8),
                             blocks(result.levels, QK_K), five_bit=self.name == "Q5_K").reshape(rows, -1)
        return GGMLTensor(self.name, (rows, cols), data)


def _super_block_codes(scales: torch.Tensor, mins: torch.Tensor, smax: int) -> tuple[torch.Tensor, ...]:
    """Sub-block scales and mins (n, s) as codes in [0, smax] against the super-block's largest:
    (scale codes, min codes, fp16 bytes of d, fp16 bytes of dmin (n, 2))."""
    # llama.cpp keeps a running max from +0 with `>`: all-zero blocks (whose mins are -0.0) give +0,
    # never the -0.0 that amax may return (fp16 bytes 0x8000), and NaN never wins.
    max_scale = torch.where(scales > 0, scales, 0.0).amax(dim=-1, keepdim=True)
    max_min = torch.where(mins > 0, mins, 0.0).amax(dim=-1, keepdim=True)
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, smax / torch.where(max_scale > 0, max_scale, 1), zero)
    inv_min = torch.where(max_min > 0, smax / torch.where(max_min > 0, max_min, 1), zero)
    ls = nearest_int(inv_scale * scales).clamp_(0, smax)
    lm = nearest_int(inv_min * mins).clamp_(0, smax)
    return ls, lm, fp16_bytes(divide(max_scale, smax)), fp16_bytes(divide(max_min, smax))


def _quantize_k_asymmetric(blocks: torch.Tensor, group: int, nmax: int, smax: int, candidates: tuple[float, ...],
                           weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q2_K's sub-blocks (groups of 16, 4-bit scales): the weighted search, the codes, the one-step
    refinement of the scale codes. Returns fp16 bytes of d and dmin, scale codes, min codes (n, s)
    and levels (n, 256)."""
    n_blocks = blocks.shape[0]
    groups = blocks.reshape(-1, group)
    scales, mins = _search_scale_min(groups, weights.reshape(-1, group), nmax, candidates)
    ls, lm, d_raw, dmin_raw = _super_block_codes(scales.reshape(n_blocks, -1), mins.reshape(n_blocks, -1), smax)
    d = fp16_from_bytes(d_raw).unsqueeze(-1)
    dmin = fp16_from_bytes(dmin_raw).unsqueeze(-1)
    ls, levels = _refine_asymmetric(blocks.reshape(n_blocks, -1, group), d, dmin, ls.unsqueeze(-1),
                                    lm.unsqueeze(-1), nmax, smax)
    return d_raw, dmin_raw, ls.squeeze(-1), lm, levels.reshape(n_blocks, QK_K)


# Q4_K / Q5_K: the inverse-scale candidates c (levels rint(c * (x - min) / span)) of the sub-block
# search, float32. Four candidates half a level apart, around nmax, do as well as llama.cpp's 21
# (see _quantize_k32), at a fifth of the work; the GPU kernel and the C kernel read them from here.
K32_CANDIDATES: dict[str, tuple[float, ...]] = {
    "Q4_K": (14.1, 14.6, 15.1, 15.6),
    "Q5_K": (30.25, 30.75, 31.25, 31.75),
}
K32_NMAX = {"Q4_K": 15, "Q5_K": 31}


def _candidates(nmax: int, rdelta: float, steps, rmin: float = 0.0) -> tuple[float, ...]:
    """rmin + rdelta*step + nmax for each step, the float32 constants summed in double and rounded
    once (as llama.cpp's float arithmetic on them comes out)."""
    return tuple(_f32(_f32(rmin) + _f32(rdelta) * step + nmax) for step in steps)


# The candidates of every K-quant's sub-block search, by type; the C and Triton kernels take theirs
# from here. The symmetric searches (Q3_K, Q6_K) try -nmax / max first, so step 0 is not listed.
_SYMMETRIC_STEPS = (-4, -3, -2, -1, 1, 2, 3, 4)
SEARCH_CANDIDATES: dict[str, tuple[float, ...]] = {
    "Q2_K": _candidates(3, 0.2, range(8), rmin=-0.5),
    "Q3_K": _candidates(4, 0.2, _SYMMETRIC_STEPS),
    "Q6_K": _candidates(32, 0.2, _SYMMETRIC_STEPS),
    **K32_CANDIDATES,
}
K32_CODE_ROUNDS = 2     # rounds of the code fit (_fit_codes) after the search


def _level_sums(levels: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σl, Σl² (small integers: exact in any order) and Σx·l (pairwise order) per group."""
    return pairwise_sum(levels), pairwise_sum(levels * levels), pairwise_sum(x * levels)


def _search_k32(x: torch.Tensor, nmax: int, candidates: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """Unweighted least-squares scale and min of each group of 32 (rows of x): for each candidate c
    the levels min(rint(c / span * (x - low)), nmax), then the scale and offset <= 0 that fit them
    best, in closed form; the first candidate, then any strictly better fit, wins.
    Returns (scale, -offset, Σl, Σl², Σx·l of the winner's levels, Σx), each (groups, 1)."""
    low, span, flat, shifted = _group_range(x)
    reciprocal = 1 / span
    sum_w = torch.full_like(span, 32.0)
    sum_x = pairwise_sum(x)
    best = None
    for index, candidate in enumerate(candidates):
        levels = nearest_int(reciprocal * _f32(candidate) * shifted).clamp_(0, nmax)
        sum_l, sum_l2, sum_xl = _level_sums(levels, x)
        det = sum_w * sum_l2 - sum_l * sum_l
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        offset = (sum_l2 * sum_x - sum_l * sum_xl) / det
        # A positive offset, or levels all equal (det 0: x all positive and close together): the
        # best fit through zero instead.
        through_zero = (offset > 0) | ~(det > 0)
        scale = torch.where(through_zero, sum_xl / sum_l2, scale)
        offset = torch.where(through_zero, torch.zeros_like(offset), offset)
        # The fit's squared error is Σx² - scale·Σx·l - offset·Σx (normal equations); Σx² is the
        # same for every candidate, so the best has the largest gain.
        error = -(scale * sum_xl + offset * sum_x)
        found = (scale, offset, sum_l, sum_l2, sum_xl, error)
        if index == 0:
            best = found
            continue
        better = error < best[-1]
        best = tuple(torch.where(better, new, old) for new, old in zip(found, best))
    scale, offset, sum_l, sum_l2, sum_xl, _ = best
    return (torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, -low, offset * -1.0),
            sum_l, sum_l2, sum_xl, sum_x)


def _code_error(scale, offset, sum_l, sum_l2, sum_xl, sum_x):
    """Σ (scale*l - offset - x)^2 of a group of 32 less Σx², from the sums of its levels."""
    return (scale * scale * sum_l2 - 2 * scale * offset * sum_l - 2 * scale * sum_xl
            + 32 * offset * offset + 2 * offset * sum_x)


def _fit_codes(d, dmin, ls, lm, sums, smax: int):
    """The 6-bit scale and min codes, each as given or one step away (nine pairs, the given pair
    first), whose scale d*ls and min dmin*lm fit the levels behind ``sums`` best; a pair must be
    strictly better to replace an earlier one."""
    best_error = best_ls = best_lm = None
    for step_ls in (0, -1, 1):
        for step_lm in (0, -1, 1):
            trial_ls = (ls + step_ls).clamp(0, smax)
            trial_lm = (lm + step_lm).clamp(0, smax)
            error = _code_error(d * trial_ls, dmin * trial_lm, *sums)
            if best_error is None:
                best_error, best_ls, best_lm = error, trial_ls, trial_lm
                continue
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ls = torch.where(better, trial_ls, best_ls)
            best_lm = torch.where(better, trial_lm, best_lm)
    return best_ls, best_lm


def _levels_for(x, scale, offset, nmax: int) -> torch.Tensor:
    """rint((x + offset) / scale) clamped to [0, nmax], the division as a product with the
    reciprocal (0 for a zero scale: all levels 0)."""
    positive = scale > 0
    inverse = torch.where(positive, 1 / torch.where(positive, scale, torch.ones_like(scale)), torch.zeros_like(scale))
    return nearest_int((x + offset) * inverse).clamp_(0, nmax)


def _quantize_k32(blocks: torch.Tensor, name: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Q4_K / Q5_K block bytes (with an importance matrix: llama.cpp's weighted quantizer).

    1. Each sub-block of 32: the unweighted least-squares scale and min over K32_CANDIDATES
       (_search_k32).
    2. The scales and mins as 6-bit codes against the super-block's largest (llama.cpp's layout
       and rounding).
    3. K32_CODE_ROUNDS rounds of: the codes one step up or down where that fits the current levels
       better (_fit_codes, a closed form per sub-block), then the levels again for those codes.

    llama.cpp's reference instead searches 21 candidates with weights rms + |x| and takes the
    nearest codes; the code fit more than makes up for the shorter search (tests/test_ggml.py
    checks the error against llama.cpp's), and costs about a fifth of its arithmetic."""
    nmax, smax = K32_NMAX[name], 63
    if importance is not None:
        ls, lm, levels, d_raw, dmin_raw = k32_fields(blocks, importance, nmax)
        return pack_k_blocks(d_raw, dmin_raw, ls, lm, levels, five_bit=name == "Q5_K")
    n_blocks = blocks.shape[0]
    x = blocks.reshape(n_blocks, 8, 32)
    scales, mins, *sums = _search_k32(x.reshape(-1, 32), nmax, K32_CANDIDATES[name])
    sums = [total.reshape(n_blocks, 8, 1) for total in sums]
    ls, lm, d_raw, dmin_raw = _super_block_codes(scales.reshape(n_blocks, 8), mins.reshape(n_blocks, 8), smax)
    ls, lm = ls.unsqueeze(-1), lm.unsqueeze(-1)
    d, dmin = fp16_from_bytes(d_raw).unsqueeze(-1), fp16_from_bytes(dmin_raw).unsqueeze(-1)
    for _ in range(K32_CODE_ROUNDS):
        ls, lm = _fit_codes(d, dmin, ls, lm, sums, smax)
        levels = _levels_for(x, d * ls, dmin * lm, nmax)
        sums[:3] = _level_sums(levels, x)
    return pack_k_blocks(d_raw, dmin_raw, ls.reshape(n_blocks, 8), lm.reshape(n_blocks, 8),
                         levels.reshape(n_blocks, QK_K), five_bit=name == "Q5_K")


@register
class Q2_K(_KQuant):
    name = "Q2_K"
    sub_block_size = 16
    file_type = "MOSTLY_Q2_K"
    fallback = "Q4_0"   # llama-quantize's tensor_type_fallback, for rows that are not whole super-blocks
    triton_module = None
    type_size = 84   # scales[16], qs[64], d, dmin
    fp16_offsets = (80, 82)

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        if importance is not None:
            ls, lm, levels, d_raw, dmin_raw = q2_k_fields(blocks, importance)
        else:
            d_raw, dmin_raw, ls, lm, levels = _quantize_k_asymmetric(
                blocks, group=16, nmax=3, smax=15, candidates=SEARCH_CANDIDATES["Q2_K"], weights=blocks.abs())
        scales = (ls.to(torch.uint8) | (lm.to(torch.uint8) << 4))
        return torch.cat([scales, _pack_crumbs(levels), d_raw, dmin_raw], dim=-1)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        scales = blocks[:, :16]
        levels = _unpack_crumbs(blocks[:, 16:80]).to(torch.float32).reshape(-1, 16, 16)
        d = fp16_from_bytes(blocks[:, 80:82]).unsqueeze(-1)
        dmin = fp16_from_bytes(blocks[:, 82:84]).unsqueeze(-1)
        scale = d * (scales & 0x0F).to(torch.float32).unsqueeze(-1)
        offset = dmin * (scales >> 4).to(torch.float32).unsqueeze(-1)
        return (scale * levels - offset).reshape(-1, QK_K)


@register
class Q4_K(_K32Quant):
    name = "Q4_K"
    file_type = "MOSTLY_Q4_K_M"
    fallback = "Q5_0"
    type_size = 144  # d, dmin, scales[12], qs[128]
    fp16_offsets = (0, 2)

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return _quantize_k32(blocks.to(torch.float32), self.name, importance)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(blocks[:, 0:2]).unsqueeze(-1)
        dmin = fp16_from_bytes(blocks[:, 2:4]).unsqueeze(-1)
        ls, lm = _unpack_scale_min_k4(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        levels = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).to(torch.float32)
        return (d * ls.unsqueeze(-1) * levels - dmin * lm.unsqueeze(-1)).reshape(-1, QK_K)


@register
class Q5_K(_K32Quant):
    name = "Q5_K"
    file_type = "MOSTLY_Q5_K_M"
    fallback = "Q5_1"
    type_size = 176  # d, dmin, scales[12], qh[32], qs[128]
    fp16_offsets = (0, 2)

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        return _quantize_k32(blocks.to(torch.float32), self.name, importance)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(blocks[:, 0:2]).unsqueeze(-1)
        dmin = fp16_from_bytes(blocks[:, 2:4]).unsqueeze(-1)
        ls, lm = _unpack_scale_min_k4(blocks[:, 4:16])
        shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
        high = (blocks[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1
        qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
        low = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
        levels = (low | (high << 4)).to(torch.float32)
        return (d * ls.unsqueeze(-1) * levels - dmin * lm.unsqueeze(-1)).reshape(-1, QK_K)


def _pack_q3_k(codes: torch.Tensor, levels: torch.Tensor, d_raw: torch.Tensor) -> torch.Tensor:
    """Q3_K block bytes from the scale codes 0..63 (n, 16), the levels 0..7 (n, 256) and d's fp16 bytes:
    [hmask 32][qs 64][scales 12][d]."""
    # Low nibbles of the 16 6-bit scales in bytes 0-7, their top two bits in bytes 8-11.
    low = pack_nibbles(codes[:, :8], codes[:, 8:])
    top = (codes >> 4).reshape(-1, 4, 4)
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    # hmask[j] bit k is the third bit of element 32k + j; qs holds the low two bits.
    bit_weights = (1 << torch.arange(8, dtype=torch.uint8, device=levels.device)).reshape(1, 8, 1)
    hmask = ((levels >> 2).reshape(-1, 8, 32) * bit_weights).sum(dim=1, dtype=torch.uint8)
    return torch.cat([hmask, _pack_crumbs(levels & 3), low, high, d_raw], dim=-1)


@register
class Q3_K(_KQuant):
    name = "Q3_K"
    sub_block_size = 16
    file_type = "MOSTLY_Q3_K_M"
    fallback = "Q4_0"
    triton_module = None
    type_size = 110  # hmask[32], qs[64], scales[12], d
    fp16_offsets = (108,)

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        if importance is not None:
            codes, levels, d_raw = q3_k_fields(blocks, importance)
            return _pack_q3_k(codes.to(torch.uint8), levels.to(torch.uint8), d_raw)
        n_blocks = blocks.shape[0]
        scales = _search_scale_symmetric(blocks.reshape(-1, 16), nmax=4, candidates=SEARCH_CANDIDATES["Q3_K"])
        scales = scales.reshape(n_blocks, 16)
        peak = _signed_absmax(scales)
        nonzero = peak != 0
        inverse = torch.where(nonzero, -32 / torch.where(nonzero, peak, 1), torch.zeros_like(peak))
        codes = nearest_int(inverse * scales).clamp_(-32, 31)
        d_raw = fp16_bytes(torch.where(nonzero, 1 / torch.where(nonzero, inverse, 1), torch.zeros_like(peak)))
        d = fp16_from_bytes(d_raw).unsqueeze(-1)
        codes, levels = _refine_symmetric(blocks.reshape(n_blocks, 16, 16), d, codes.unsqueeze(-1), 4, -32, 31)
        codes = (codes.squeeze(-1) + 32).to(torch.uint8)
        return _pack_q3_k(codes, (levels + 4).reshape(n_blocks, QK_K).to(torch.uint8), d_raw)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(8, dtype=torch.uint8, device=blocks.device).reshape(1, 8, 1)
        high = ((blocks[:, :32].reshape(-1, 1, 32) >> shifts) & 1).reshape(-1, QK_K)
        low = _unpack_crumbs(blocks[:, 32:96])
        packed = blocks[:, 96:108]
        nibbles = torch.cat([packed[:, :8] & 0x0F, packed[:, :8] >> 4], dim=-1)
        top = ((packed[:, 8:12].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8,
                                                                  device=blocks.device).reshape(1, 4, 1)) & 3)
        codes = (nibbles | (top.reshape(-1, 16) << 4)).to(torch.float32) - 32
        d = fp16_from_bytes(blocks[:, 108:110])
        levels = (low | (high << 2)).to(torch.float32) - 4
        return ((d * codes).unsqueeze(-1) * levels.reshape(-1, 16, 16)).reshape(-1, QK_K)


def _pack_q6_k(codes: torch.Tensor, levels: torch.Tensor, d_raw: torch.Tensor) -> torch.Tensor:
    """Q6_K block bytes from the int8 scale codes' bytes (n, 16), the levels 0..63 (n, 256) and d's fp16
    bytes: [ql 128][qh 64][scales 16][d]."""
    levels = levels.reshape(-1, 2, 4, 32)
    # Per half of 128: ql[l] = q0 | q2 << 4, ql[32 + l] = q1 | q3 << 4, qh[l] = q0..q3 top bits.
    ql = torch.stack([pack_nibbles(levels[:, :, 0], levels[:, :, 2]),
                      pack_nibbles(levels[:, :, 1], levels[:, :, 3])], dim=2).reshape(-1, 128)
    top = levels >> 4
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(-1, 64)
    return torch.cat([ql, qh, codes, d_raw], dim=-1)


@register
class Q6_K(_KQuant):
    name = "Q6_K"
    sub_block_size = 16
    file_type = "MOSTLY_Q6_K"
    fallback = "Q8_0"
    type_size = 210  # ql[128], qh[64], scales[16] (int8), d
    fp16_offsets = (208,)

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        blocks = blocks.to(torch.float32)
        if importance is not None:
            codes, levels, d_raw = q6_k_fields(blocks, importance)
            return _pack_q6_k(codes.to(torch.int8).view(torch.uint8), levels.to(torch.uint8), d_raw)
        n_blocks = blocks.shape[0]
        scales = _search_scale_symmetric(blocks.reshape(-1, 16), nmax=32, candidates=SEARCH_CANDIDATES["Q6_K"])
        scales = scales.reshape(n_blocks, 16)
        peak = _signed_absmax(scales)
        nonzero = peak.abs() >= GROUP_MAX_EPS
        inverse = torch.where(nonzero, -128 / torch.where(nonzero, peak, 1), torch.zeros_like(peak))
        codes = nearest_int(inverse * scales).clamp_(-128, 127)
        d_raw = fp16_bytes(torch.where(nonzero, 1 / torch.where(nonzero, inverse, 1), torch.zeros_like(peak)))
        d = fp16_from_bytes(d_raw).unsqueeze(-1)
        codes, levels = _refine_symmetric(blocks.reshape(n_blocks, 16, 16), d, codes.unsqueeze(-1), 32, -128, 127)
        codes = codes.squeeze(-1).to(torch.int8).view(torch.uint8)
        return _pack_q6_k(codes, (levels + 32).reshape(n_blocks, QK_K).to(torch.uint8), d_raw)

    def dequantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        ql = blocks[:, :128].reshape(-1, 2, 1, 64)
        low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).reshape(1, 1, 4, 1)
        high = (qh >> shifts) & 3
        levels = (low | (high << 4)).to(torch.float32).reshape(-1, 16, 16) - 32
        codes = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        d = fp16_from_bytes(blocks[:, 208:210])
        return ((d * codes).unsqueeze(-1) * levels).reshape(-1, QK_K)
