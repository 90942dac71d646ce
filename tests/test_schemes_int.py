"""Round-trip properties of every safetensors scheme (nf4, fp4, int8-sym, int8-asym, int4-sym,
int4-asym) on shapes that are not multiples of the block/group size, all-zero rows and
bf16/fp16/fp32 inputs, with the error bounds each scheme guarantees; plus compressed-tensors'
packing and dequantization as the reference for the integer layouts."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qtool.schemes.base import get_scheme
from qtool.schemes.int4 import dequantize_int, pack_int32, unpack_int32
from qtool.schemes.nf4 import block_absmax

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative rounding of the result to its dtype (half an ulp).
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

shapes = st.tuples(st.integers(1, 40), st.integers(1, 300))


def random_weight(shape: tuple[int, int], dtype: torch.dtype, seed: int, zero_rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator) * torch.rand(shape[0], 1, generator=generator) * 0.2
    weight[:min(zero_rows, shape[0])] = 0
    return weight.to(dtype)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), zero_rows=st.integers(0, 2),
       scheme=st.sampled_from(["nf4", "fp4"]), block_size=st.sampled_from([32, 64, 128]),
       double_quant=st.booleans())
def test_4bit_round_trip(shape, dtype, seed, zero_rows, scheme, block_size, double_quant):
    weight = random_weight(shape, dtype, seed, zero_rows)
    packed = get_scheme(scheme).quantize(weight, block_size=block_size, double_quant=double_quant)
    restored = get_scheme(scheme).dequantize(packed)
    assert restored.shape == weight.shape and restored.dtype == dtype
    assert packed.data.numel() == (weight.numel() + 1) // 2
    # Each value becomes a code of its block times the block's (restored) absmax: the error is at
    # most half the widest gap between neighbouring codes, times that absmax.
    code = packed.quant_map.sort().values
    max_half_gap = float((code[1:] - code[:-1]).max()) / 2
    absmax = block_absmax(packed)
    flat = weight.reshape(-1).float()
    n = flat.numel()
    per_element = absmax.repeat_interleave(block_size)[:n]
    true_absmax = torch.nn.functional.pad(flat.abs(), (0, absmax.numel() * block_size - n)).view(-1, block_size)
    true_absmax = true_absmax.amax(1).repeat_interleave(block_size)[:n]
    error = (flat - restored.reshape(-1).float()).abs()
    # Double quantization moves the absmax itself (by at most its 8-bit step); count that too.
    bound = torch.maximum(per_element, true_absmax) * max_half_gap + (per_element - true_absmax).abs() + flat.abs() * HALF_ULP[dtype] * 2 + 1e-12
    assert bool((error <= bound).all())
    # All-zero rows stay exactly zero when blocks do not straddle into non-zero data.
    if zero_rows and shape[1] % block_size == 0 and not double_quant:
        assert bool((restored[:zero_rows] == 0).all())


@settings(max_examples=40, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), zero_rows=st.integers(0, 2))
def test_int8_sym_round_trip(shape, dtype, seed, zero_rows):
    weight = random_weight(shape, dtype, seed, zero_rows)
    packed = get_scheme("int8-sym").quantize(weight)
    assert packed.weight.dtype == torch.int8 and int(packed.weight.abs().max()) <= 127
    restored = get_scheme("int8-sym").dequantize(packed)
    assert restored.dtype == dtype and restored.shape == weight.shape
    scale = (packed.scb / 127).unsqueeze(1)
    # bitsandbytes quantizes the float16 copy of the weight; |w16 - deq| <= scale / 2 per element.
    weight16 = weight.to(torch.float16).float()
    error = (weight16 - restored.float()).abs()
    # Plus the rounding of the result to ``dtype``: relative for normal values, half the subnormal
    # spacing (absolute) for subnormal ones.
    info = torch.finfo(dtype)
    bound = (scale / 2 * (1 + 1e-5) + restored.float().abs() * HALF_ULP[dtype] * 2
             + info.smallest_normal * info.eps / 2 + 1e-12)
    assert bool((error <= bound).all())
    assert bool((restored[:zero_rows] == 0).all())


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1), zero_rows=st.integers(0, 2),
       scheme=st.sampled_from(["int8-asym", "int4-sym", "int4-asym"]), group_size=st.sampled_from([32, 64, 128]))
def test_integer_round_trip(shape, dtype, seed, zero_rows, scheme, group_size):
    weight = random_weight(shape, dtype, seed, zero_rows)
    packed = get_scheme(scheme).quantize(weight, group_size=group_size)
    bits = packed.bits
    assert int(packed.q.min()) >= -(1 << (bits - 1)) and int(packed.q.max()) <= (1 << (bits - 1)) - 1
    assert packed.scale.dtype == dtype and bool((packed.scale > 0).all())
    restored = get_scheme(scheme).dequantize(packed)
    assert restored.dtype == dtype and restored.shape == weight.shape
    size = shape[1] if packed.group_size is None else packed.group_size
    scale = packed.scale.float().repeat_interleave(size, dim=1)[:, :shape[1]]
    error = (weight.float() - restored.float()).abs()
    bound = scale / 2 * (1 + 1e-5) + weight.float().abs() * HALF_ULP[dtype] * 2 + 1e-12
    assert bool((error <= bound).all())
    assert bool((restored[:zero_rows] == 0).all())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 31, 32, 33, 200])
def test_pack_int32_matches_compressed_tensors(bits, cols):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    generator = torch.Generator().manual_seed(cols)
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=generator, dtype=torch.int8)
    packed = pack_int32(values, bits)
    assert torch.equal(packed, helpers.pack_to_int32(values, bits))
    assert torch.equal(unpack_int32(packed, bits, cols), values)
    assert torch.equal(helpers.unpack_from_int32(packed, bits, torch.Size((5, cols))), values)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme,strategy", [("int8-asym", "channel"), ("int4-sym", "group"), ("int4-asym", "group")])
def test_dequantize_matches_compressed_tensors(scheme, strategy, dtype):
    forward = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs

    weight = random_weight((48, 256), dtype, 7, 1)
    packed = get_scheme(scheme).quantize(weight, group_size=64)
    args = QuantizationArgs(num_bits=packed.bits, symmetric=packed.symmetric, strategy=strategy,
                            group_size=64 if strategy == "group" else None)
    reference = forward.dequantize(packed.q, packed.scale, packed.zero_point, args)
    assert reference.dtype == dtype
    assert torch.equal(dequantize_int(packed), reference)


def test_schemes_refuse_what_they_cannot_quantize():
    with pytest.raises(ValueError):
        get_scheme("nf4").quantize(torch.randn(4, 64), block_size=48)
    with pytest.raises(ValueError):
        get_scheme("int4-sym").quantize(torch.randn(64))
    with pytest.raises(ValueError):
        get_scheme("int8-sym").quantize(torch.randn(64))
    with pytest.raises(ValueError):
        get_scheme("nf4").quantize(torch.randint(0, 5, (4, 64)))


def test_registry_families():
    families = {name: get_scheme(name).family for name in ("nf4", "fp4", "int8-sym", "int8-asym", "int4-sym",
                                                           "int4-asym")}
    assert families == {"nf4": "bnb", "fp4": "bnb", "int8-sym": "bnb", "int8-asym": "compressed",
                        "int4-sym": "compressed", "int4-asym": "compressed"}


@pytest.mark.parametrize("preset", ["nf4", "fp4", "int8", "int8-asym", "int4", "int4-asym"])
def test_presets_name_registered_schemes(preset):
    from pathlib import Path

    from qtool.plan import Recipe

    recipe = Recipe.from_yaml(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.yaml")
    assert recipe.format == "safetensors"
    scheme = get_scheme(recipe.scheme)
    packed = scheme.quantize(torch.randn(8, 256), **recipe.params)
    assert scheme.dequantize(packed).shape == (8, 256)
