"""MXFP4 (OCP microscaling): 4-bit E2M1 values in blocks of 32, each block with an E8M0 scale (a power of
two, 2^(byte - 127)). gpt-oss checkpoints ship their experts in it; read here, not written yet.

Storage as gpt-oss checkpoints have it: ``*_blocks`` uint8 [..., G, 16] (two values a byte, the even
element in the low nibble) and ``*_scales`` uint8 [..., G], blocks running along the last axis.
"""
from __future__ import annotations

import torch

# The 16 E2M1 codes: sign bit 3, exponent bits 2-1, mantissa bit 0.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32
SCALE_BIAS = 127


def unpack_e2m1(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., n / 2] (two E2M1 codes a byte, the even element low) -> E2M1 values [..., n]."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).long()
    return table[codes].to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 blocks [..., G, 16] and scales [..., G] -> values [..., G * 32] as ``dtype`` (exact in float32;
    every E2M1 value times a power of two is a bfloat16 too, save for under- and overflow)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
                         f"([..., G, {BLOCK // 2}] and [..., G])")
    exponents = scales.to(torch.int32).unsqueeze(-1) - SCALE_BIAS
    return torch.ldexp(unpack_e2m1(blocks), exponents).flatten(-2).to(dtype)      # [..., G, 32] -> [..., G * 32]
