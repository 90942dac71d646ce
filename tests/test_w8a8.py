"""W8A8 int8: static activation scales from calibration statistics, written as compressed-tensors
``int-quantized`` and run by the real runtime (transformers + compressed-tensors on CPU, which
fake-quantizes each Linear's input with the stored ``input_scale``).

The estimators are checked against brute force; the output is parsed by compressed-tensors' own
config classes and loaded by transformers, whose logits must equal a plain model carrying qtool's
dequantized weights with the same input quantization applied by hooks.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtool.architectures import architecture
from qtool.calibration.activation import (
    choose_scale,
    input_scales,
    minmax_clip,
    mse_clip,
    percentile_clip,
    quantization_mse,
)
from qtool.calibration.observers import InputObserver, InputStats
from qtool.errors import BadArgument
from qtool.plan import Recipe, TensorPlan

from tests._safetensors_helpers import logits, reference_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "w8a8.yaml"
TOKEN_CONFIG = CONFIG.with_name("w8a8-token.yaml")


def observed(x: torch.Tensor) -> InputStats:
    observer = InputObserver(x.shape[-1], want_hessian=False, sample_per_update=1 << 22)
    observer.update(x)
    return observer.finish()


def heavy_tailed(seed: int = 0) -> torch.Tensor:
    """Gaussian activations with a few outlier channels, as LLM Linear inputs look."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 64, generator=generator)
    x[:, 3] *= 40.0
    x[::97, 10] = 300.0
    return x


# -- the estimators ----------------------------------------------------------------------------------

def test_minmax_and_percentile_clips() -> None:
    x = heavy_tailed()
    stats = observed(x)
    absmax = float(x.abs().max())
    assert minmax_clip(stats.act_min, stats.act_max) == absmax == choose_scale(stats, "minmax").clip
    assert choose_scale(stats, "minmax").scale == pytest.approx(absmax / 127)
    # Recorded percentiles are used as they are; others are read off the |x| sketch.
    assert percentile_clip(stats, 99.9) == stats.percentiles["p99.9"]
    assert percentile_clip(stats, 99.9) == pytest.approx(float(torch.quantile(x.abs().reshape(-1)[:1 << 20], 0.999)),
                                                         rel=0.05)
    p90 = percentile_clip(stats, 90.0)
    assert p90 == pytest.approx(float(torch.quantile(x.abs().reshape(-1), 0.9)), rel=0.02)
    chosen = choose_scale(stats, "percentile", percentile=99.0)
    assert chosen.clip == stats.percentiles["p99"] < absmax
    assert chosen.scale == pytest.approx(chosen.clip / 127)
    with pytest.raises(BadArgument, match="act_percentile"):
        percentile_clip(stats, 120.0)
    with pytest.raises(BadArgument, match="--act-range"):
        choose_scale(stats, "entropy")


def test_quantization_mse_matches_signed_fake_quantization() -> None:
    """The error computed on |x| equals the error of symmetric int8 quantize-dequantize of x itself."""
    x = torch.randn(10000) * 3
    for clip in (2.0, 5.0, float(x.abs().max())):
        scale = clip / 127
        direct = float(((torch.clamp(torch.round(x / scale), -127, 127) * scale - x) ** 2).mean())
        assert float(quantization_mse(x.abs(), torch.tensor([clip]))[0]) == pytest.approx(direct, rel=1e-5)


def test_mse_clip_is_the_brute_force_optimum() -> None:
    # Student-t (3 degrees of freedom) values: a heavy tail, where clipping the rarest values pays.
    torch.manual_seed(0)
    x = torch.distributions.StudentT(3.0).sample((1024, 64))
    stats = observed(x)
    absmax = float(x.abs().max())
    chosen = choose_scale(stats, "mse")
    values = x.abs().reshape(-1)
    # Brute force over all the values (not the observer's sketch) on a fine linear grid.
    grid = torch.linspace(absmax / 100, absmax, 2000)
    best = min(float(quantization_mse(values, part).min()) for part in grid.split(100))
    got = float(quantization_mse(values, torch.tensor([chosen.clip]))[0])
    assert got <= best * 1.05   # the statistics hold a sketch, not the values: within 5% of the optimum
    assert chosen.clip < 0.9 * absmax
    assert got < 0.8 * float(quantization_mse(values, torch.tensor([absmax]))[0])
    # Uniform values have no tail: nothing is worth clipping.
    uniform = torch.rand(100000) * 2 - 1
    assert mse_clip(uniform.abs().sort().values, 1.0) > 0.95
    assert mse_clip(torch.zeros(10), 0.0) == 0.0


def test_degenerate_inputs_and_plans() -> None:
    zeros = observed(torch.zeros(64, 8))
    for method in ("minmax", "percentile", "mse"):
        chosen = choose_scale(zeros, method)
        assert chosen.scale > 0 and torch.isfinite(torch.tensor(chosen.scale))
    stats = observed(heavy_tailed())
    plans = [TensorPlan("model.layers.0.mlp.up_proj.weight", (128, 64), "w8a8", {"act_range": "mse"}),
             TensorPlan("model.layers.0.mlp.down_proj.weight", (64, 128), "w8a8", {"act_strategy": "token"}),
             TensorPlan("model.layers.0.self_attn.q_proj.weight", (64, 64), "int4-sym"),
             TensorPlan("model.norm.weight", (64,), "keep")]
    scales = input_scales(plans, {"model.layers.0.mlp.up_proj.weight": stats})
    assert list(scales) == ["model.layers.0.mlp.up_proj.weight"]
    assert scales["model.layers.0.mlp.up_proj.weight"].method == "mse"
    with pytest.raises(BadArgument, match="--stats has no statistics for model.layers.0.mlp.up_proj.weight"):
        input_scales(plans, {})


# -- the output and the real runtime ---------------------------------------------------------------

def quantize_w8a8(source: Path | str, out: Path, shared_data: Path, *, recipe: Recipe | None = None,
                  calib_samples: int = 4, calib_seqlen: int = 64):
    from qtool.pipeline import QuantizeOptions, quantize

    recipe = recipe or Recipe(scheme="w8a8", params={"act_strategy": "tensor", "act_range": "minmax"})
    options = QuantizeOptions(calib=str(shared_data / "calibration" / "groups_merged.txt"),
                              calib_samples=calib_samples, calib_seqlen=calib_seqlen)
    return quantize(str(source), out, recipe, options), recipe


def fake_quantize_inputs(model, scales: dict[str, float]):
    """Forward pre-hooks doing compressed-tensors' static int8 input quantization by hand."""
    handles = []
    for module_name, scale in scales.items():
        def hook(module, args, scale=scale):
            x = args[0]
            step = torch.tensor(scale, dtype=x.dtype)
            return (torch.clamp(x / step, -128, 127).round() * step,)
        handles.append(model.get_submodule(module_name).register_forward_pre_hook(hook))
    return handles


def test_w8a8_output_loads_and_quantizes_inputs(tiny_llama_dir, shared_data, tmp_path) -> None:
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w8a8"
    report, recipe = quantize_w8a8(tiny_llama_dir, out, shared_data)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized"
    parsed = QuantizationConfig.model_validate(config)      # compressed-tensors' own validation
    (group,) = parsed.config_groups.values()
    assert group.weights.strategy == "channel" and group.weights.symmetric and group.weights.num_bits == 8
    inputs = group.input_activations
    assert (inputs.strategy, inputs.dynamic, inputs.type, inputs.num_bits, inputs.symmetric) == \
        ("tensor", False, "int", 8, True)
    assert len(group.targets) == 14

    activations = report.activations
    assert activations.strategy == "tensor" and activations.range == "minmax" and len(activations.modules) == 14
    chosen = {row.module: row for row in activations.modules}
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
        for module in group.targets:
            assert handle.get_tensor(f"{module}.weight").dtype == torch.int8
            assert f"{module}.weight_zero_point" not in names and f"{module}.input_zero_point" not in names
            stored = handle.get_tensor(f"{module}.input_scale")
            assert stored.shape == (1,)
            assert float(stored[0]) == pytest.approx(chosen[module].scale, rel=1e-2)   # bf16 storage
            assert chosen[module].clip == chosen[module].absmax                        # minmax clips nothing

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.quantization_scheme.input_activations.strategy == "tensor"
    loaded_scales = {module: model.get_submodule(module).input_scale.item() for module in group.targets}
    got = logits(model)

    # The same numbers by hand: qtool's dequantized weights in a plain model, inputs fake-quantized by hooks.
    plans = [TensorPlan(p.name, tuple(p.shape), p.scheme, recipe.params) for p in
             _plans(tiny_llama_dir, recipe)]
    reference = reference_model(tiny_llama_dir, plans, dtype=model.dtype)
    weight_only = logits(reference)
    handles = fake_quantize_inputs(reference, loaded_scales)
    expected = logits(reference)
    for handle in handles:
        handle.remove()
    assert torch.equal(q_proj.weight.data, reference.model.layers[0].self_attn.q_proj.weight.data)
    assert float((got - expected).abs().max()) <= 1e-5
    assert not torch.equal(got, weight_only)     # the runtime does quantize the inputs

    # Changing one stored scale changes the output; switching input quantization off gives the weight-only model.
    with torch.no_grad():
        q_proj.input_scale.mul_(16)
    assert float((logits(model) - got).abs().max()) > 1e-3
    with torch.no_grad():
        q_proj.input_scale.div_(16)
    for module in group.targets:
        model.get_submodule(module).quantization_enabled = False
    assert float((logits(model) - weight_only).abs().max()) <= 1e-5


def _plans(source: Path, recipe: Recipe):
    from qtool.plan import build_plan
    from qtool.sources.resolve import resolve

    with resolve(str(source)) as opened:
        return build_plan(opened.tensors(), recipe, int(opened.config["num_hidden_layers"]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_w8a8_per_token_dynamic(tiny_llama_dir, shared_data, tmp_path, symmetric: bool) -> None:
    """--act-strategy token: no calibration, no stored scale; the runtime quantizes every token with its
    absmax (symmetric) or with its min and max and a zero point (--act-asymmetric)."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qtool.pipeline import QuantizeOptions, quantize

    recipe = Recipe(scheme="w8a8", params={"act_strategy": "token", "act_symmetric": symmetric})
    out = tmp_path / "token"
    report = quantize(str(tiny_llama_dir), out, recipe, QuantizeOptions(calib="/nonexistent"))   # never read
    assert report.activations.strategy == "token" and report.activations.modules == []
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    inputs = next(iter(config.config_groups.values())).input_activations
    assert (inputs.strategy, inputs.dynamic, inputs.symmetric) == ("token", True, symmetric)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert not [name for name in handle.keys() if ".input_scale" in name or ".input_zero_point" in name]
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    got = logits(model)
    reference = reference_model(tiny_llama_dir, _plans(tiny_llama_dir, recipe), dtype=model.dtype)

    def per_token(module, args):
        x = args[0]
        if symmetric:
            scale = x.abs().amax(dim=-1, keepdim=True) / 127.5     # compressed-tensors' symmetric range: 255 / 2
            return (torch.clamp(x / scale, -128, 127).round() * scale,)
        low = x.amin(dim=-1, keepdim=True).clamp(max=0)
        high = x.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (high - low) / 255
        zero = torch.clamp(torch.round(-128 - low / scale), -128, 127)
        # In the model's dtype, in compressed-tensors' order: the zero point is added before rounding.
        return ((torch.clamp(x / scale + zero, -128, 127).round() - zero) * scale,)

    for name, module in reference.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(per_token)
    assert float((got - logits(reference)).abs().max()) <= 1e-5


@pytest.mark.parametrize("strategy", ["tensor", "token"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_input_is_compressed_tensors_dynamic_quantization(strategy, symmetric, dtype) -> None:
    """qtool's replay of a Linear's dynamic input quantization equals compressed-tensors' own
    functions bit for bit (random ranges, an all-zero token, 2-D and 3-D inputs, empty input)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    from qtool.schemes.int8 import fake_quantize_input

    args = QuantizationArgs(num_bits=8, type="int", symmetric=symmetric, strategy=strategy, dynamic=True)
    generator = torch.Generator().manual_seed(4)
    for trial in range(40):
        shape = (2, 7, 48) if trial % 4 else (9, 48)
        x = (torch.randn(shape, generator=generator) * (trial + 1) * 0.1 + (trial % 3 - 1) * 0.5).to(dtype)
        if trial == 1:
            x[0, 1] = 0
        scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Linear(1, 1))
        expected = fake_quantize(x=x, scale=scale, zero_point=zero_point, args=args)
        got = fake_quantize_input(x, symmetric=symmetric, per_token=strategy == "token")
        assert got.dtype == expected.dtype and torch.equal(got, expected), (trial, shape)
    empty = torch.zeros(0, 48, dtype=dtype)
    assert fake_quantize_input(empty, symmetric=symmetric, per_token=strategy == "token").shape == (0, 48)


@pytest.mark.parametrize("params", [{"act_strategy": "tensor", "act_range": "minmax"}, {"act_strategy": "token"},
                                    {"act_strategy": "token", "act_symmetric": False}],
                         ids=["static", "token", "token-asym"])
def test_eval_replays_input_quantization(tiny_llama_dir, shared_data, tmp_path, params) -> None:
    """qtool's evaluator (dequantized runtime) quantizes a W8A8 file's Linear inputs as the file says:
    its logits equal compressed-tensors' runtime's, and differ from the weights alone."""
    from transformers import AutoModelForCausalLM

    from qtool.evaluation.model import load_causal_lm

    out = tmp_path / "w8a8"
    quantize_w8a8(tiny_llama_dir, out, shared_data, recipe=Recipe(scheme="w8a8", params=params))
    runtime = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    ours = load_causal_lm(str(out), dtype="bf16", device="cpu").model
    from qtool.sources.resolve import resolve

    with resolve(str(out)) as source:    # the float model it reads as has no input scales
        assert not [info.name for info in source.tensors() if info.name.endswith(".input_scale")]
    hooked = [name for name, module in ours.named_modules() if module._forward_pre_hooks]
    assert len(hooked) == 14 and all(name.startswith("model.layers.") for name in hooked)
    got = logits(ours)
    assert float((got - logits(runtime)).abs().max()) <= 1e-5
    for name in hooked:
        ours.get_submodule(name)._forward_pre_hooks.clear()
    assert float((logits(ours) - got).abs().max()) > 1e-3     # weights alone score differently


def test_eval_runtimes_agree_on_w8a8_and_refuse_what_they_cannot_replay(tiny_llama_dir, shared_data, tmp_path) -> None:
    from tests.test_cli import assert_one_line_error, qtool

    out = tmp_path / "w8a8"
    quantize_w8a8(tiny_llama_dir, out, shared_data, recipe=Recipe(scheme="w8a8", params={"act_strategy": "token"}))
    text = tmp_path / "text.txt"
    text.write_text((shared_data / "calibration" / "groups_merged.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    ppl = {}
    for runtime in ("dequantized", "native"):
        result = qtool("eval", str(out), "--text", str(text), "--ctx", "64", "--chunks", "3", "--device", "cpu",
                       "--runtime", runtime, "--json", "-q")
        assert result.returncode == 0, result.stderr
        (row,) = json.loads(result.stdout)["models"]
        assert row["runtime"] == runtime
        ppl[runtime] = row["ppl"]
    assert ppl["dequantized"] == pytest.approx(ppl["native"], rel=1e-4)
    assert_one_line_error(qtool("eval", str(out), "--text", str(text), "--runtime", "fast"), 2, "--runtime fast")

    # Inputs quantized per group: neither weight-only scoring nor a guess, a one-line refusal.
    config = json.loads((out / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"]["strategy"] = "group"
        group["input_activations"]["group_size"] = 32
    (out / "config.json").write_text(json.dumps(config))
    assert_one_line_error(qtool("eval", str(out), "--text", str(text), "--device", "cpu"), 4,
                          "does not replay", "--runtime native")
    # So are quantized outputs.
    for group in config["quantization_config"]["config_groups"].values():
        group["output_activations"] = dict(group["input_activations"], strategy="token", dynamic=True)
        group["input_activations"]["strategy"] = "token"
    (out / "config.json").write_text(json.dumps(config))
    assert_one_line_error(qtool("eval", str(out), "--text", str(text), "--device", "cpu"), 4,
                          "does not replay", "--runtime native")


def test_asymmetric_inputs_need_per_token_scales(tiny_llama_dir, tmp_path) -> None:
    from tests.test_cli import assert_one_line_error, qtool

    assert_one_line_error(qtool("quantize", str(tiny_llama_dir), "--scheme", "w8a8", "--act-asymmetric",
                                "-o", str(tmp_path / "x")), 2, "--act-strategy token")
    assert not (tmp_path / "x").exists()
    assert_one_line_error(qtool("quantize", str(tiny_llama_dir), "--scheme", "int8-sym", "--act-asymmetric",
                                "-o", str(tmp_path / "y")), 2, "--act-asymmetric")


def test_w8a8_gptq_on_the_smoothed_model(tiny_llama_dir, shared_data, tmp_path) -> None:
    """--method gptq with w8a8: GPTQ quantizes the smoothed weights (after SmoothQuant, with down_proj's
    own alpha), and the layers the runtime loads compute closer to the smoothed float layers than round
    to nearest's."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qtool.pipeline import QuantizeOptions, quantize

    calib = shared_data / "calibration" / "groups_merged.txt"
    params = {"act_strategy": "token", "smooth": 0.8, "smooth_down": 0.5}
    models, stored = {}, {}
    for method in ("rtn", "gptq"):
        options = QuantizeOptions(calib=str(calib), calib_samples=4, calib_seqlen=64, method=method)
        quantize(str(tiny_llama_dir), tmp_path / method, Recipe(scheme="w8a8", params=dict(params)), options)
        with safe_open(str(tmp_path / method / "model.safetensors"), "pt") as handle:
            stored[method] = {name: handle.get_tensor(name) for name in handle.keys()}
        models[method] = AutoModelForCausalLM.from_pretrained(tmp_path / method, device_map="cpu",
                                                              dtype=torch.float32).eval()
    # The same smoothing is folded into both (norms and up_proj rows), and GPTQ chose other levels.
    norm = "model.layers.0.post_attention_layernorm.weight"
    with safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as handle:
        assert not torch.equal(stored["gptq"][norm], handle.get_tensor(norm))
    assert torch.equal(stored["gptq"][norm], stored["rtn"][norm])
    for module in ("self_attn.q_proj", "mlp.down_proj"):
        weight, scale = (stored["gptq"][f"model.layers.1.{module}.{leaf}"] for leaf in ("weight", "weight_scale"))
        assert weight.dtype == torch.int8 and scale.shape == (weight.shape[0], 1)
        assert torch.equal(scale.to(torch.bfloat16).to(scale.dtype), scale)
        assert not torch.equal(weight, stored["rtn"][f"model.layers.1.{module}.weight"])

    # Every Linear's output error on the calibration inputs of the smoothed model (issue 6's direct
    # check), with the weights the runtime reconstructs: GPTQ's below round to nearest's.
    from qtool.calibration import calibrate
    from qtool.pipeline import activation_scales
    from qtool.schemes.gptq import layer_output_error
    from qtool.sources.resolve import resolve

    with resolve(str(tiny_llama_dir)) as source:
        plans = _plans(tiny_llama_dir, Recipe(scheme="w8a8", params=dict(params)))
        smoothed, _, _ = activation_scales(source, plans, QuantizeOptions(calib=str(calib), calib_samples=4,
                                                                          calib_seqlen=64), "cpu")
        stats = calibrate(smoothed, calib=calib, samples=4, seqlen=64)
        compared = 0
        for name, module in models["gptq"].named_modules():
            if not (name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)):
                continue
            weight = smoothed.load(f"{name}.weight").to(torch.float32)
            hessian = stats.linears[f"{name}.weight"].hessian
            gptq = layer_output_error(weight, module.weight.detach(), hessian)
            rtn = layer_output_error(weight, models["rtn"].get_submodule(name).weight.detach(), hessian)
            assert gptq < rtn, (name, gptq, rtn)
            compared += 1
    assert compared == 14


def test_cli_w8a8_json_and_errors(tiny_llama_dir, shared_data, tmp_path) -> None:
    import subprocess

    from typer.testing import CliRunner

    from qtool.cli import app
    from tests.test_cli import assert_one_line_error

    def qtool(*args: str) -> subprocess.CompletedProcess:
        # In process (tests/test_cli.py runs the console script itself): nine runs, no nine interpreters.
        result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    calib = str(shared_data / "calibration" / "groups_merged.txt")
    stats = tmp_path / "stats.safetensors"
    assert qtool("calibrate", str(tiny_llama_dir), "-o", str(stats), "--calib", calib, "--calib-samples", "4",
                 "--calib-seqlen", "64", "-q").returncode == 0
    reports = {}
    for act_range in ("minmax", "percentile", "mse"):
        result = qtool("quantize", str(tiny_llama_dir), "--config", str(CONFIG), "--stats", str(stats),
                       "--act-range", act_range, "-o", str(tmp_path / act_range), "--json", "-q")
        assert result.returncode == 0, result.stderr
        reports[act_range] = json.loads(result.stdout)["activations"]
        assert reports[act_range]["range"] == act_range
        assert reports[act_range]["calibration"].endswith("4 x 64 tokens")
        assert len(reports[act_range]["modules"]) == 14 and reports[act_range]["smoothing"] == 0.8
    clips = {name: {row["module"]: row["clip"] for row in report["modules"]} for name, report in reports.items()}
    # The same smoothed model (same second calibration pass) under each estimator.
    absmaxes = {name: {row["module"]: row["absmax"] for row in report["modules"]} for name, report in reports.items()}
    assert absmaxes["minmax"] == absmaxes["percentile"] == absmaxes["mse"]
    for module, absmax_clip in clips["minmax"].items():
        assert clips["percentile"][module] <= absmax_clip and clips["mse"][module] <= absmax_clip
    assert clips["percentile"] != clips["minmax"]
    table = qtool("quantize", str(tiny_llama_dir), "--scheme", "w8a8", "--stats", str(stats),
                  "--act-range", "mse", "-o", str(tmp_path / "table"))
    assert table.returncode == 0 and "static scales (mse) of 14 modules" in table.stdout, table.stdout
    assert "clip / absmax" in table.stdout

    assert_one_line_error(qtool("quantize", str(tiny_llama_dir), "--scheme", "int4-sym", "--act-range", "mse",
                                "-o", str(tmp_path / "x")), 2, "--act-range", "w8a8")
    assert_one_line_error(qtool("quantize", str(tiny_llama_dir), "--scheme", "w8a8", "--act-range", "kl",
                                "-o", str(tmp_path / "y")), 2, "--act-range kl", "minmax")
    assert_one_line_error(qtool("quantize", str(tiny_llama_dir), "--scheme", "w8a8", "--smooth", "1.5",
                                "-o", str(tmp_path / "z")), 2, "--smooth 1.5")
    assert_one_line_error(qtool("quantize", str(tiny_llama_dir), "--scheme", "w8a8", "--smooth-down", "2",
                                "-o", str(tmp_path / "w")), 2, "--smooth-down 2")


def test_smoothing_keeps_the_float_model(tiny_llama_dir, shared_data) -> None:
    """Smoothing moves range from the inputs into the weights without changing what the float model
    computes, and flattens the inputs' channels."""
    from qtool.calibration import calibrate
    from qtool.calibration.smoothing import SmoothedSource, smoothing_factors, smoothing_ops
    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve

    assert torch.allclose(smoothing_factors(torch.tensor([4.0, 0.0]), torch.tensor([1.0, 2.0]), 0.5),
                          torch.tensor([2.0, 1.0]))
    calib = shared_data / "calibration" / "groups_merged.txt"
    with resolve(str(tiny_llama_dir)) as source:
        stats = calibrate(source, calib=calib, samples=4, seqlen=64, want_hessian=False)
        names = {info.name for info in source.tensors()}
        ops = smoothing_ops(names, 2, stats.linears, source.load, 0.8, architecture(source.config).smoothing_sites)
        assert sorted(n for n in ops if "layers.0." in n) == [
            "model.layers.0.input_layernorm.weight", "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
        smoothed = SmoothedSource(source, ops)
        ids = torch.tensor([[1, 504, 3458, 282, 5248, 314, 2209, 30]])
        with torch.no_grad():
            plain = model_from_source(source)(ids).logits
            moved = model_from_source(smoothed)(ids).logits
        # bf16 storage of the smoothed tensors rounds them: equal up to bf16's precision.
        assert float((plain - moved).abs().max()) <= 0.02 * float(plain.abs().max())
        after = calibrate(smoothed, calib=calib, samples=4, seqlen=64, want_hessian=False)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        spread = lambda s: float(s.absmax.max() / s.absmax.clamp_min(1e-6).median())   # noqa: E731
        assert spread(after.linears[name]) < spread(stats.linears[name])


# ctx 512 windows of WikiText-2 test scored by both models: fp32 on this 2-core machine, about two
# minutes for the two of them (the 40 windows take three times that).
W8A8_EVAL_WINDOWS = 12
# Calibration on groups_merged.txt (never the evaluation text): 16 windows of 512 tokens (two passes
# for the static scales: before and after smoothing).
SMOLLM2_CALIB = {"calib_samples": 16, "calib_seqlen": 512}


@pytest.mark.slow
def test_smollm2_w8a8_perplexity(shared_data, tmp_path) -> None:
    """The packaged SmolLM2 with the per-token W8A8 preset (smoothing with down_proj's own alpha, then
    GPTQ on the smoothed weights), run by transformers + compressed-tensors on CPU, scored on
    WikiText-2 test against the unquantized model on the same windows: issue 6's 1% (+0.41% in the
    device GPU's fake quantization, 40 windows; symmetric inputs +1.22%).

    The static preset (static per-tensor input scales) loses several percent on this model (+4.94%
    measured, 12 windows); its scales are checked on the tiny model above, against compressed-tensors'
    runtime, which keeps CI inside its time."""
    from qtool.evaluation import evaluate
    from qtool.pipeline import QuantizeOptions, quantize

    calib = shared_data / "calibration" / "groups_merged.txt"
    recipe = Recipe.from_yaml(TOKEN_CONFIG)
    assert recipe.params["act_strategy"] == "token"
    out = tmp_path / "token"
    report = quantize("smollm2-135m", out, recipe, QuantizeOptions(calib=str(calib), method="gptq", **SMOLLM2_CALIB))
    assert report.activations.smoothing == 0.8 and report.activations.modules == []
    result = evaluate([str(out)], text_file=shared_data / "wikitext-2-raw" / "wiki.test.raw", ctx=512,
                      chunks=W8A8_EVAL_WINDOWS, baseline="smollm2-135m", device="cpu", runtime="native")
    base, token = result.models
    assert token.runtime == "native" and token.windows == base.windows == W8A8_EVAL_WINDOWS
    print(f"{token.model}: {token.ppl:.4f} vs {base.ppl:.4f} ({token.delta_pct:+.2f}%), KLD {token.mean_kld:.5f}, "
          f"top-1 {token.top1_agreement:.4f}")
    assert token.delta_pct < 1.0, f"W8A8 per token + GPTQ: {token.delta_pct:+.2f}% ppl, above issue 6's 1%"
