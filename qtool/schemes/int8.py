"""8-bit per-output-channel schemes.

- ``int8-sym``: bitsandbytes' LLM.int8 weight layout (``Int8Params``): ``weight`` int8 and
  ``SCB`` = the row absmax (float32); q = round(w * (127 / SCB)). bitsandbytes first casts the
  weight to float16, so we do the same (identical bytes to ``int8_vectorwise_quant``); a weight
  beyond float16's range, where bitsandbytes would produce inf, is quantized from float32 instead.
- ``int8-asym``: compressed-tensors' channel strategy with a zero point (see int4.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qtool.schemes.base import Scheme, register
from qtool.schemes.int4 import PackedInt, dequantize_int, quantize_int

_FP16_MAX = 65504.0
# bitsandbytes dequantizes with this float constant (1/127) after multiplying by SCB.
_INV_127 = 7.874015718698502e-3


@dataclass
class PackedInt8Rows:
    weight: torch.Tensor    # int8 [rows, cols]
    scb: torch.Tensor       # float32 [rows]: absmax of each row
    shape: tuple[int, ...]
    dtype: torch.dtype


def quantize_int8_rows(weight: torch.Tensor) -> PackedInt8Rows:
    if weight.dim() < 2:
        raise ValueError(f"int8-sym quantizes matrices, got shape {tuple(weight.shape)}")
    matrix = weight.reshape(weight.shape[0], -1)
    if matrix.dtype == torch.float16 or bool(matrix.abs().max() <= _FP16_MAX):
        matrix = matrix.to(torch.float16)
    else:
        matrix = matrix.float()
    scb = matrix.abs().amax(dim=1).float()
    # A zero row has SCB 0: bitsandbytes gets 0 * inf = nan there; we write zeros.
    ratio = torch.where(scb > 0, 127.0 / scb, torch.zeros_like(scb))
    q = torch.round(matrix * ratio.unsqueeze(1)).to(torch.int8)
    return PackedInt8Rows(weight=q, scb=scb, shape=tuple(weight.shape), dtype=weight.dtype)


def dequantize_int8_rows(packed: PackedInt8Rows) -> torch.Tensor:
    values = packed.weight * packed.scb.unsqueeze(1) * _INV_127
    return values.to(packed.dtype).reshape(packed.shape)


@register
class Int8Sym(Scheme):
    name = "int8-sym"
    family = "bnb"
    bits = 8.0

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedInt8Rows:
        return quantize_int8_rows(weight)

    def dequantize(self, packed: PackedInt8Rows) -> torch.Tensor:
        return dequantize_int8_rows(packed)


@register
class Int8Asym(Scheme):
    name = "int8-asym"
    family = "compressed"
    bits = 8.0

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedInt:
        return quantize_int(weight, 8, symmetric=False, group_size=None)

    def dequantize(self, packed: PackedInt) -> torch.Tensor:
        return dequantize_int(packed)
