"""calibrated_weights: rtn / imatrix / gptq over a whole (tiny) model, with and without saved stats."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.calibration import MethodOptions, OverlaySource, calibrate, calibrated_weights, calibration_set, load_stats, save_stats
from qtool.tokenizer import load_tokenizer
from qtool.errors import BadArgument
from qtool.plan import Recipe, build_plan, layer_index
from qtool.schemes.base import get_scheme
from qtool.sources.resolve import resolve


def _calib(source, samples: int = 3, seqlen: int = 32):
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "groups_merged.txt"
    if not text.is_file():
        pytest.skip(f"calibration text {text} is absent")
    return calibration_set(text, load_tokenizer(source), samples=samples, seqlen=seqlen)


def _plans(source, scheme: str, **params):
    return build_plan(source.tensors(), Recipe(scheme=scheme, params=params), int(source.config["num_hidden_layers"]))


def test_methods_over_a_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    with resolve(str(tiny_llama_dir)) as source:
        calib = _calib(source)
        plans = _plans(source, "Q4_0")
        planned = [p.name for p in plans if not p.keep]
        # Sequential GPTQ straight from the calibration set.
        sequential = list(calibrated_weights(source, plans, MethodOptions("gptq"), calib_set=calib))
        names = [item.plan.name for item in sequential]
        assert sorted(names) == sorted(planned)
        assert [layer_index(n) for n in names] == sorted(layer_index(n) for n in names)   # block order
        for item in sequential:
            assert 0 <= item.error < 0.05, (item.plan.name, item.error)
            reference = dequantize(item.packed.data.numpy(), GGMLQuantizationType.Q4_0)
            assert np.array_equal(reference.reshape(item.weight.shape), item.weight.numpy())

        # From saved statistics: no forward pass; the first block's q/k/v are identical to the
        # sequential run's (their inputs do not depend on anything quantized); o_proj differs (true
        # sequential: its inputs come from the quantized q/k/v), and so do later blocks.
        stats_path = save_stats(calibrate(source, calib_set=calib), tmp_path / "stats.safetensors")
        stats = load_stats(stats_path)
        from_stats = {item.plan.name: item for item in
                      calibrated_weights(source, plans, MethodOptions("gptq"), stats=stats)}
        first = [n for n in names if layer_index(n) == 0 and n.split(".")[-2] in ("q_proj", "k_proj", "v_proj")]
        assert len(first) == 3
        for name in first:
            assert torch.equal(from_stats[name].weight, next(i for i in sequential if i.plan.name == name).weight)
        o_proj = "model.layers.0.self_attn.o_proj.weight"
        assert not torch.equal(from_stats[o_proj].weight, next(i for i in sequential if i.plan.name == o_proj).weight)
        later = [n for n in names if layer_index(n) == 1]
        assert any(not torch.equal(from_stats[n].weight, next(i for i in sequential if i.plan.name == n).weight)
                   for n in later)

        # rtn is the scheme's own quantizer; imatrix and gptq beat it on the layer-output error.
        errors = {}
        for method in ("rtn", "imatrix", "gptq"):
            items = list(calibrated_weights(source, plans, MethodOptions(method), stats=stats))
            errors[method] = sum(item.error for item in items)
            if method == "rtn":
                q4_0 = get_scheme("Q4_0")
                for item in items:
                    weight = source.load(item.plan.name)
                    assert torch.equal(item.weight, q4_0.dequantize(q4_0.quantize(weight)))
        assert errors["gptq"] < errors["imatrix"] <= errors["rtn"] * 1.02, errors

        # The quantized weights drop into a model through OverlaySource.
        overlay = OverlaySource(source, {name: item.weight for name, item in from_stats.items()})
        assert torch.equal(overlay.load(first[0]), from_stats[first[0]].weight)
        assert torch.equal(overlay.load("model.norm.weight"), source.load("model.norm.weight"))


def test_int4_results_pack_for_compressed_tensors(tiny_llama_dir: Path) -> None:
    from qtool.schemes.int4 import PackedInt, dequantize_int

    with resolve(str(tiny_llama_dir)) as source:
        plans = _plans(source, "int4-asym", group_size=32)
        items = list(calibrated_weights(source, plans, MethodOptions("gptq"), calib_set=_calib(source)))
        for item in items:
            assert isinstance(item.packed, PackedInt) and item.packed.zero_point is not None
            assert torch.equal(dequantize_int(item.packed), item.weight)


def test_method_errors(tiny_llama_dir: Path) -> None:
    with resolve(str(tiny_llama_dir)) as source:
        plans = _plans(source, "Q4_0")
        with pytest.raises(BadArgument, match="--method"):
            list(calibrated_weights(source, plans, MethodOptions("awq-typo")))
        with pytest.raises(BadArgument, match="--calib"):
            list(calibrated_weights(source, plans, MethodOptions("gptq")))
        items = list(calibrated_weights(source, plans, MethodOptions("rtn")))
        assert items and all(math.isnan(item.error) for item in items)


@pytest.mark.parametrize("scheme", ["int4-sym", "w8a8"])
def test_calibrated_scales_are_stored_in_the_model_dtype(tiny_llama_dir: Path, shared_data: Path, tmp_path: Path,
                                                          scheme: str) -> None:
    """GPTQ's scales (float32, rounded to bfloat16 by the grid) are written in the bf16 model's
    dtype, as round to nearest writes them, with the same values."""
    from safetensors import safe_open

    from qtool.calibration.methods import grid_for
    from qtool.pipeline import QuantizeOptions, quantize

    params = {"act_strategy": "token"} if scheme == "w8a8" else {"group_size": 32}    # rows of 64 here
    options = QuantizeOptions(method="gptq", calib=str(shared_data / "calibration" / "groups_merged.txt"),
                              calib_samples=2, calib_seqlen=32)
    out = tmp_path / scheme
    quantize(str(tiny_llama_dir), out, Recipe(scheme=scheme, params=params), options)
    with resolve(str(tiny_llama_dir)) as source, safe_open(str(out / "model.safetensors"), "pt") as handle:
        plans = [p for p in _plans(source, scheme, **params) if not p.keep and layer_index(p.name) is not None]
        assert plans
        items = {item.plan.name: item for item in calibrated_weights(source, plans, MethodOptions("gptq"),
                                                                     calib_set=_calib(source, 2, 32))}
        for plan in plans:
            stored = handle.get_tensor(plan.name.replace(".weight", ".weight_scale"))
            assert stored.dtype == torch.bfloat16, plan.name
            assert grid_for(plan).scale_dtype in (torch.bfloat16, None)
            assert torch.equal(stored.float().reshape(-1), items[plan.name].packed.scale.float().reshape(-1))


def test_calibration_fits_the_type_a_gguf_file_falls_back_to(tiny_llama_dir: Path, shared_data: Path,
                                                              tmp_path: Path) -> None:
    """Rows of 64 or 128 hold no Q4_K super-block, so the GGUF file stores Q5_0 there: the calibrated
    method must fit Q5_0 (it failed after calibrating, packed Q4_K against a Q5_0 tensor)."""
    from gguf import GGUFReader

    from tests.test_cli import qtool

    calib = ["--calib", str(shared_data / "calibration" / "groups_merged.txt"), "--calib-samples", "2",
             "--calib-seqlen", "32"]
    files = {}
    for method in ("rtn", "imatrix"):
        files[method] = tmp_path / f"{method}.gguf"
        result = qtool("quantize", str(tiny_llama_dir), "--format", "gguf", "--type", "Q4_K", "--method", method,
                       *calib, "-o", str(files[method]), "-q")
        assert result.returncode == 0, result.stderr
    tensors = {method: {t.name: t for t in GGUFReader(path).tensors} for method, path in files.items()}
    layer = [name for name in tensors["imatrix"] if name.startswith("blk.") and name.endswith(".weight")
             and len(tensors["imatrix"][name].shape) == 2]
    assert layer and {tensors["imatrix"][name].tensor_type.name for name in layer} == {"Q5_0"}
    assert any(bytes(tensors["imatrix"][name].data) != bytes(tensors["rtn"][name].data) for name in layer)


def test_unwritable_calibrated_scheme_is_refused_before_calibration(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Calibrated int8-sym (bitsandbytes rows) has no packing yet: the error comes first, before the
    calibration text is even read (the path below does not exist), and nothing is written; so do
    the output format's layout errors."""
    from tests.test_cli import assert_one_line_error, qtool

    out = tmp_path / "out"
    assert_one_line_error(qtool("quantize", str(tiny_llama_dir), "--scheme", "int8-sym", "--method", "gptq",
                                "--calib", str(tmp_path / "missing.txt"), "-o", str(out)),
                          2, "int8-sym", "--method rtn")
    # The format's own layout checks come first too (and in a dry run).
    for extra in (["--method", "gptq", "--calib", str(tmp_path / "missing.txt"), "-o", str(out)], ["--dry-run"]):
        assert_one_line_error(qtool("quantize", str(tiny_llama_dir), "--scheme", "int4-sym", "--group-size", "48",
                                    *extra), 2, "--group-size 48")
    assert not out.exists()


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K"])
@pytest.mark.parametrize("method", ["imatrix", "gptq"])
def test_kquant_results_pack_into_bytes_that_decode_to_the_calibrated_weight(type_name: str, method: str) -> None:
    """GGUF K-quant blocks laid out from the grid GPTQ / the importance search chose, decoded by
    gguf-py (llama.cpp's layout): exactly the weight the method returned."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from qtool.calibration.packing import pack_result
    from qtool.plan import TensorPlan
    from qtool.schemes.gptq import gptq_quantize, make_grid, quantize_rtn

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 512, generator=generator) * 0.02
    weight[0] = 0                                    # an all-zero row: d = dmin = 0
    inputs = torch.randn(300, 512, generator=generator) * torch.rand(512, generator=generator) * 3
    hessian = inputs.T @ inputs
    grid = make_grid(type_name)
    importance = inputs.square().mean(0)
    result = (gptq_quantize(weight, hessian, grid, importance=importance, act_order=True, damp_diag=1.0)
              if method == "gptq" else quantize_rtn(weight, grid, importance))
    plan = TensorPlan(name="model.layers.0.mlp.down_proj.weight", shape=tuple(weight.shape), scheme=type_name,
                      params={})
    packed = pack_result(plan, result)
    decoded = dequantize(packed.data.numpy(), GGMLQuantizationType[type_name]).reshape(weight.shape)
    np.testing.assert_array_equal(decoded, result.qweight.numpy())
