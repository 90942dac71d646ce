"""Lay out the levels and scales a calibration method chose in the scheme's packed format.

A format's own ``quantize`` derives the scales from the weight (round to nearest); a calibrated
result must keep the scales GPTQ / the importance search chose, so it is packed here from
``QuantResult`` with the format's byte helpers. The tests check every layout by dequantizing the
packed result with the format's reference (gguf-py, the scheme's ``dequantize``).
"""
from __future__ import annotations

from typing import Any

import torch

from qtool.errors import BadArgument
from qtool.plan import TensorPlan
from qtool.schemes.gptq import QuantResult


def _blocks(tensor: torch.Tensor, block: int) -> torch.Tensor:
    return tensor.reshape(-1, block)


def pack_ggml(type_name: str, result: QuantResult) -> Any:
    from qtool.schemes.ggml import GGMLTensor, fp16_bytes, pack_bits, pack_nibbles

    rows, cols = result.levels.shape
    if cols % 32:
        raise BadArgument(f"{type_name} needs rows that are a multiple of 32 elements; got {cols}")
    levels = _blocks(result.levels.to(torch.uint8), 32)
    scale = result.scale.reshape(-1, 1).to(torch.float32)
    offset = result.offset.reshape(-1, 1).to(torch.float32)
    if type_name == "Q4_0":
        parts = [fp16_bytes(scale), pack_nibbles(levels[:, :16], levels[:, 16:])]
    elif type_name == "Q4_1":
        parts = [fp16_bytes(scale), fp16_bytes(offset), pack_nibbles(levels[:, :16], levels[:, 16:])]
    elif type_name == "Q5_0":
        parts = [fp16_bytes(scale), pack_bits(levels >> 4), pack_nibbles(levels[:, :16], levels[:, 16:])]
    elif type_name == "Q5_1":
        parts = [fp16_bytes(scale), fp16_bytes(offset), pack_bits(levels >> 4),
                 pack_nibbles(levels[:, :16], levels[:, 16:])]
    elif type_name == "IQ4_NL":
        parts = [fp16_bytes(scale), pack_nibbles(levels[:, :16], levels[:, 16:])]
    elif type_name == "Q8_0":
        signed = (levels.to(torch.int16) - 127).to(torch.int8).view(torch.uint8)
        parts = [fp16_bytes(scale), signed]
    else:
        raise BadArgument(f"packing calibrated {type_name} tensors is not supported yet; use --method rtn")
    data = torch.cat(parts, dim=-1).reshape(rows, -1)
    return GGMLTensor(type_name, (rows, cols), data)


def pack_kquant(type_name: str, result: QuantResult) -> Any:
    """Q4_K / Q5_K from a KQuantGrid result: its fp16 d/dmin per super-block, 6-bit sub-block scale
    and min codes, and levels, in block_q4_K / block_q5_K's layout."""
    from qtool.schemes.ggml import GGMLTensor, fp16_bytes
    from qtool.schemes.ggml_kquants import pack_k_blocks

    rows, cols = result.levels.shape
    if cols % 256:
        raise BadArgument(f"{type_name} needs rows that are a multiple of 256 elements; got {cols}")
    data = pack_k_blocks(fp16_bytes(result.extra["d"].reshape(-1, 1).to(torch.float32)),
                         fp16_bytes(result.extra["dmin"].reshape(-1, 1).to(torch.float32)),
                         _blocks(result.extra["sub_scale"], 8), _blocks(result.extra["sub_min"], 8),
                         _blocks(result.levels, 256), five_bit=type_name == "Q5_K").reshape(rows, -1)
    return GGMLTensor(type_name, (rows, cols), data)


def pack_int(scheme: str, result: QuantResult, group_size: int, dtype: torch.dtype) -> Any:
    """compressed-tensors int4 groups (qtool.schemes.int4.PackedInt): signed levels and zero points."""
    from qtool.schemes.int4 import PackedInt

    rows, cols = result.levels.shape
    if scheme == "int4-sym":
        q = result.levels.to(torch.int16) - 8
        zero_point = None
    elif scheme == "int4-asym":
        q = result.levels.to(torch.int16) - 8
        zero_point = (result.extra["zero_point"].to(torch.int16) - 8).to(torch.int8)
    else:
        raise BadArgument(f"packing calibrated {scheme} tensors is not supported yet; use --method rtn")
    # The grid chose scales already rounded to bfloat16, which float16/float32 hold exactly.
    return PackedInt(q=q.to(torch.int8).contiguous(), scale=result.scale.to(dtype), zero_point=zero_point,
                     bits=4, group_size=group_size, shape=(rows, cols), dtype=dtype)


def pack_4bit(plan: TensorPlan, result: QuantResult, dtype: torch.dtype) -> Any:
    """bitsandbytes NF4 / FP4 (qtool.schemes.nf4.Packed4bit) from a Bnb4bitGrid result: the absmax of
    each block is the chosen scale (bitsandbytes decodes absmax * code[nibble]); with double quant,
    the 8-bit codes, nested absmax and offset the grid decoded its scales from."""
    from qtool.schemes.nf4 import Packed4bit, code_4bit, dynamic_map

    block_size = int(plan.params.get("block_size", 64))
    double_quant = bool(plan.params.get("double_quant", True))
    rows, cols = result.levels.shape
    if cols % block_size:
        # bitsandbytes' blocks run over the flattened weight; the grid's blocks are within rows.
        raise BadArgument(f"--block-size {block_size}: calibrated {plan.scheme} needs rows that are a multiple "
                          f"of the block size; {plan.name} has {cols} columns (use --method rtn or another block size)")
    if double_quant != ("absmax_codes" in result.extra):
        raise ValueError(f"{plan.name}: the result's double quantization does not match the plan's")
    code = code_4bit(plan.scheme)
    # Grid levels index the code sorted ascending; the stored nibble indexes bitsandbytes' code.
    nibble_of_level = torch.argsort(code, stable=True).to(torch.uint8)
    nibbles = nibble_of_level[result.levels.reshape(-1).long()]
    if nibbles.numel() % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    pairs = nibbles.view(-1, 2)
    data = ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1)
    packed = Packed4bit(quant_type=plan.scheme, data=data, absmax=result.scale.reshape(-1).to(torch.float32),
                        block_size=block_size, shape=(rows, cols), dtype=dtype, quant_map=code)
    if double_quant:
        packed.absmax = result.extra["absmax_codes"].reshape(-1).to(torch.uint8)
        packed.nested_absmax = result.extra["nested_absmax"].reshape(-1).to(torch.float32)
        packed.nested_quant_map = dynamic_map()
        packed.nested_offset = float(result.extra["nested_offset"])
    return packed


def pack_int8_channel(result: QuantResult, dtype: torch.dtype) -> Any:
    """compressed-tensors int8 per output channel, symmetric (w8a8): levels 0..254 are q = level - 127."""
    from qtool.schemes.int4 import PackedInt

    rows, cols = result.levels.shape
    q = (result.levels.to(torch.int16) - 127).to(torch.int8).contiguous()
    # The grid chose scales already rounded to bfloat16, which float16/float32 hold exactly.
    return PackedInt(q=q, scale=result.scale.reshape(rows, 1).to(dtype), zero_point=None, bits=8, group_size=None,
                     shape=(rows, cols), dtype=dtype)


_PACKERS: dict[str, Any] = {
    **{name: lambda plan, result, dtype: pack_ggml(plan.scheme, result)
       for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")},
    **{name: lambda plan, result, dtype: pack_kquant(plan.scheme, result) for name in ("Q4_K", "Q5_K")},
    **{name: lambda plan, result, dtype: pack_int(plan.scheme, result, int(plan.params.get("group_size", 128)), dtype)
       for name in ("int4-sym", "int4-asym")},
    "w8a8": lambda plan, result, dtype: pack_int8_channel(result, dtype),
    **{name: pack_4bit for name in ("nf4", "fp4")},
}


def pack_result(plan: TensorPlan, result: QuantResult, dtype: torch.dtype = torch.float32) -> Any:
    """The packed object the plan's sink writes, holding exactly ``result``'s grid.
    ``dtype``: the source weight's dtype (compressed-tensors stores scales in it)."""
    packer = _PACKERS.get(plan.scheme)
    if packer is None:
        raise BadArgument(f"packing calibrated {plan.scheme} tensors is not supported yet; use --method rtn")
    return packer(plan, result, dtype)


def check_packable(plans: list[TensorPlan], method: str) -> None:
    """Refuse, before any calibration work, a plan whose calibrated decoder-block tensors could not
    be written (embeddings and the head are not calibrated: the sink rounds them to nearest)."""
    from qtool.plan import layer_index

    for plan in plans:
        if not plan.keep and layer_index(plan.name) is not None and plan.scheme not in _PACKERS:
            raise BadArgument(f"--method {method}: calibrated {plan.scheme} tensors cannot be written yet "
                              f"({plan.name}); use --method rtn, or a scheme such as w8a8 or int4-sym")
