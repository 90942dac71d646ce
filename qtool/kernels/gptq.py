"""GPTQ's column loop in one Triton kernel: the columns of a lazy-update block, one after another, for a
tile of rows held in registers (what qtool.schemes.gptq's torch loop does with ~15 launches a column).

Each program holds ROWS rows of the block ([ROWS, WIDTH], WIDTH = the block width rounded up to a
power of two) and walks columns ``first .. last - 1``: the column's level on the grid (uniform:
``clamp(round((x - offset) / scale), 0, qmax)``; codebook: the number of codebook midpoints below),
its value, the error divided by the inverse-Hessian diagonal, and that error spread over the block's
later columns through the Cholesky row. The operations are the torch loop's, in float32, in the same
order (reciprocal then multiply, correctly rounded division, no fused multiply-add), so under
TRITON_INTERPRET=1 the kernel gives the torch loop's values exactly; on a GPU they agree to rounding.
The caller splits a block where a group's scales must be fitted first (act-order with groups fitted
on the fly) and calls the kernel once per piece.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qtool.kernels import launch
from qtool.kernels.integer import _clamp, _rint

_ROWS = 16


# Not specialized on the values that change from piece to piece and layer to layer (Triton would compile
# a variant for each pattern of 1s and multiples of 16 among them: seconds of compiling on a model's
# first blocks).
@triton.jit(do_not_specialize=["rows", "count", "first", "last", "n_sub"])
def _columns_kernel(block_ptr, hinv_ptr, scale_ptr, offset_ptr, sub_ptr, book_ptr, levels_ptr, values_ptr,
                    errors_ptr, rows, count, first, last, n_sub, block_stride, out_stride,
                    QMAX: tl.constexpr, CODEBOOK: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, WIDTH)
    row_ok = row < rows
    inside = row_ok[:, None] & (col < count)[None, :]
    tile = tl.load(block_ptr + row[:, None] * block_stride + col[None, :], mask=inside, other=0.0)
    levels = tl.zeros([ROWS, WIDTH], dtype=tl.float32)
    values = tl.zeros([ROWS, WIDTH], dtype=tl.float32)
    errors = tl.zeros([ROWS, WIDTH], dtype=tl.float32)
    i = first
    while i < last:   # a while loop: the interpreter's range() takes no runtime bounds
        here = (col == i)[None, :]
        x = tl.sum(tl.where(here, tile, 0.0), axis=1)
        sub = tl.load(sub_ptr + i)
        scale = tl.load(scale_ptr + row * n_sub + sub, mask=row_ok, other=1.0)
        offset = tl.load(offset_ptr + row * n_sub + sub, mask=row_ok, other=0.0)
        inverse = tl.where(scale != 0, tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), scale), 0.0)
        scaled = (x - offset) * inverse
        if CODEBOOK:
            level = tl.zeros([ROWS], dtype=tl.int32)
            for k in tl.static_range(QMAX):
                middle = (tl.load(book_ptr + k) + tl.load(book_ptr + k + 1)) / 2
                level += (scaled > middle).to(tl.int32)
            value = scale * tl.load(book_ptr + level) + offset
            level_f = level.to(tl.float32)
        else:
            level_f = _clamp(_rint(scaled), 0.0, QMAX)
            value = scale * level_f + offset
        error = tl.math.div_rn(x - value, tl.load(hinv_ptr + i * count + i))
        spread = tl.load(hinv_ptr + i * count + col, mask=(col >= i) & (col < count), other=0.0)
        tile = tile - error[:, None] * spread[None, :]
        levels = tl.where(here, level_f[:, None], levels)
        values = tl.where(here, value[:, None], values)
        errors = tl.where(here, error[:, None], errors)
        i += 1
    tl.store(block_ptr + row[:, None] * block_stride + col[None, :], tile, mask=inside)
    done = row_ok[:, None] & ((col >= first) & (col < last))[None, :]
    out = row[:, None] * out_stride + col[None, :]
    tl.store(levels_ptr + out, levels, mask=done)
    tl.store(values_ptr + out, values, mask=done)
    tl.store(errors_ptr + row[:, None] * count + col[None, :], errors, mask=done)


def quantize_columns(block: torch.Tensor, hinv_block: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                     sub_of_column: torch.Tensor, codebook: torch.Tensor | None, qmax: int,
                     levels: torch.Tensor, values: torch.Tensor, errors: torch.Tensor, first: int, last: int) -> None:
    """Columns ``first .. last - 1`` of one GPTQ block, in place: ``block`` [rows, count] (updated as the
    torch loop updates it), ``levels`` / ``values`` [rows, count] views of the whole weight's outputs (row
    stride of the weight), ``errors`` [rows, count] contiguous. ``hinv_block`` [count, count] contiguous,
    ``scale`` / ``offset`` [rows, n_sub] contiguous, ``sub_of_column`` [count] int32: each column's
    sub-block. ``codebook`` (float32, qmax + 1 values) for codebook grids."""
    rows, count = block.shape
    width = triton.next_power_of_2(count)
    book = codebook if codebook is not None else scale       # unread without a codebook
    launch(_columns_kernel, (triton.cdiv(rows, _ROWS),), block, hinv_block, scale, offset, sub_of_column, book,
           levels, values, errors, rows, count, first, last, scale.shape[1], block.stride(0), levels.stride(0),
           QMAX=qmax, CODEBOOK=codebook is not None, WIDTH=width, ROWS=_ROWS, num_warps=4, enable_fp_fusion=False)
