"""FP8, NVFP4 and MXFP4 weights: qtool's bytes against compressed-tensors' own quantization (a min/max
observer as llm-compressor runs it, ``calculate_qparams``, ``generate_gparam`` and the format's
compressor), on random weights, real SmolLM2 layers and edge cases."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtool.schemes.base import get_scheme
from qtool.schemes.floats import dequantize_float

compressed_tensors = pytest.importorskip("compressed_tensors")

SCHEMES = ("fp8", "fp8-block", "nvfp4a16", "mxfp4a16", "mxfp4")
# Schemes whose input quantization needs a calibrated scale (the rest need none).
CALIBRATED_INPUTS = ("nvfp4",)


@pytest.fixture(scope="module")
def llama128_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """A random Llama whose Linear inputs are 128 or 256 wide (fp8-block's input groups are 128)."""
    from qtool.synthetic import SHAPES, write_synthetic_llama

    shape = dict(SHAPES["tiny"], hidden_size=128, intermediate_size=256)
    return write_synthetic_llama(tmp_path_factory.mktemp("llama128"), **shape, tokenizer_from=smollm2_tokenizer_dir)


def reference(weight: torch.Tensor, scheme_name: str) -> dict[str, torch.Tensor]:
    """What llm-compressor stores for ``weight`` under the scheme's weight arguments: min/max of the weight
    in its dtype per strategy (its observers' flattening), qparams, then the compressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    from compressed_tensors.quantization.utils.helpers import maybe_pad_tensor_for_block_quant

    scheme = get_scheme(scheme_name)
    args = QuantizationArgs.model_validate(scheme.weight_args)
    rows, cols = weight.shape
    if args.strategy == "channel":
        low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    elif args.strategy == "block":
        height, width = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(weight, args.block_structure)
        tiles = padded.reshape(padded.shape[0] // height, height, padded.shape[1] // width, width).transpose(1, 2)
        low, high = tiles.amin(dim=(2, 3)), tiles.amax(dim=(2, 3))
    else:
        groups = weight.unflatten(-1, (-1, args.group_size))
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    global_scale = None
    if args.strategy == "tensor_group":
        absmax = torch.maximum(-low.min(), high.max())
        global_scale = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
    scale, _ = calculate_qparams(low, high, args, global_scale=global_scale)
    state = {"weight": weight, "weight_scale": scale}
    if global_scale is not None:
        state["weight_global_scale"] = global_scale
    fmt = scheme.ct_format
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args,
                                   input_activations=scheme.input_args and QuantizationArgs.model_validate(scheme.input_args))
    return BaseCompressor.get_value_from_registry(fmt).compress(state, ct_scheme)


def ours(weight: torch.Tensor, scheme_name: str) -> dict[str, torch.Tensor]:
    packed = get_scheme(scheme_name).quantize(weight)
    if packed.values.dtype == torch.float8_e4m3fn:
        return {"weight": packed.values, "weight_scale": packed.scale}
    stored = {"weight_packed": packed.values, "weight_scale": packed.scale}
    if packed.global_scale is not None:
        stored["weight_global_scale"] = packed.global_scale
    return stored


def assert_same(weight: torch.Tensor, scheme_name: str) -> None:
    expected, got = reference(weight, scheme_name), ours(weight, scheme_name)
    assert sorted(expected) == sorted(got)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        if value.dtype == torch.float8_e4m3fn:
            assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key
        else:
            assert torch.equal(got[key], value), key


def edge_weights(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    outliers = torch.randn(64, 256) * 0.02
    outliers[3, 17] = 300.0
    outliers[40, 200] = -1e4
    zeros = torch.randn(64, 256)
    zeros[:8] = 0.0                       # all-zero rows, blocks and groups
    zeros[10, :64] = -0.0
    ties = (torch.randint(-12, 13, (64, 256)) / 2).float()   # multiples of 0.5: ties on every grid
    tiny = torch.randn(64, 256) * 1e-30   # subnormal in float32 and below bfloat16's normals
    odd = torch.randn(200, 160)           # blocks past the edge (fp8-block pads)
    return [t.to(dtype) for t in (outliers, zeros, ties, tiny, odd)]


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_equal_compressed_tensors(scheme_name, dtype):
    for weight in edge_weights(dtype):
        if dtype == torch.float16 and weight.abs().max() > 6e4:
            continue
        assert_same(weight, scheme_name)


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_real_smollm2_layers(smollm2_gguf, scheme_name):
    from qtool.sources.resolve import resolve

    with resolve(str(smollm2_gguf)) as source:
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight",
                     "model.layers.29.mlp.gate_proj.weight"):
            assert_same(source.load(name).to(torch.bfloat16), scheme_name)


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_dequantize_matches_compressed_tensors(scheme_name):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = get_scheme(scheme_name)
    weight = torch.randn(200, 256, dtype=torch.bfloat16)     # fp8-block: a partial tile of rows at the edge
    packed = scheme.quantize(weight)
    args = QuantizationArgs.model_validate(scheme.weight_args)
    stored = ours(weight, scheme_name)
    decompressed = BaseCompressor.get_value_from_registry(scheme.ct_format).decompress(
        dict(stored), QuantizationScheme(targets=["Linear"], weights=args))
    got = dequantize_float(packed)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), decompressed["weight"].float(), rtol=0, atol=0)
    # and close to the weight: within half a step of each grid
    error = (got.float() - weight.float()).abs().max() / weight.float().abs().max()
    assert error < (0.07 if scheme.bits == 8 else 0.25)


def test_refusals():
    with pytest.raises(ValueError, match="multiple of 16"):
        get_scheme("nvfp4a16").quantize(torch.randn(4, 24))
    with pytest.raises(ValueError, match="multiple of 32"):
        get_scheme("mxfp4").quantize(torch.randn(4, 48))
    from qtool.schemes.errors import NonFiniteWeight

    for name in SCHEMES:
        bad = torch.randn(8, 64)
        bad[1, 1] = float("nan")
        with pytest.raises(NonFiniteWeight):
            get_scheme(name).quantize(bad)



@pytest.mark.parametrize("scheme_name", ["fp8", "fp8-block", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_quantization_is_compressed_tensors_dynamic_quantization(scheme_name, dtype):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    from qtool.schemes.floats import fake_quantize_float_input

    args = QuantizationArgs.model_validate(get_scheme(scheme_name).input_args)
    torch.manual_seed(1)
    x = (torch.randn(2, 7, 256) * torch.logspace(-3, 2, 256)).to(dtype)
    x[0, 3] = 0.0                                       # an all-zero token
    x[1, 2, :64] = 0.0                                  # all-zero groups
    global_scale = torch.tensor([448 * 6 / 37.0]) if scheme_name == "nvfp4" else None     # NVFP4's stored one
    for value in (x, x[0]):                             # a 2-D input has one range
        scale, zero_point = compute_dynamic_scales_and_zp(value, args, module=None, global_scale=global_scale)
        expected = fake_quantize(value, scale, zero_point, args, global_scale=global_scale)
        got = fake_quantize_float_input(value, bits=args.num_bits, group_size=args.group_size
                                        if args.strategy == "group" else None, global_scale=global_scale)
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)


@pytest.mark.parametrize("scheme_name", SCHEMES + CALIBRATED_INPUTS)
def test_transformers_loads_output(llama128_dir, shared_data, tmp_path, scheme_name):
    from transformers import AutoModelForCausalLM

    from qtool.evaluation.model import replay_input_quantization
    from qtool.plan import Recipe, build_plan
    from qtool.sources.resolve import resolve
    from tests._safetensors_helpers import logits, reference_model, write_output

    if scheme_name in CALIBRATED_INPUTS:
        from qtool.pipeline import QuantizeOptions, quantize

        out = tmp_path / "out"
        quantize(str(llama128_dir), out, Recipe(scheme=scheme_name), QuantizeOptions(
            calib=str(shared_data / "calibration" / "groups_merged.txt"), calib_samples=4, calib_seqlen=64))
        with resolve(str(llama128_dir)) as source:
            plans = build_plan(source.tensors(), Recipe(scheme=scheme_name), 2)
    else:
        out, plans = write_output(llama128_dir, tmp_path / "out", Recipe(scheme=scheme_name))
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    reference = reference_model(llama128_dir, plans)
    quantized = [plan for plan in plans if not plan.keep]
    assert len(quantized) == 14
    with resolve(str(out)) as written:
        # the runtime's input quantization, read from the file, replayed on the reference
        assert replay_input_quantization(reference, written) == (14 if get_scheme(scheme_name).input_args else 0)
        read_back = {plan.name: written.load(plan.name) for plan in quantized}
    if scheme_name.startswith("nvfp4"):
        # fused Linears share a global scale (test_nvfp4_fused_linears_share_a_global_scale): qtool's reader
        # of the file gives the weights; the others are quantize -> dequantize of the source's.
        reference.load_state_dict(read_back, strict=False)
    else:
        assert all(torch.equal(read_back[name], value) for name, value in reference.state_dict().items()
                   if name in read_back)
    got, expected = logits(model), logits(reference)
    state = reference.state_dict()
    for plan in quantized:      # compressed-tensors decompressed qtool's dequantized weights
        module = model.get_submodule(plan.name[: -len(".weight")])
        assert torch.equal(module.weight.data, state[plan.name]), plan.name
    assert torch.equal(got, expected)


def test_nvfp4_fused_linears_share_a_global_scale(llama128_dir, tmp_path):
    """vLLM loads q/k/v and gate/up as one matrix with one global scale: llm-compressor gives the parts the
    global scale of their joint absmax, and so does qtool; every other Linear keeps its own."""
    from compressed_tensors.quantization.utils import generate_gparam
    from safetensors import safe_open

    from qtool.plan import Recipe
    from qtool.sources.resolve import resolve
    from tests._safetensors_helpers import write_output

    out, plans = write_output(llama128_dir, tmp_path / "out", Recipe(scheme="nvfp4a16"))
    differ = 0
    with resolve(str(llama128_dir)) as source, safe_open(str(out / "model.safetensors"), "pt") as stored:
        for layer in range(2):
            prefix = f"model.layers.{layer}"
            for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"),
                          ("self_attn.o_proj",), ("mlp.down_proj",)):
                absmax = max(source.load(f"{prefix}.{m}.weight").abs().amax() for m in group)
                expected = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
                for module in group:
                    got = stored.get_tensor(f"{prefix}.{module}.weight_global_scale")
                    assert torch.equal(got, expected), (module, got, expected)
                if len(group) > 1:
                    own = [source.load(f"{prefix}.{m}.weight").abs().amax() for m in group]
                    differ += int(min(own) < absmax)
    assert differ       # some part's own global scale is not the shared one


def write_fp8_checkpoint(source: Path, out: Path, block: int = 128) -> Path:
    """``source``'s decoder Linears in quant_method fp8's layout (DeepSeek-V3, Qwen3-FP8), made here with plain torch
    ops: per 128 x 128 tile, weight_scale_inv = absmax / 448 and weight = w / scale_inv in float8_e4m3fn."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    state, stored = load_file(str(source / "model.safetensors")), {}
    for name, weight in state.items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            stored[name] = weight
            continue
        rows, cols = weight.shape
        padded = torch.nn.functional.pad(weight.float(), (0, -cols % block, 0, -rows % block))
        tiles = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block).abs().amax(dim=(1, 3))
        scale = (tiles / 448).clamp(min=1e-12)
        full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
        stored[name] = (weight.float() / full).to(torch.float8_e4m3fn)
        stored[name + "_scale_inv"] = scale
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_reads_fp8_checkpoints_as_transformers_dequantizes_them(llama128_dir, tmp_path):
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    from qtool.errors import CorruptFile
    from qtool.inspect import inspect_model
    from qtool.pipeline import QuantizeOptions, quantize
    from qtool.plan import Recipe
    from qtool.sources.resolve import resolve

    fp8_dir = write_fp8_checkpoint(llama128_dir, tmp_path / "fp8")
    model = AutoModelForCausalLM.from_pretrained(fp8_dir, dtype=torch.bfloat16,
                                                 quantization_config=FineGrainedFP8Config(dequantize=True))
    expected = model.state_dict()
    with resolve(str(fp8_dir)) as source:
        infos = {info.name: info for info in source.tensors()}
        assert not any("scale" in name for name in infos)
        assert infos["model.layers.0.self_attn.k_proj.weight"].stored_dtype == "FP8"   # rows 64: one edge tile
        for name in infos:
            assert torch.equal(source.load(name), expected[name]), name
    assert inspect_model(str(fp8_dir)).quantization["method"] == "fp8"
    # requantized to anything: int4 groups from the FP8 checkpoint
    report = quantize(str(fp8_dir), tmp_path / "int4", Recipe(scheme="int4-sym"), QuantizeOptions())
    assert report.parameters_quantized == sum(value.numel() for name, value in expected.items() if "proj" in name)
    assert report.bits_before_quantized == pytest.approx(8.0, abs=0.1)      # the FP8 source's bytes

    # a scale grid that does not fit its weight is refused in one line
    state = load_file(str(fp8_dir / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(state, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptFile, match="up_proj.weight_scale_inv has shape"):
        resolve(str(fp8_dir)).close()
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = "128"
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptFile, match="weight_block_size"):
        resolve(str(fp8_dir)).close()


@pytest.mark.parametrize("scheme_name", ["fp8", "fp8-block", "mxfp4a16", "nvfp4a16"])
def test_gptq_on_the_float_grids(scheme_name):
    """GPTQ on E4M3 (per row, and per 128 x 128 tile with the tiles' scales fixed first), E2M1 in groups of
    32 with power-of-two scales, and E2M1 in groups of 16 with E4M3 scales under the tensor's global scale:
    the output error well below round to nearest's, and the result packed into the format's own bytes,
    which compressed-tensors decodes to exactly GPTQ's weight."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from qtool.schemes.gptq import gptq_quantize, layer_output_error, make_grid

    generator = torch.Generator().manual_seed(0)
    mix = torch.randn(256, 256, generator=generator) / 16
    x = (torch.randn(512, 256, generator=generator) @ mix) * (torch.rand(256, generator=generator) * 3 + 0.05)
    w = torch.randn(160, 256, generator=generator) * 0.05      # fp8-block: two row tiles, the second partial
    h = x.T @ x
    scheme = get_scheme(scheme_name)
    rtn = dequantize_float(scheme.quantize(w)).float()
    result = gptq_quantize(w, h, make_grid(scheme_name, columns=256, absmax=float(w.abs().amax())), act_order=True)
    assert layer_output_error(w, result.qweight, h) < 0.8 * layer_output_error(w, rtn, h)
    packed = scheme.pack_calibrated(result, {}, torch.float32, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(dequantize_float(packed), result.qweight)
    if packed.global_scale is not None:     # round to nearest's global scale
        assert torch.equal(packed.global_scale, scheme.quantize(w).global_scale)
    state = {("weight" if packed.values.dtype == torch.float8_e4m3fn else "weight_packed"): packed.values,
             "weight_scale": packed.scale,
             **({"weight_global_scale": packed.global_scale} if packed.global_scale is not None else {})}
    args = QuantizationArgs.model_validate(scheme.weight_args)
    decompressed = BaseCompressor.get_value_from_registry(scheme.ct_format).decompress(
        state, QuantizationScheme(targets=["Linear"], weights=args))
    weight = decompressed["weight"]      # NVFP4 decompresses to bfloat16, its default dtype
    assert torch.equal(weight, result.qweight.to(weight.dtype))


@pytest.mark.parametrize("scheme_name", ["fp8", "fp8-block", "mxfp4", "nvfp4a16"])
def test_gptq_outputs_load_in_transformers(llama128_dir, shared_data, tmp_path, scheme_name):
    from transformers import AutoModelForCausalLM

    from qtool.pipeline import QuantizeOptions, quantize
    from qtool.plan import Recipe
    from qtool.sources.resolve import resolve

    out = tmp_path / "out"
    options = QuantizeOptions(method="gptq", calib=str(shared_data / "calibration" / "groups_merged.txt"),
                              calib_samples=4, calib_seqlen=64)
    report = quantize(str(llama128_dir), out, Recipe(scheme=scheme_name), options)
    assert report.calibration["tensors"] == 14
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))      # compressed-tensors decompresses on the first forward
    with resolve(str(out)) as written:
        for name, parameter in model.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                assert torch.equal(parameter.data, written.load(name)), name
    if scheme_name == "nvfp4a16":     # the Linears vLLM fuses share one global scale
        from safetensors.torch import load_file

        stored = load_file(str(out / "model.safetensors"))
        for layer in range(2):
            for module, siblings in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
                scales = [stored[f"model.layers.{layer}.{module}.{leaf}.weight_global_scale"] for leaf in siblings]
                assert all(torch.equal(scale, scales[0]) for scale in scales), (layer, siblings)


def test_fp8_static_input_scales_from_calibration(llama128_dir, shared_data, tmp_path):
    """--act-strategy tensor: one calibrated FP8 input scale per Linear (absmax / 448 with minmax), written as
    compressed-tensors' static per-tensor input quantization; transformers runs it, and qtool's evaluator
    replays it from the file to the same logits; the flags are refused where no scheme reads them."""
    import json

    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qtool.errors import BadArgument
    from qtool.evaluation.model import replay_input_quantization
    from qtool.pipeline import QuantizeOptions, quantize
    from qtool.plan import Recipe, build_plan
    from qtool.recipes import _activation_options
    from qtool.sources.resolve import resolve
    from tests._safetensors_helpers import logits, reference_model

    out = tmp_path / "out"
    options = QuantizeOptions(calib=str(shared_data / "calibration" / "groups_merged.txt"), calib_samples=4,
                              calib_seqlen=64)
    report = quantize(str(llama128_dir), out, Recipe(scheme="fp8", params={"act_strategy": "tensor"}), options)
    chosen = {row.module: row for row in report.activations.modules}
    assert len(chosen) == 14
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    (group,) = config.config_groups.values()
    inputs = group.input_activations
    assert (inputs.type, inputs.strategy, inputs.dynamic, inputs.num_bits) == ("float", "tensor", False, 8)
    with safe_open(str(out / "model.safetensors"), "pt") as stored:
        for module, row in chosen.items():
            assert row.clip == row.absmax and row.scale == pytest.approx(row.absmax / 448)
            assert float(stored.get_tensor(f"{module}.input_scale")[0]) == pytest.approx(row.scale, rel=1e-2)
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    with resolve(str(llama128_dir)) as source:
        plans = build_plan(source.tensors(), Recipe(scheme="fp8"), 2)
    reference = reference_model(llama128_dir, plans)
    with resolve(str(out)) as written:
        assert replay_input_quantization(reference, written) == 14
    assert torch.equal(logits(model), logits(reference))

    with pytest.raises(BadArgument, match="only --scheme fp8, nvfp4, w8a8 do"):
        _activation_options(Recipe(scheme="int4-sym"), None, "tensor", None)
    with pytest.raises(BadArgument, match="choose one of token, tensor"):
        _activation_options(Recipe(scheme="fp8"), None, "channel", None)
    with pytest.raises(BadArgument, match="mse searches the clip for an int8 grid"):
        quantize(str(llama128_dir), tmp_path / "mse", Recipe(scheme="fp8", params={"act_strategy": "tensor",
                                                                                    "act_range": "mse"}), options)
