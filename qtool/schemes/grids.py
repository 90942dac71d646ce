"""Calibration grids: how a group of columns of one weight row is represented, and how its
parameters are fitted (the numerics GPTQ and the importance search in qtool/schemes/gptq.py run on).

A grid says how a group of columns of one row is represented (a scale and an offset per sub-block,
integer levels ``0..qmax``, optionally a non-uniform codebook) and how its parameters are fitted.
The generic grids are here (symmetric and affine blocks, K-quant super-blocks, codebooks); each
encoding's record names its own (``Scheme.calibration_grid``), and grids tied to one format's
details live beside its scheme (``Bnb4bitGrid`` in nf4.py, ``IQ4NLGrid`` in ggml.py). This module
imports nothing of qtool, so every scheme module can build on it.

Conventions: a weight is ``[rows, cols]`` (out x in, as nn.Linear stores it); every input column
``c`` belongs to sub-block ``c // sub_size``; a value is ``scale * level + offset`` (uniform grids)
or ``scale * codebook[level] + offset`` (codebook grids). Everything is pure torch, float32.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

# llama.cpp's GROUP_MAX_EPS: blocks whose absmax is below this are all zero.
_GROUP_MAX_EPS = 1e-15


@dataclass
class GridParams:
    scale: torch.Tensor                      # [..., n_sub]
    offset: torch.Tensor                     # [..., n_sub]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)   # format-specific (K-quant sub-scales)


class Grid(ABC):
    """How one group of columns of each row is quantized."""

    name: str
    group_size: int          # columns whose parameters are fitted together (a block, a K super-block)
    sub_size: int            # columns sharing one (scale, offset)
    qmax: int                # levels are 0..qmax
    codebook: torch.Tensor | None = None   # non-uniform grids: value = scale * codebook[level] + offset
    scale_dtype: torch.dtype | None = None  # what the format stores scales in (None: float32)
    negative_scales: bool = True            # whether the format's scales may be negative
    # The format quantizes the scales across groups (NF4's double quantization): every group is
    # fitted before any level is chosen, and GPTQ always runs with static groups.
    whole_tensor_scales: bool = False

    @abstractmethod
    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        """Parameters for ``w`` of shape ``[..., group_size]`` minimizing the ``weights``-weighted
        squared error (``weights`` broadcastable to ``w``; None = plain squared error)."""

    def finish(self, params: GridParams) -> GridParams:
        """The fitted parameters of a whole ``[rows, cols]`` weight (scale and offset ``[rows, n_sub]``)
        as the format stores them; grids with ``whole_tensor_scales`` override it."""
        return params

    def encode(self, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Nearest level of each element (scale/offset already expanded to ``w``'s shape)."""
        inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        if self.codebook is None:
            return torch.clamp(torch.round((w - offset) * inv), 0, self.qmax)
        codebook = self.codebook.to(w.device)
        midpoints = (codebook[1:] + codebook[:-1]) / 2
        return torch.bucketize(((w - offset) * inv).contiguous(), midpoints).to(w.dtype)

    def decode(self, levels: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        if self.codebook is None:
            return scale * levels + offset
        return scale * self.codebook.to(levels.device)[levels.long()] + offset

    def round(self, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.encode(w, scale, offset)
        return levels, self.decode(levels, scale, offset)

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        return math.log2(self.qmax + 1) + 2 * scale_bits / self.sub_size

    def unit_values(self, levels: torch.Tensor) -> torch.Tensor | None:
        """Grids whose value is ``scale * u(level)`` (no free offset): ``u`` of each level, which lets
        the scales be re-fitted by least squares once the levels are fixed. None for the others."""
        return None

    def offset_for(self, scale: torch.Tensor) -> torch.Tensor:
        """On grids with ``unit_values``: the offset that goes with ``scale``."""
        return torch.zeros_like(scale)


# Elements of the candidate-by-element tensors one pass of a scale search holds (64 MB of float32).
_SEARCH_ELEMENTS = 1 << 24


def _store(scale: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Round scales to the dtype the format stores them in, so the levels are chosen for the stored value."""
    return scale if dtype is None else scale.to(dtype).to(torch.float32)


def _weighted(w: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(w) if weights is None else torch.broadcast_to(weights, w.shape).to(w.dtype)


def _keep_best_least_squares(x: torch.Tensor, weights: torch.Tensor, levels: torch.Tensor, best_score: torch.Tensor,
                             best_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate of a symmetric scale search: the weighted least-squares scale for ``levels``
    (values scale * levels), kept where it beats the best so far. The weighted error with that scale
    is sum(w x^2) - sum_lx^2 / sum_l2, so the score to maximize is the ratio."""
    sum_lx = (weights * x * levels).sum(-1, keepdim=True)
    sum_l2 = (weights * levels * levels).sum(-1, keepdim=True)
    score = torch.where(sum_l2 > 0, sum_lx * sum_lx / sum_l2.clamp_min(1e-30), torch.zeros_like(sum_l2))
    scale = sum_lx / sum_l2.clamp_min(1e-30)
    if levels.dim() > x.dim():
        # Candidates stacked in dim 0: the first best of them, as a loop over them would keep it.
        pick = score.argmax(dim=0, keepdim=True)
        score, scale = score.gather(0, pick)[0], scale.gather(0, pick)[0]
    better = score > best_score
    return torch.where(better, score, best_score), torch.where(better, scale, best_scale)


def search_symmetric(x: torch.Tensor, weights: torch.Tensor | None, low: int, high: int, *,
                     negative_scales: bool, steps: int = 9, scale_dtype: torch.dtype | None = torch.float16
                     ) -> torch.Tensor:
    """Scale for levels ``-low..high`` (value = scale * l) over the last dim of ``x``.

    llama.cpp's make_qx_quants: candidate inverse scales around the one that maps the largest-magnitude
    element to ``-low``, each followed by the weighted least-squares scale for its levels; the
    candidate with the smallest weighted error wins. With ``negative_scales=False`` (formats whose
    kernels expect positive scales) the candidates map the absmax to ``high`` or ``low`` instead.
    """
    weights = _weighted(x, weights)
    absmax, where = x.abs().max(dim=-1, keepdim=True)
    signed_max = torch.gather(x, -1, where)
    if negative_scales:
        bases = [-signed_max / (low + 0.1 * step) for step in range(-steps, steps + 1)]
    else:
        bases = [absmax / (edge + 0.1 * step) for edge in sorted({low, high}) for step in range(-steps, steps + 1)
                 if edge + 0.1 * step > 0]
    best_score = torch.full_like(absmax, -1.0)
    best_scale = torch.zeros_like(absmax)
    # Several candidates per pass (stacked in a leading dim): a few large operations rather than many
    # small launches; each element sees the operations of the one-candidate loop, in its order.
    per_pass = max(1, _SEARCH_ELEMENTS // max(x.numel(), 1))
    for first in range(0, len(bases), per_pass):
        base = torch.stack(bases[first:first + per_pass])
        inv = torch.where(base != 0, 1.0 / base, torch.zeros_like(base))
        levels = torch.clamp(torch.round(x * inv), -low, high)
        best_score, best_scale = _keep_best_least_squares(x, weights, levels, best_score, best_scale)
    best_scale = torch.where(absmax < _GROUP_MAX_EPS, torch.zeros_like(best_scale), best_scale)
    return _store(best_scale.squeeze(-1), scale_dtype)


def search_affine(x: torch.Tensor, weights: torch.Tensor | None, qmax: int, *, min_le_zero: bool,
                  integer_zero: bool, rmin: float = -1.0, rdelta: float = 0.1, nstep: int = 20
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, minimum) with value = scale * l + minimum, l in 0..qmax, over the last dim of ``x``.

    llama.cpp's make_qkx2/3_quants: candidate inverse scales ``(qmax + rmin + rdelta*i) / (max - min)``,
    levels from each, then the weighted least-squares (scale, min) for those levels; smallest weighted
    error wins. ``min_le_zero``: K-quants store -min unsigned. ``integer_zero``: compressed-tensors'
    asymmetric int4 stores an integer zero point, so min = -zero * scale with zero in 0..qmax.
    """
    weights = _weighted(x, weights)
    xmin = x.amin(-1, keepdim=True)
    xmax = x.amax(-1, keepdim=True)
    if min_le_zero or integer_zero:
        xmin = xmin.clamp_max(0)
        xmax = xmax.clamp_min(0) if integer_zero else xmax
    span = xmax - xmin
    flat = span <= 0
    span = torch.where(flat, torch.ones_like(span), span)
    sum_w = weights.sum(-1, keepdim=True)
    sum_x = (weights * x).sum(-1, keepdim=True)
    best_err = torch.full_like(span, float("inf"))
    best_scale = torch.zeros_like(span)
    best_min = torch.zeros_like(span)
    for step in range(nstep + 1):
        iscale = (qmax + rmin + rdelta * step) / span
        levels = torch.clamp(torch.round(iscale * (x - xmin)), 0, qmax)
        sum_l = (weights * levels).sum(-1, keepdim=True)
        sum_l2 = (weights * levels * levels).sum(-1, keepdim=True)
        sum_xl = (weights * levels * x).sum(-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        scale = torch.where(ok, (sum_w * sum_xl - sum_x * sum_l) / det, 1.0 / iscale)
        minimum = torch.where(ok, (sum_l2 * sum_x - sum_l * sum_xl) / det, xmin)
        if min_le_zero:
            clip = minimum > 0
            minimum = torch.where(clip, torch.zeros_like(minimum), minimum)
            scale = torch.where(clip, sum_xl / sum_l2.clamp_min(1e-30), scale)
        if integer_zero:
            scale = scale.clamp_min(1e-12)
            zero = torch.clamp(torch.round(-minimum / scale), 0, qmax)
            levels = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
            centered = levels - zero
            denom = (weights * centered * centered).sum(-1, keepdim=True)
            scale = torch.where(denom > 0, (weights * centered * x).sum(-1, keepdim=True) / denom.clamp_min(1e-30), scale)
            scale = scale.clamp_min(1e-12)
            minimum = -zero * scale
        err = (weights * (scale * levels + minimum - x) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, minimum, best_min)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_min = torch.where(flat, xmin if not integer_zero else torch.zeros_like(xmin), best_min)
    return best_scale.squeeze(-1), best_min.squeeze(-1)


class SymmetricGrid(Grid):
    """value = scale * (level - low), one scale per sub-block: Q4_0, Q5_0, Q8_0, int4-sym, int8-sym."""

    def __init__(self, name: str, block: int, low: int, high: int, *, negative_scales: bool,
                 scale_dtype: torch.dtype | None = torch.float16) -> None:
        self.name, self.group_size, self.sub_size = name, block, block
        self.low, self.high, self.qmax = low, high, low + high
        self.negative_scales = negative_scales
        self.scale_dtype = scale_dtype

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        scale = search_symmetric(w, weights, self.low, self.high, negative_scales=self.negative_scales,
                                 scale_dtype=self.scale_dtype)
        scale = scale.unsqueeze(-1)
        return GridParams(scale, self.offset_for(scale))

    def unit_values(self, levels: torch.Tensor) -> torch.Tensor | None:
        return levels.to(torch.float32) - self.low

    def offset_for(self, scale: torch.Tensor) -> torch.Tensor:
        return -self.low * scale


class AffineGrid(Grid):
    """value = scale * level + min per sub-block: Q4_1, Q5_1 (float min), int4-asym (integer zero point)."""

    def __init__(self, name: str, block: int, qmax: int, *, integer_zero: bool,
                 scale_dtype: torch.dtype | None = torch.float16) -> None:
        self.name, self.group_size, self.sub_size, self.qmax = name, block, block, qmax
        self.integer_zero = integer_zero
        self.scale_dtype = scale_dtype

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        if self.integer_zero:
            scale, minimum = search_affine(w, weights, self.qmax, min_le_zero=False, integer_zero=True)
            zero = torch.where(scale > 0, torch.round(-minimum / scale.clamp_min(1e-30)), torch.zeros_like(scale))
            scale = _store(scale, self.scale_dtype)
            params = GridParams(scale.unsqueeze(-1), (-zero * scale).unsqueeze(-1), {"zero_point": zero.unsqueeze(-1)})
            return params
        # Q4_1 / Q5_1 with an importance matrix use make_qkx3_quants(rmin=-0.9, rdelta=0.05, nstep=36).
        scale, minimum = search_affine(w, weights, self.qmax, min_le_zero=False, integer_zero=False,
                                       rmin=-0.9, rdelta=0.05, nstep=36)
        return GridParams(_store(scale, self.scale_dtype).unsqueeze(-1), _store(minimum, self.scale_dtype).unsqueeze(-1))


class KQuantGrid(Grid):
    """Q4_K / Q5_K: super-blocks of 256 = 8 sub-blocks of 32; each sub-block's scale and -min are
    6-bit multiples of the super-block's fp16 ``d`` and ``dmin``."""

    def __init__(self, name: str, qmax: int) -> None:
        self.name, self.group_size, self.sub_size, self.qmax = name, 256, 32, qmax

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        shape = w.shape[:-1]
        sub = w.reshape(*shape, 8, 32)
        sub_weights = None if weights is None else torch.broadcast_to(weights, w.shape).reshape(*shape, 8, 32)
        scale, minimum = search_affine(sub, sub_weights, self.qmax, min_le_zero=True, integer_zero=False,
                                       rmin=-1.0, rdelta=0.1, nstep=20)
        neg_min = -minimum
        d = _store(scale.amax(-1, keepdim=True) / 63, torch.float16)
        dmin = _store(neg_min.amax(-1, keepdim=True) / 63, torch.float16)
        sc = torch.clamp(torch.round(scale / torch.where(d > 0, d, torch.ones_like(d))), 0, 63)
        mn = torch.clamp(torch.round(neg_min / torch.where(dmin > 0, dmin, torch.ones_like(dmin))), 0, 63)
        return GridParams(d * sc, -dmin * mn, {"d": d.squeeze(-1), "dmin": dmin.squeeze(-1), "sub_scale": sc, "sub_min": mn})

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        # 6-bit scale and min per 32 (12 bytes per 256) plus fp16 d and dmin.
        return math.log2(self.qmax + 1) + (12 * 8 + 32) / 256


class CodebookGrid(Grid):
    """value = absmax * codebook[level] per block (NF4); the scale search shrinks absmax."""

    def __init__(self, name: str, block: int, codebook: torch.Tensor, shrink: tuple[float, ...] = ()) -> None:
        self.name, self.group_size, self.sub_size = name, block, block
        self.codebook = codebook
        self.qmax = len(codebook) - 1
        self.shrink = shrink or tuple(1.0 - 0.02 * i for i in range(13))

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        weights = _weighted(w, weights)
        absmax = w.abs().amax(-1, keepdim=True)
        best_err = torch.full_like(absmax, float("inf"))
        best_scale = absmax.clone()
        for factor in self.shrink:
            scale = absmax * factor
            offset = torch.zeros_like(scale)
            _, values = self.round(w, scale.expand_as(w), offset.expand_as(w))
            err = (weights * (values - w) ** 2).sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
        return GridParams(best_scale, torch.zeros_like(best_scale))


@dataclass
class QuantResult:
    qweight: torch.Tensor        # dequantized weight, [rows, cols], float32
    levels: torch.Tensor         # integer levels 0..qmax, [rows, cols], uint8 (int16 for wide grids)
    scale: torch.Tensor          # [rows, n_sub]
    offset: torch.Tensor         # [rows, n_sub]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    perm: torch.Tensor | None = None    # act-order: columns in the order they were quantized
    # The encoding's packed object when its own quantizer weighed the elements (GGML types that take an
    # importance matrix, as llama-quantize --imatrix does); levels, scale and offset are then empty.
    packed: Any = None


