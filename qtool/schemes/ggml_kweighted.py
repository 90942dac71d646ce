"""The K-quants with an importance matrix: llama.cpp's quantize_row_q{2,3,4,5,6}_K_impl, operation by
operation, as pure torch numerics (any device; cpu_ggml.c's ``*_weighted`` functions are the same on the
CPU).

With an importance matrix llama-quantize quantizes every K-quant tensor this way (without one it takes
its reference quantizers, which qtool's own searches in ggml_kquants.py beat). Equal bytes make a mix
quantized with llama.cpp's imatrix llama.cpp's own file, tensor for tensor (tests compare against
libggml). Sums run left to right in float32 as the C loops add: the comparisons between candidate scales
depend on the exact sums. Each function returns the block fields; ggml_kquants.py lays out the bytes.
"""
from __future__ import annotations

import torch

from qtool.schemes.ggml import QK_K, fp16_bytes, fp16_from_bytes
from qtool.schemes.ggml_iquants import qp_quants
from qtool.schemes.ggml_search import (GROUP_MAX_EPS, exact_sqrt, nearest_int, number, qkx3_quants, qx_quants,
                                      sequential_sum)


def element_weights(blocks: torch.Tensor, importance: torch.Tensor, sigma2_factor: int) -> torch.Tensor:
    """importance * sqrt(sigma2 + x^2) per element of super-blocks (n, 256), sigma2 the block's mean
    square times ``sigma2_factor`` (1 for Q2_K, 2 for Q3_K/Q4_K/Q5_K)."""
    sigma2 = sequential_sum(blocks * blocks) * (sigma2_factor / QK_K)
    return importance * exact_sqrt(sigma2 + blocks * blocks)


def _requantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor,
                low: int, high: int) -> torch.Tensor:
    """The levels again for the decoded sub-block scales: rint((x + offset) / scale) clamped to
    [low, high]; a sub-block whose scale decodes to 0 keeps its search levels."""
    nonzero = scale != 0
    again = nearest_int((x + offset) / torch.where(nonzero, scale, torch.ones_like(scale))).clamp_(low, high)
    return torch.where(nonzero, again, levels)


def q2_k_fields(blocks: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q2_K: (scale codes, min codes (n, 16), levels 0..3 (n, 256), fp16 bytes of d, of dmin (n, 2))."""
    n_blocks = blocks.shape[0]
    weights = element_weights(blocks, importance, 1).reshape(-1, 16)
    x = blocks.reshape(-1, 16)
    scales, mins, levels = qkx3_quants(x, weights, 3)
    sub_weights = sequential_sum(weights).reshape(n_blocks, 16)
    d, ls = qp_quants(scales.reshape(n_blocks, 16), sub_weights, 15)
    dmin, lm = qp_quants(mins.reshape(n_blocks, 16), sub_weights, 15)
    d_raw, dmin_raw = fp16_bytes(d), fp16_bytes(dmin)
    # The stored byte is ls | lm << 4 in uint8: what the requantization reads back.
    packed = (ls.long() | (lm.long() << 4)) & 0xFF
    scale = fp16_from_bytes(d_raw).unsqueeze(-1) * (packed & 0xF).unsqueeze(-1)
    offset = fp16_from_bytes(dmin_raw).unsqueeze(-1) * (packed >> 4).unsqueeze(-1)
    levels = _requantize(blocks.reshape(n_blocks, 16, 16), scale, offset, levels.reshape(n_blocks, 16, 16), 0, 3)
    return packed & 0xF, packed >> 4, levels.reshape(n_blocks, QK_K), d_raw, dmin_raw


def q3_k_fields(blocks: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q3_K: (scale codes 0..63 (n, 16), levels 0..7 (n, 256), fp16 bytes of d (n, 2))."""
    n_blocks = blocks.shape[0]
    weights = element_weights(blocks, importance, 2).reshape(-1, 16)
    scales, levels = qx_quants(blocks.reshape(-1, 16), weights, 4)
    sub_weights = sequential_sum(weights).reshape(n_blocks, 16)
    d, codes = qx_quants(scales.reshape(n_blocks, 16), sub_weights, 32)
    d_raw = fp16_bytes(d)
    scale = (fp16_from_bytes(d_raw) * (codes - 32)).unsqueeze(-1)
    levels = _requantize(blocks.reshape(n_blocks, 16, 16), scale, torch.zeros_like(scale),
                         levels.reshape(n_blocks, 16, 16) - 4, -4, 3) + 4
    return codes, levels.reshape(n_blocks, QK_K), d_raw


def k32_fields(blocks: torch.Tensor, importance: torch.Tensor, nmax: int) -> tuple[torch.Tensor, ...]:
    """Q4_K (nmax 15) / Q5_K (31): (scale codes, min codes (n, 8) as stored in their 6-bit fields,
    levels (n, 256), fp16 bytes of d, of dmin (n, 2))."""
    n_blocks = blocks.shape[0]
    weights = element_weights(blocks, importance, 2).reshape(-1, 32)
    scales, mins, levels = qkx3_quants(blocks.reshape(-1, 32), weights, nmax)
    sub_weights = sequential_sum(weights).reshape(n_blocks, 8)
    d, ls = qp_quants(scales.reshape(n_blocks, 8), sub_weights, 63)
    dmin, lm = qp_quants(mins.reshape(n_blocks, 8), sub_weights, 63)
    ls, lm = ls.long(), lm.long()
    if nmax == 31:          # Q5_K clamps its codes to 6 bits; Q4_K stores them as they are
        ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    d_raw, dmin_raw = fp16_bytes(d), fp16_bytes(dmin)
    scale = (fp16_from_bytes(d_raw) * _six_bit_fields(ls)).unsqueeze(-1)
    offset = (fp16_from_bytes(dmin_raw) * _six_bit_fields(lm)).unsqueeze(-1)
    levels = _requantize(blocks.reshape(n_blocks, 8, 32), scale, offset, levels.reshape(n_blocks, 8, 32), 0, nmax)
    return ls, lm, levels.reshape(n_blocks, QK_K), d_raw, dmin_raw


def _six_bit_fields(codes: torch.Tensor) -> torch.Tensor:
    """The values get_scale_min_k4 reads back for codes (n, 8) that the 12-byte layout stores (a code
    over 63, which make_qp_quants' uint8 levels allow, spills into its neighbour's top bits): codes
    0-3 whole in a byte whose top two bits hold bits 4-5 of codes 4-7, codes 4-7 as a nibble."""
    first, last = codes[:, :4], codes[:, 4:]
    shared = (first | ((last >> 4) << 6)) & 0xFF
    return torch.cat([first & 0x3F, (last & 0xF) | ((shared >> 6) << 4)], dim=-1)


def q6_k_fields(blocks: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Q6_K: (int8 scale codes (n, 16), levels 0..63 (n, 256), fp16 bytes of d (n, 2)); a block whose
    sub-block scales are all below GROUP_MAX_EPS is all zero bytes."""
    n_blocks = blocks.shape[0]
    scales, levels = qx_quants(blocks.reshape(-1, 16), importance.reshape(-1, 16), 32)
    scales = scales.reshape(n_blocks, 16)
    peak = scales.gather(-1, scales.abs().argmax(dim=-1, keepdim=True))
    empty = peak.abs() < GROUP_MAX_EPS
    inverse = number(-128.0, peak) / torch.where(empty, torch.ones_like(peak), peak)
    d_raw = fp16_bytes(torch.where(empty, torch.zeros_like(peak), 1 / inverse))
    codes = nearest_int(inverse * scales).clamp_(max=127)
    codes = torch.where(empty, torch.zeros_like(codes), codes)
    scale = (fp16_from_bytes(d_raw) * codes).unsqueeze(-1)
    levels = _requantize(blocks.reshape(n_blocks, 16, 16), scale, torch.zeros_like(scale),
                         levels.reshape(n_blocks, 16, 16) - 32, -32, 31) + 32
    levels = torch.where(empty.unsqueeze(-1), torch.zeros_like(levels), levels)
    return codes, levels.reshape(n_blocks, QK_K), d_raw
