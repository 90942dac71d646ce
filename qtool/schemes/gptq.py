"""Calibration-aware weight quantization: GPTQ and importance-weighted scale search.

Both are generic over the quantization *grid*: a grid says how a group of columns of one row is
represented (a scale and an offset per sub-block, integer levels ``0..qmax``, optionally a
non-uniform codebook) and how its parameters are fitted. The grids here mirror the formats qtool
writes: int4 groups (compressed-tensors, sym/asym), GGML 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0),
K-quants (Q4_K, Q5_K) and NF4 blocks. The result of a method is the integer levels plus the scales
and offsets it chose; the format's scheme packs those (it does not re-derive scales from the
dequantized weight, which would not give back the same grid).

Conventions: a weight is ``[rows, cols]`` (out x in, as nn.Linear stores it); every input column
``c`` belongs to sub-block ``c // sub_size``; a value is ``scale * level + offset`` (uniform grids)
or ``scale * codebook[level] + offset`` (codebook grids). Everything is pure torch, float32, on the
weight's device. GPTQ walks the columns in order (it is sequential by nature); each step is
vectorized over all rows.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

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
    better = score > best_score
    return torch.where(better, score, best_score), torch.where(better, sum_lx / sum_l2.clamp_min(1e-30), best_scale)


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
    for base in bases:
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


class Bnb4bitGrid(CodebookGrid):
    """bitsandbytes' NF4 / FP4 blocks: value = absmax * code[level], the float32 absmax of each block
    being the chosen scale. Levels index the code sorted ascending (FP4's is not; the packing maps
    them back). With ``double_quant`` the absmaxes of the whole tensor are stored as bitsandbytes'
    double quantization does (offset = their mean, then 8-bit dynamic codes in blocks of 256), and
    the levels are chosen for those decoded scales, so the packed file holds exactly the weight the
    method evaluated. Blocks run along rows, as bitsandbytes' blocks of the flattened weight do when
    the block size divides the row length."""

    def __init__(self, quant_type: str, block: int, double_quant: bool) -> None:
        from qtool.schemes.nf4 import code_4bit

        super().__init__(quant_type, block, torch.sort(code_4bit(quant_type)).values)
        self.double_quant = double_quant
        self.whole_tensor_scales = double_quant

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        # The shrink candidates' levels, each with its weighted least-squares scale (the absmax is a
        # free float here, unlike IQ4_NL's fp16 d): about 3% lower output error than the shrink alone
        # on SmolLM2's layers.
        weights = _weighted(w, weights)
        absmax = w.abs().amax(-1, keepdim=True)
        table = self.codebook.to(w.device)
        best_score = torch.full_like(absmax, -1.0)
        best_scale = absmax.clone()
        for factor in self.shrink:
            levels = self.encode(w, (absmax * factor).expand_as(w), torch.zeros_like(w))
            best_score, best_scale = _keep_best_least_squares(w, weights, table[levels.long()], best_score, best_scale)
        return GridParams(best_scale, torch.zeros_like(best_scale))

    def finish(self, params: GridParams) -> GridParams:
        if not self.double_quant:
            return params
        from qtool.schemes.nf4 import NESTED_BLOCK_SIZE, dequantize_dynamic, dynamic_map, quantize_dynamic

        absmax = params.scale.reshape(-1).to(torch.float32)      # block order = row-major
        offset = absmax.mean()
        codes, nested_absmax = quantize_dynamic(absmax - offset, NESTED_BLOCK_SIZE)
        # The decoded absmax, computed as bitsandbytes' dequantize_4bit does (blockwise decode, + offset).
        decoded = dequantize_dynamic(codes, nested_absmax, dynamic_map(absmax.device), NESTED_BLOCK_SIZE) + offset
        extra = dict(params.extra, absmax_codes=codes.reshape(params.scale.shape), nested_absmax=nested_absmax,
                     nested_offset=offset)
        return GridParams(decoded.reshape(params.scale.shape), params.offset, extra)


class IQ4NLGrid(CodebookGrid):
    """IQ4_NL: value = d * table[level] per block of 32, d a signed fp16 scale; the fit is llama.cpp's
    search (the scale mapping the largest-magnitude element to the table's end, then inverse scales
    ``(k - 127) / max`` for k = -7..7, each with its weighted least-squares scale)."""

    def __init__(self) -> None:
        from qtool.schemes.ggml import IQ4_NL_VALUES

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


def make_grid(scheme: str, *, group_size: int | None = None, double_quant: bool = False) -> Grid:
    """The grid of a registered scheme name (GGUF type names, int4-sym/asym, int8-sym, nf4, fp4).
    ``double_quant``: nf4/fp4 absmaxes quantized as bitsandbytes' double quantization stores them."""
    if scheme == "Q4_0":
        return SymmetricGrid("Q4_0", 32, 8, 7, negative_scales=True)
    if scheme == "Q5_0":
        return SymmetricGrid("Q5_0", 32, 16, 15, negative_scales=True)
    if scheme == "Q8_0":
        return SymmetricGrid("Q8_0", 32, 127, 127, negative_scales=True)
    if scheme == "Q4_1":
        return AffineGrid("Q4_1", 32, 15, integer_zero=False)
    if scheme == "Q5_1":
        return AffineGrid("Q5_1", 32, 31, integer_zero=False)
    if scheme == "Q4_K":
        return KQuantGrid("Q4_K", 15)
    if scheme == "Q5_K":
        return KQuantGrid("Q5_K", 31)
    if scheme == "int4-sym":
        return SymmetricGrid("int4-sym", group_size or 128, 8, 7, negative_scales=False, scale_dtype=torch.bfloat16)
    if scheme == "int4-asym":
        return AffineGrid("int4-asym", group_size or 128, 15, integer_zero=True, scale_dtype=torch.bfloat16)
    if scheme == "int8-sym":
        return SymmetricGrid("int8-sym", group_size or 1 << 30, 127, 127, negative_scales=False, scale_dtype=None)
    if scheme in ("nf4", "fp4"):
        return Bnb4bitGrid(scheme, group_size or 64, double_quant)
    if scheme == "IQ4_NL":
        return IQ4NLGrid()
    raise ValueError(f"no calibration grid for scheme {scheme!r}")


@dataclass
class QuantResult:
    qweight: torch.Tensor        # dequantized weight, [rows, cols], float32
    levels: torch.Tensor         # integer levels 0..qmax, [rows, cols], uint8 (int16 for wide grids)
    scale: torch.Tensor          # [rows, n_sub]
    offset: torch.Tensor         # [rows, n_sub]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    perm: torch.Tensor | None = None    # act-order: columns in the order they were quantized


def _pad_columns(w: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-w.shape[-1]) % multiple
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def _fit_groups(grid: Grid, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
    """Fit every group of ``w`` [rows, cols] at once (last group zero-padded with zero weight)."""
    rows, cols = w.shape
    n_groups = -(-cols // grid.group_size)
    padded = _pad_columns(w, grid.group_size).reshape(rows, n_groups, grid.group_size)
    if weights is None:
        weights = torch.ones(1, cols, device=w.device, dtype=w.dtype)
    weights = torch.broadcast_to(weights, (weights.shape[0], cols))
    padded_weights = _pad_columns(weights, grid.group_size).reshape(weights.shape[0], n_groups, grid.group_size)
    params = grid.fit(padded, padded_weights)
    n_sub = -(-cols // grid.sub_size)
    flat = GridParams(params.scale.reshape(rows, -1)[:, :n_sub], params.offset.reshape(rows, -1)[:, :n_sub],
                      {k: v.reshape(rows, -1) for k, v in params.extra.items()})
    return grid.finish(flat)


def _expand(params: torch.Tensor, sub_size: int, cols: int) -> torch.Tensor:
    return params.repeat_interleave(sub_size, dim=1)[:, :cols]


def _levels_dtype(grid: Grid) -> torch.dtype:
    return torch.uint8 if grid.qmax <= 255 else torch.int16


def imatrix_weights(weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor | None:
    """llama.cpp's per-element weights with an importance matrix: imatrix[col] * sqrt(sigma2 + w^2),
    sigma2 = mean square of the row."""
    if importance is None:
        return None
    sigma2 = (weight * weight).mean(dim=1, keepdim=True)
    return importance.to(weight.device, torch.float32).unsqueeze(0) * torch.sqrt(sigma2 + weight * weight)


def quantize_rtn(weight: torch.Tensor, grid: Grid, importance: torch.Tensor | None = None) -> QuantResult:
    """Round to nearest on the grid with scales from the (importance-weighted) search:
    qtool's equivalent of llama.cpp's imatrix quantization when ``importance`` is given."""
    w = weight.to(torch.float32)
    params = _fit_groups(grid, w, imatrix_weights(w, importance))
    cols = w.shape[1]
    scale = _expand(params.scale, grid.sub_size, cols)
    offset = _expand(params.offset, grid.sub_size, cols)
    levels, values = grid.round(w, scale, offset)
    return QuantResult(values, levels.to(_levels_dtype(grid)), params.scale, params.offset, params.extra)


def _damped_inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the damped Hessian (GPTQ's Hinv)."""
    diag_mean = torch.diagonal(hessian).mean()
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for attempt in range(6):
        damped = hessian + (damp * 10**attempt) * diag_mean * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("Hessian is not positive definite even with heavy damping")


@contextmanager
def _few_threads(device: torch.device) -> Iterator[None]:
    """GPTQ is thousands of tiny ops (one column at a time): on CPU, thread hand-offs cost more
    than they bring (3-10x slower with 2 threads on a busy machine), so it runs single-threaded."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128, static_groups: bool = False,
                  importance: torch.Tensor | None = None, damp_diag: float = 0.0, refit: bool = False
                  ) -> QuantResult:
    """GPTQ (Frantar et al. 2022) on any grid.

    ``hessian`` is X^T X over the calibration inputs of this Linear ([cols, cols]). Columns are
    quantized one after another; each one's rounding error is spread over the columns not yet
    quantized through the Cholesky factor of the damped inverse Hessian (lazy batch updates in
    blocks of ``block_size``). ``act_order`` processes columns by decreasing Hessian diagonal; the
    groups stay contiguous in the original column order, so the output needs no g_idx. A group's
    scales are fitted when its first column comes up, from the error-updated weights
    (``static_groups``: fitted once from the original weights, llama.cpp-style, before anything runs).
    ``importance`` weights the scale search per column (default: the Hessian diagonal).
    ``damp_diag`` adds that multiple of each channel's own Hessian diagonal (H + l*diag(H)): it
    shrinks the input correlations estimated from few calibration tokens, the part of GPTQ that
    overfits (l -> inf is importance-weighted round to nearest).
    ``refit``: afterwards, re-fit the scales for the chosen levels (``refit_scales``).
    """
    if damp_diag > 0:
        hessian = hessian + damp_diag * torch.diag(torch.diagonal(hessian))
    static_groups = static_groups or grid.whole_tensor_scales
    with _few_threads(weight.device):
        result = _gptq(weight, hessian, grid, damp=damp, act_order=act_order, block_size=block_size,
                       static_groups=static_groups, importance=importance)
    # A few large matrix products: these want every thread, unlike GPTQ's column loop.
    return refit_scales(weight, hessian, grid, result) if refit else result


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float, act_order: bool,
          block_size: int, static_groups: bool, importance: torch.Tensor | None) -> QuantResult:
    w = weight.to(torch.float32).clone()
    rows, cols = w.shape
    h = hessian.to(w.device, torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    if importance is None:
        importance = torch.diagonal(h).clone()
        importance[dead] = 0.0
    importance = importance.to(w.device, torch.float32)

    n_sub = -(-cols // grid.sub_size)
    scale = torch.zeros(rows, n_sub, device=w.device)
    offset = torch.zeros(rows, n_sub, device=w.device)
    extra: dict[str, torch.Tensor] = {}
    group_of = torch.arange(cols, device=w.device) // grid.group_size
    n_groups = int(group_of[-1]) + 1
    subs_per_group = grid.group_size // grid.sub_size
    fitted = [False] * n_groups

    def store(group: int, params: GridParams) -> None:
        first = group * subs_per_group
        count = min(subs_per_group, n_sub - first)
        scale[:, first:first + count] = params.scale.reshape(rows, -1)[:, :count]
        offset[:, first:first + count] = params.offset.reshape(rows, -1)[:, :count]
        for key, value in params.extra.items():
            value = value.reshape(rows, -1)
            per_group = value.shape[1]
            if key not in extra:
                extra[key] = torch.zeros(rows, per_group * n_groups, device=w.device)
            extra[key][:, group * per_group:(group + 1) * per_group] = value
        fitted[group] = True

    def fit_group(group: int, values: torch.Tensor) -> None:
        start = group * grid.group_size
        count = values.shape[1]
        group_weights = imatrix_weights(values, importance[start:start + count])
        padded = _pad_columns(values, grid.group_size)
        padded_weights = _pad_columns(group_weights, grid.group_size)
        store(group, grid.fit(padded, padded_weights))

    if static_groups:
        params = _fit_groups(grid, w, imatrix_weights(w, importance))
        scale.copy_(params.scale)
        offset.copy_(params.offset)
        extra.update(params.extra)
        fitted = [True] * n_groups

    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
    else:
        perm = torch.arange(cols, device=w.device)
    position = torch.empty_like(perm)
    position[perm] = torch.arange(cols, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    hinv = _damped_inverse_cholesky(h, damp)

    levels = torch.zeros(rows, cols, device=w.device)
    qweight = torch.zeros(rows, cols, device=w.device)
    sub_of = perm // grid.sub_size
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        count = stop - start
        block = w[:, start:stop].clone()
        errors = torch.zeros(rows, count, device=w.device)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(count):
            column = start + i
            group = int(group_of[perm[column]])
            if not fitted[group]:
                # Current values of the group's columns: those in this block are up to date in
                # `block`; later ones still owe this block's pending updates.
                first = group * grid.group_size
                members = position[first:min(first + grid.group_size, cols)]
                current = w[:, members].clone()
                inside = members < stop
                if inside.any():
                    current[:, inside] = block[:, members[inside] - start]
                outside = ~inside
                if outside.any() and i > 0:
                    current[:, outside] -= errors[:, :i] @ hinv[start:column][:, members[outside]]
                fit_group(group, current)
            sub = int(sub_of[column])
            col = block[:, i]
            col_scale = scale[:, sub]
            col_offset = offset[:, sub]
            q_level, q_value = grid.round(col, col_scale, col_offset)
            levels[:, column] = q_level
            qweight[:, column] = q_value
            err = (col - q_value) / hinv_block[i, i]
            block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]

    qweight = qweight[:, position]
    levels = levels[:, position]
    return QuantResult(qweight, levels.to(_levels_dtype(grid)), scale, offset, extra,
                       perm if act_order else None)


def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, result: QuantResult,
                 memory_bytes: int = 512 * 2**20) -> QuantResult:
    """The levels kept, every row's scales re-fitted jointly by least squares on the layer output
    error (W - s*U) H (W - s*U)^T, U the grid's unit values of the levels.

    GPTQ picks a block's scale before its error feedback has moved the weights; once all levels are
    fixed, the best scales for them solve a small linear system per row (one unknown per sub-block),
    which lowers the output error GPTQ was minimizing. Grids without ``unit_values`` (free offsets)
    come back unchanged; so does a row whose new scales the format could not store (sign flips on
    positive-scale grids) or that would not improve after rounding the scales."""
    unit = grid.unit_values(result.levels)
    if unit is None:
        return result
    rows, cols = weight.shape
    size = grid.sub_size
    n_sub = result.scale.shape[1]
    pad = n_sub * size - cols
    w = weight.to(torch.float32)
    h = hessian.to(w.device, torch.float32)
    if pad:
        w, unit = _pad_columns(w, size), _pad_columns(unit, size)
        h = torch.nn.functional.pad(h, (0, pad, 0, pad))
    scale = result.scale.clone()
    wh = w @ h
    ridge = 1e-6 * torch.diagonal(h).mean().clamp_min(1e-30)
    # Rows per step: each holds an n_sub x n_sub system and two rows of temporaries (a 70B down_proj
    # in 32-blocks: 896 x 896 floats a row).
    rows_per_step = max(1, memory_bytes // (4 * (n_sub * n_sub + 2 * n_sub * size)))
    for first in range(0, rows, rows_per_step):
        part = slice(first, min(first + rows_per_step, rows))
        u = unit[part]
        # normal[r, a, b] = sum over columns i of sub a and j of sub b of u[r,i] h[i,j] u[r,j]
        normal = torch.empty(u.shape[0], n_sub, n_sub, device=w.device)
        for b in range(n_sub):
            cols_b = slice(b * size, (b + 1) * size)
            hu = u[:, cols_b] @ h[cols_b, :]                       # [r, cols]
            normal[:, b, :] = (hu * u).reshape(-1, n_sub, size).sum(-1)
        rhs = (wh[part] * u).reshape(-1, n_sub, size).sum(-1)
        empty = torch.diagonal(normal, dim1=1, dim2=2) <= 0
        normal = normal + torch.diag_embed(torch.where(empty, torch.ones_like(rhs), torch.full_like(rhs, ridge)))
        new = torch.linalg.solve(normal, rhs.unsqueeze(-1)).squeeze(-1)
        old = scale[part]
        new = torch.where(empty, old, new)
        new = _store(new, grid.scale_dtype)
        if not grid.negative_scales:
            new = torch.where(new > 0, new, old)
        # keep a row's new scales only where its error actually dropped
        def error(s: torch.Tensor) -> torch.Tensor:
            diff = w[part] - _expand(s, size, n_sub * size) * u
            return ((diff @ h) * diff).sum(-1)
        better = error(new) < error(old)
        scale[part] = torch.where(better.unsqueeze(-1), new, old)
    values = _expand(scale, size, cols) * unit[:, :cols]
    return QuantResult(values, result.levels, scale, grid.offset_for(scale), result.extra, result.perm)


def layer_output_error(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor) -> float:
    """||X W^T - X Q^T||_F^2 / ||X W^T||_F^2 from H = X^T X, without X."""
    hessian = hessian.to(weight.device, torch.float64)   # statistics may be kept on the CPU
    diff = (weight.to(torch.float64) - qweight.to(weight.device, torch.float64))
    num = torch.einsum("ij,jk,ik->", diff, hessian, diff)
    ref = torch.einsum("ij,jk,ik->", weight.to(torch.float64), hessian, weight.to(torch.float64))
    return float(num / ref) if float(ref) > 0 else 0.0
