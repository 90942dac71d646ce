"""NF4 / FP4 (with and without double quantization) and int8-sym against bitsandbytes itself:
the packed bytes, absmax, nested absmax, offset and maps must be identical."""
from __future__ import annotations

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from qtool.schemes import nf4  # noqa: E402
from qtool.schemes.int8 import dequantize_int8_rows, quantize_int8_rows  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_same_as_bnb(weight: torch.Tensor, quant_type: str, block_size: int, double_quant: bool,
                       check_dequant: bool = True) -> None:
    ref_data, ref_state = bnb_functional.quantize_4bit(weight, blocksize=block_size,
                                                        compress_statistics=double_quant, quant_type=quant_type)
    ours = nf4.quantize_4bit(weight, quant_type, block_size, double_quant)
    assert torch.equal(ours.data, ref_data), "packed 4-bit data differ"
    assert ours.absmax.dtype == ref_state.absmax.dtype
    assert torch.equal(ours.absmax, ref_state.absmax), "absmax differ"
    assert torch.equal(ours.quant_map, ref_state.code), "quant map differs"
    assert ours.block_size == ref_state.blocksize and ours.dtype == ref_state.dtype
    assert ours.shape == tuple(ref_state.shape)
    if double_quant:
        assert ours.nested_offset == ref_state.offset.item(), "offset differs"
        assert torch.equal(ours.nested_absmax, ref_state.state2.absmax), "nested absmax differ"
        assert torch.equal(ours.nested_quant_map, ref_state.state2.code), "nested quant map differs"
        assert ours.nested_block_size == ref_state.state2.blocksize
    else:
        assert ours.nested_absmax is None and ref_state.state2 is None
    # Our dequantization equals bitsandbytes' on the same packed state. (Its CPU kernel walks
    # blocks row by row, so it is only right when blocks do not straddle rows; there we compare.)
    if check_dequant and weight.shape[-1] % block_size == 0:
        ref_weight = bnb_functional.dequantize_4bit(ref_data, ref_state)
        assert torch.equal(nf4.dequantize_4bit(ours), ref_weight.reshape(weight.shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("shape,block_size", [
    ((256, 128), 64),        # whole blocks, several nested blocks
    ((300, 96), 64),         # 450 blocks: partial nested block
    ((7, 9), 64),            # one partial 4-bit block, odd element count
    ((1, 1), 32),
    ((3, 16389), 32),        # partial last block, more than one chunk of nested blocks
    ((64, 64), 4096),        # a block bigger than the tensor
    ((33, 1000), 128),
])
def test_4bit_identical_to_bitsandbytes(shape, block_size, quant_type, double_quant, dtype):
    generator = torch.Generator().manual_seed(hash((shape, block_size)) % 2**31)
    # Rows of very different magnitude spread the absmax, as in real weights.
    weight = torch.randn(shape, generator=generator) * torch.rand(shape[0], 1, generator=generator) * 0.1
    assert_same_as_bnb(weight.to(dtype), quant_type, block_size, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_edge_values_identical(quant_type):
    """Values exactly on code midpoints, signed zeros, tiny values, all-zero blocks and a tensor whose
    blocks share one absmax (nested values all zero)."""
    bounds, order = nf4._bounds_4bit(quant_type, torch.device("cpu"))
    block = torch.cat([bounds, -bounds, torch.tensor([1.0, -1.0, 0.0, -0.0, 1e-30, -1e-30, 0.003, -0.003])])
    block = torch.nn.functional.pad(block, (0, 64 - block.numel()))
    weight = torch.stack([block, torch.zeros(64), block * 0.5, -block]).repeat(70, 1)
    for double_quant in (True, False):
        assert_same_as_bnb(weight, quant_type, 64, double_quant)
        assert_same_as_bnb(torch.zeros(32, 64), quant_type, 64, double_quant)
        assert_same_as_bnb(torch.ones(32, 64), quant_type, 64, double_quant)


def test_code_tables_match_bitsandbytes():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    for quant_type in ("nf4", "fp4"):
        assert torch.equal(nf4.code_4bit(quant_type), bnb_functional.get_4bit_type(quant_type, device="cpu"))
        ref_bounds, _ = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
        assert torch.equal(nf4._bounds_4bit(quant_type, torch.device("cpu"))[0], ref_bounds)
    assert torch.equal(nf4.dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("block_size", [64, 256, 4096])
def test_nested_8bit_identical_to_quantize_blockwise(block_size):
    generator = torch.Generator().manual_seed(block_size)
    values = torch.randn(10_000, generator=generator) * torch.rand(10_000, generator=generator)
    codes, absmax = nf4.quantize_dynamic(values, block_size)
    ref_codes, ref_state = bnb_functional.quantize_blockwise(values, blocksize=block_size)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(absmax, ref_state.absmax)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_sym_identical_to_bitsandbytes(dtype):
    """transformers' load_in_8bit quantizes with Int8Params: float16 cast then int8_vectorwise_quant."""
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(96, 200, generator=generator) * 0.05).to(dtype)
    ref_q, ref_scb, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
    packed = quantize_int8_rows(weight)
    assert torch.equal(packed.weight, ref_q)
    assert torch.equal(packed.scb, ref_scb)
    ref_weight = bnb_functional.int8_vectorwise_dequant(ref_q, ref_scb).to(dtype)
    assert torch.equal(dequantize_int8_rows(packed), ref_weight)


@pytest.mark.slow
def test_smollm2_every_linear_identical(smollm2_gguf):
    """Acceptance: every Linear weight of the packaged SmolLM2 model, NF4 and FP4, with and without
    double quantization, byte for byte equal to bitsandbytes."""
    from qtool.plan import Recipe, build_plan
    from qtool.sources.resolve import resolve

    with resolve("smollm2-135m") as source:
        plans = build_plan(source.tensors(), Recipe(scheme="nf4"), int(source.config["num_hidden_layers"]))
        linear = [plan.name for plan in plans if not plan.keep]
        assert len(linear) == 7 * int(source.config["num_hidden_layers"])
        for name in linear:
            weight = source.load(name)
            for quant_type in ("nf4", "fp4"):
                for double_quant in (True, False):
                    assert_same_as_bnb(weight, quant_type, 64, double_quant, check_dequant=False)
