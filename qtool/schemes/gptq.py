"""Calibration-aware weight quantization: GPTQ and importance-weighted scale search.

Both are generic over the quantization *grid*: a grid says how a group of columns of one row is
represented (a scale and an offset per sub-block, integer levels ``0..qmax``, optionally a
non-uniform codebook) and how its parameters are fitted. The grids (qtool/schemes/grids.py, and
each encoding's record: ``Scheme.calibration_grid``) mirror the formats qtool writes: int4 groups
(compressed-tensors, sym/asym), GGML 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL), K-quants
(Q4_K, Q5_K) and NF4 blocks. The result of a method is the integer levels plus the scales
and offsets it chose; the format's scheme packs those (it does not re-derive scales from the
dequantized weight, which would not give back the same grid).

Conventions: a weight is ``[rows, cols]`` (out x in, as nn.Linear stores it); every input column
``c`` belongs to sub-block ``c // sub_size``; a value is ``scale * level + offset`` (uniform grids)
or ``scale * codebook[level] + offset`` (codebook grids). Everything is pure torch, float32, on the
weight's device. GPTQ walks the columns in order (it is sequential by nature); each step is
vectorized over all rows.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

# The grids are their own module (every scheme builds on them); re-exported for the methods.
from qtool.schemes.grids import (AffineGrid, CodebookGrid, Grid, GridParams, KQuantGrid, QuantResult,  # noqa: F401
                                 SymmetricGrid, _store, search_affine, search_symmetric)


def make_grid(scheme: str, *, group_size: int | None = None, double_quant: bool = False,
              columns: int | None = None, absmax: float | None = None) -> Grid:
    """The calibration grid of a registered scheme (its record's ``calibration_grid``), for tests and
    benchmarks that name a scheme. ``double_quant``: nf4/fp4 absmaxes quantized as bitsandbytes'
    double quantization stores them; ``columns``: the weight's row length (per-channel schemes' group);
    ``absmax``: the weight's largest magnitude (NVFP4's global scale)."""
    from qtool.schemes.base import get_scheme

    grid = get_scheme(scheme).calibration_grid(group_size=group_size, double_quant=double_quant, columns=columns,
                                               absmax=absmax)
    if grid is None:
        raise ValueError(f"no calibration grid for scheme {scheme!r}")
    return grid


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


def _column_kernel(w: torch.Tensor, fused: bool | None, codebook: torch.Tensor | None):
    """The column loop in one kernel call per piece of a block, or None for the torch loop (``fused``
    False): on CUDA the Triton kernel (qtool.kernels.gptq) where Triton runs, on the CPU the C one
    (qtool.kernels.cpu.gptq_columns), both the torch loop's operations in its order. ``fused`` True also
    runs the Triton kernel on CPU tensors (under TRITON_INTERPRET=1)."""
    from qtool.kernels import triton_available

    if fused is False:
        return None
    if fused or (w.is_cuda and triton_available()):
        from qtool.kernels.gptq import quantize_columns

        return quantize_columns
    from qtool.kernels import cpu

    return cpu.gptq_columns if cpu.gptq_columns_available(w, codebook) else None


def _group_values(w: torch.Tensor, block: torch.Tensor, errors: torch.Tensor, hinv: torch.Tensor,
                  position: torch.Tensor, group: int, group_size: int, start: int, done: int) -> torch.Tensor:
    """The current values of a group's columns when its first column comes up, ``done`` columns into
    the block at ``start``: columns in the block are up to date in ``block``; later ones still owe the
    block's pending updates (``errors`` so far through the inverse Hessian). No host sync."""
    count = block.shape[1]
    members = position[group * group_size:min((group + 1) * group_size, w.shape[1])]
    inside = members < start + count
    current = torch.where(inside, block[:, (members - start).clamp(0, count - 1)], w[:, members])
    if done:
        pending = errors[:, :done] @ hinv[start:start + done][:, members]
        current = torch.where(inside, current, current - pending)
    return current


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128, static_groups: bool = False,
                  importance: torch.Tensor | None = None, damp_diag: float = 0.0, refit: bool = False,
                  fused: bool | None = None) -> QuantResult:
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
    ``fused``: the column loop in one kernel call per piece of a block (``_column_kernel``: Triton on
    CUDA, C on the CPU); False: the torch loop; True: the Triton kernel even on CPU tensors (under
    TRITON_INTERPRET=1).
    """
    if damp_diag > 0:
        hessian = hessian + damp_diag * torch.diag(torch.diagonal(hessian))
    static_groups = static_groups or grid.whole_tensor_scales
    with _few_threads(weight.device):
        result = _gptq(weight, hessian, grid, damp=damp, act_order=act_order, block_size=block_size,
                       static_groups=static_groups, importance=importance, fused=fused)
    # A few large matrix products: these want every thread, unlike GPTQ's column loop.
    return refit_scales(weight, hessian, grid, result) if refit else result


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, damp: float, act_order: bool,
          block_size: int, static_groups: bool, importance: torch.Tensor | None,
          fused: bool | None = None) -> QuantResult:
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
    # Python copies of the column bookkeeping: indexing device tensors per column would wait for the
    # GPU at every column.
    group_at = [index // grid.group_size for index in perm.tolist()]     # group of the column at each position
    sub_at = (perm // grid.sub_size).to(torch.int32)
    sub_at_list = sub_at.tolist()
    codebook = grid.codebook.to(w.device, torch.float32).contiguous() if grid.codebook is not None else None
    kernel = _column_kernel(w, fused, codebook)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        count = stop - start
        block = w[:, start:stop].clone()
        errors = torch.zeros(rows, count, device=w.device)
        hinv_block = hinv[start:stop, start:stop].contiguous()
        i = 0
        while i < count:
            group = group_at[start + i]
            if not fitted[group]:
                fit_group(group, _group_values(w, block, errors, hinv, position, group, grid.group_size, start, i))
            # The columns up to the next one whose group is not fitted yet run in one go.
            last = i + 1
            while last < count and fitted[group_at[start + last]]:
                last += 1
            if kernel is not None:
                kernel(block, hinv_block, scale, offset, sub_at[start:stop], codebook, grid.qmax,
                       levels[:, start:stop], qweight[:, start:stop], errors, i, last)
            else:
                for column in range(i, last):
                    sub = sub_at_list[start + column]
                    col = block[:, column]
                    q_level, q_value = grid.round(col, scale[:, sub], offset[:, sub])
                    levels[:, start + column] = q_level
                    qweight[:, start + column] = q_value
                    err = (col - q_value) / hinv_block[column, column]
                    block[:, column:] -= err.unsqueeze(1) * hinv_block[column, column:].unsqueeze(0)
                    errors[:, column] = err
            i = last
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
    # A report figure: float32 products (float64 ones took 5% of a GPU GPTQ run), float64 sums.
    hessian = hessian.to(weight.device, torch.float32)   # statistics may be kept on the CPU
    weight = weight.to(torch.float32)
    diff = weight - qweight.to(weight.device, torch.float32)
    num = ((diff @ hessian) * diff).sum(dtype=torch.float64)
    ref = ((weight @ hessian) * weight).sum(dtype=torch.float64)
    return float(num / ref) if float(ref) > 0 else 0.0
