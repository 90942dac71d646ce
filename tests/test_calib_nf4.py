"""Calibrated NF4 / FP4 (``--method imatrix|gptq`` with ``--scheme nf4|fp4``), with and without double
quantization: the packed tensors, serialized as the bitsandbytes sink writes them and decoded by
bitsandbytes itself, are exactly the weight the method returned; GPTQ beats round to nearest on the
layer-output error of real SmolLM2 layers; a whole ``qtool quantize`` output loads in transformers +
bitsandbytes and computes the logits of the dequantized weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtool.calibration.packing import pack_result
from qtool.errors import BadArgument
from qtool.plan import TensorPlan
from qtool.schemes.gptq import gptq_quantize, layer_output_error, make_grid, quantize_rtn

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _problem(rows: int, cols: int, seed: int = 0):
    """A weight with a few outliers and correlated, unevenly scaled inputs."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=generator) / cols ** 0.5
    x = (torch.randn(4 * cols, cols, generator=generator) @ mix) * (torch.rand(cols, generator=generator) * 3 + 0.05)
    w = torch.randn(rows, cols, generator=generator) * 0.05
    w[3, 17] = 0.9
    w[5] = 0                                     # an all-zero row: absmax 0 before double quant
    return w, x


def _bnb_decode(plan: TensorPlan, packed) -> torch.Tensor:
    """What transformers + bitsandbytes load from the tensors the sink writes for ``packed``."""
    from qtool.sinks.bnb import BnbSink

    tensors = BnbSink.packed_tensors(None, plan, packed)
    prefix = plan.name + "."
    state = bnb_functional.QuantState.from_dict({k[len(prefix):]: v for k, v in tensors.items() if k != plan.name},
                                                torch.device("cpu"))
    return bnb_functional.dequantize_4bit(tensors[plan.name], state)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type,block_size", [("nf4", 64), ("nf4", 128), ("fp4", 64)])
@pytest.mark.parametrize("method", ["imatrix", "gptq"])
def test_packed_result_is_the_calibrated_weight_in_bitsandbytes(method, quant_type, block_size, double_quant):
    # 600 blocks: three nested blocks of 256 absmaxes, the last one partial.
    w, x = _problem(rows=300, cols=128 if block_size == 64 else 256)
    hessian = x.T @ x
    importance = x.square().mean(0)
    grid = make_grid(quant_type, group_size=block_size, double_quant=double_quant)
    if method == "gptq":
        result = gptq_quantize(w, hessian, grid, act_order=True, importance=importance, damp_diag=1.0)
    else:
        result = quantize_rtn(w, grid, importance)
    plan = TensorPlan("model.layers.0.mlp.up_proj.weight", tuple(w.shape), quant_type,
                      {"block_size": block_size, "double_quant": double_quant})
    packed = pack_result(plan, result, torch.float32)
    assert packed.double_quant == double_quant
    assert packed.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    assert packed.data.shape == (w.numel() // 2, 1)
    decoded = _bnb_decode(plan, packed)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, result.qweight)
    # qtool's own NF4 dequantizer reads the same weight.
    from qtool.schemes.nf4 import dequantize_4bit

    assert torch.equal(dequantize_4bit(packed), result.qweight)
    # The decoded scales (what the levels were chosen for) are the result's scales; the search did
    # something: not every block keeps its plain absmax.
    plain = w.reshape(-1, block_size).abs().amax(1)
    assert not torch.equal(result.scale.reshape(-1), plain)
    # The method beats bitsandbytes' own round to nearest on the output error it targets.
    rtn = bnb_functional.dequantize_4bit(*bnb_functional.quantize_4bit(
        w, blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type))
    assert layer_output_error(w, result.qweight, hessian) < layer_output_error(w, rtn, hessian)


def test_double_quant_levels_are_chosen_for_the_decoded_scales():
    """With double quant the stored absmax differs from the fitted one; the levels must be the
    nearest for the decoded value, or the file would hold a worse weight than the one evaluated."""
    w, x = _problem(rows=64, cols=256)
    importance = x.square().mean(0)
    fitted = quantize_rtn(w, make_grid("nf4", double_quant=False), importance)
    stored = quantize_rtn(w, make_grid("nf4", double_quant=True), importance)
    assert not torch.equal(fitted.scale, stored.scale)
    grid = make_grid("nf4")
    scale = stored.scale.repeat_interleave(64, 1)
    levels, values = grid.round(w, scale, torch.zeros_like(scale))
    assert torch.equal(levels.to(torch.uint8), stored.levels)
    assert torch.equal(values, stored.qweight)


def test_packing_refuses_blocks_across_rows():
    w, x = _problem(rows=8, cols=96)
    result = quantize_rtn(w, make_grid("nf4", double_quant=False), x.square().mean(0))
    plan = TensorPlan("model.layers.0.mlp.up_proj.weight", (8, 96), "nf4", {"double_quant": False})
    with pytest.raises(BadArgument, match="--block-size 64"):
        pack_result(plan, result)


def test_gptq_beats_rtn_on_real_smollm2_layers(smollm2_gguf: Path) -> None:
    """Block 0 of SmolLM2, every Linear: GPTQ (double-quantized scales, static groups) has a
    lower layer-output error than bitsandbytes' NF4 + double quant, and so does the importance search."""
    from qtool.calibration.data import calibration_set
    from qtool.tokenizer import load_tokenizer
    from qtool.calibration.runner import walk_blocks
    from qtool.schemes.base import get_scheme
    from qtool.sources.resolve import resolve

    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "groups_merged.txt"
    if not text.is_file():
        pytest.skip(f"calibration text {text} is absent")
    nf4 = get_scheme("nf4")
    grid = make_grid("nf4", double_quant=True)
    with resolve("smollm2-135m") as source:
        calib = calibration_set(text, load_tokenizer(source), samples=4, seqlen=256)
        totals = {"rtn": 0.0, "imatrix": 0.0, "gptq": 0.0}
        for step in walk_blocks(source, calib):
            for name, module in step.linears.items():
                weight = module.weight.detach()
                stats = step.stats[name]
                rtn = nf4.dequantize(nf4.quantize(weight)).float()
                imatrix = quantize_rtn(weight, grid, stats.mean_square).qweight
                gptq = gptq_quantize(weight, stats.hessian, grid, act_order=True, importance=stats.mean_square,
                                     damp_diag=1.0).qweight
                errors = {key: layer_output_error(weight, q, stats.hessian)
                          for key, q in (("rtn", rtn), ("imatrix", imatrix), ("gptq", gptq))}
                assert errors["gptq"] < errors["rtn"], (name, errors)
                assert errors["imatrix"] < errors["rtn"], (name, errors)
                for key, value in errors.items():
                    totals[key] += value
            if step.index == 0:
                break
    assert totals["gptq"] < 0.8 * totals["rtn"], totals


@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_nf4_gptq_loads_in_transformers(tiny_llama_dir: Path, tmp_path: Path, double_quant: bool) -> None:
    """``qtool quantize --scheme nf4 --method gptq`` end to end: transformers + bitsandbytes load the
    output, hold exactly the calibrated weights and compute the logits of a plain model carrying them."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from qtool.calibration import MethodOptions, calibrated_weights, calibration_set
    from qtool.tokenizer import load_tokenizer
    from qtool.pipeline import QuantizeOptions, quantize
    from qtool.plan import Recipe, build_plan
    from qtool.sources.resolve import resolve

    from tests._safetensors_helpers import logits

    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "groups_merged.txt"
    if not text.is_file():
        pytest.skip(f"calibration text {text} is absent")
    recipe = Recipe(scheme="nf4", params={"double_quant": double_quant, "block_size": 32})
    options = QuantizeOptions(method="gptq", calib=str(text), calib_samples=4, calib_seqlen=64)
    out = tmp_path / "out"
    report = quantize(str(tiny_llama_dir), out, recipe, options)
    # The same calibration, run directly: the weights the method chose.
    with resolve(str(tiny_llama_dir)) as source:
        plans = build_plan(source.tensors(), recipe, int(source.config["num_hidden_layers"]))
        calib = calibration_set(text, load_tokenizer(source), samples=4, seqlen=64, seed=0)
        chosen = {item.plan.name: item.weight for item in
                  calibrated_weights(source, plans, MethodOptions("gptq"), calib_set=calib, pack=False)}
    assert len(chosen) == 14
    # The same layout as the sink's own round to nearest (up to the quant-state JSON's offset digits).
    plain = quantize(str(tiny_llama_dir), tmp_path / "rtn", recipe, QuantizeOptions())
    assert report.bits_per_weight_quantized == pytest.approx(plain.bits_per_weight_quantized, rel=1e-3)

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=model.dtype)
    reference.load_state_dict({name: weight.to(model.dtype) for name, weight in chosen.items()}, strict=False)
    reference.eval()
    for name, weight in chosen.items():
        module = model.get_submodule(name[: -len(".weight")])
        assert isinstance(module, bnb.nn.Linear4bit)
        loaded = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        # bitsandbytes decodes into the model's dtype (bf16): the calibrated weight, rounded to it.
        assert torch.equal(loaded.reshape(weight.shape), weight.to(loaded.dtype)), name
    got, expected = logits(model), logits(reference)
    assert torch.isfinite(got).all()
    # As in test_loaders: bitsandbytes' CPU 4-bit matmul rounds through bf16 in its own order.
    assert float((got - expected).abs().max()) <= 0.03
