"""AWQ (`--method awq`): per-input-channel scales searched on the plan's grid and folded into the
norms / producer Linears.

- the folds leave the float model's logits as they were (up to storage precision), v_proj -> o_proj
  included on a model without grouped-query attention;
- on real SmolLM2 layers, the layer-output error tr(dW H dW^T) of each decoder block is no worse than
  round to nearest on the same grid (alpha = 0 is that quantization, and each site's search counts
  every Linear it changes);
- GGUF and compressed-tensors outputs hold the folded norms and, in the real runtimes (llama.cpp,
  transformers + compressed-tensors), compute what the calibrated weights compute in the unscaled model.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.architectures import architecture
from qtool.calibration import MethodOptions, OverlaySource, calibrate, calibrated_weights, calibration_set, save_stats
from qtool.calibration.awq import Choice, alpha_grid, block_sites, channel_scales, effective_weight, fold_ops
from qtool.tokenizer import load_tokenizer
from qtool.calibration.smoothing import SmoothedSource, apply_ops
from qtool.errors import BadArgument
from qtool.evaluation.model import model_from_source
from qtool.plan import Recipe, build_plan, layer_index
from qtool.schemes.gptq import make_grid, quantize_rtn
from qtool.sources.resolve import resolve

PROMPT_IDS = torch.tensor([[1, 504, 3458, 282, 5248, 314, 2209, 30, 378, 1345]])


LLAMA_SITES = architecture({"model_type": "llama"}).awq_sites


def _calib(source, shared_data: Path, samples: int, seqlen: int):
    return calibration_set(shared_data / "calibration" / "groups_merged.txt", load_tokenizer(source),
                           samples=samples, seqlen=seqlen)


def _merged_folds(items) -> dict:
    folds: dict = {}
    for item in items:
        for name, operations in item.folds.items():
            folds.setdefault(name, []).extend(operations)
    return folds


def _logits(source) -> torch.Tensor:
    with torch.no_grad():
        return model_from_source(source)(PROMPT_IDS).logits


def _output_error(weight: torch.Tensor, qweight: torch.Tensor, hessian: torch.Tensor) -> float:
    diff = weight.to(torch.float64) - qweight.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", diff, hessian.to(torch.float64), diff))


def test_sites_scales_and_grid() -> None:
    mha = {"model.layers.3.input_layernorm.weight": (64,), "model.layers.3.post_attention_layernorm.weight": (64,)}
    for name, shape in (("q", (64, 64)), ("k", (64, 64)), ("v", (64, 64)), ("o", (64, 64))):
        mha[f"model.layers.3.self_attn.{name}_proj.weight"] = shape
    for name, shape in (("gate", (128, 64)), ("up", (128, 64)), ("down", (64, 128))):
        mha[f"model.layers.3.mlp.{name}_proj.weight"] = shape
    sites = block_sites(3, mha, mha, LLAMA_SITES)
    assert [(s.producer.split("layers.3.")[1], s.how, len(s.linears)) for s in sites] == [
        ("input_layernorm.weight", "vector", 3), ("post_attention_layernorm.weight", "vector", 2),
        ("mlp.up_proj.weight", "rows", 1), ("self_attn.v_proj.weight", "rows", 1)]
    # Grouped-query attention (v has fewer rows than o has columns) or a v bias: no v -> o site.
    gqa = dict(mha, **{"model.layers.3.self_attn.k_proj.weight": (32, 64), "model.layers.3.self_attn.v_proj.weight": (32, 64)})
    assert len(block_sites(3, gqa, gqa, LLAMA_SITES)) == 3
    biased = dict(mha, **{"model.layers.3.self_attn.v_proj.bias": (64,)})
    assert len(block_sites(3, biased, biased, LLAMA_SITES)) == 3

    act = torch.tensor([0.0, 0.5, 2.0, 8.0])
    assert torch.equal(channel_scales(act, 0.0), torch.ones(4))   # alpha 0: exactly the unscaled weights
    half = channel_scales(act, 0.5)
    assert float(half.max() * half.min()) == pytest.approx(1.0)
    assert float(half[3] / half[2]) == pytest.approx(2.0)         # (8/2)^0.5
    assert alpha_grid(4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        alpha_grid(0)


def test_folds_keep_the_float_model_without_gqa(smollm2_tokenizer_dir, shared_data, tmp_path) -> None:
    """Every site's fold (v_proj -> o_proj included: 4 heads, 4 kv heads) at alpha 0.5 moves range
    without changing what the float32 model computes."""
    from qtool.synthetic import write_synthetic_llama

    folder = write_synthetic_llama(tmp_path / "mha", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=4, vocab_size=49152, dtype=torch.float32,
                                   tokenizer_from=smollm2_tokenizer_dir)
    with resolve(str(folder)) as source:
        stats = calibrate(source, calib_set=_calib(source, shared_data, 2, 32), want_hessian=False)
        shapes = {info.name: tuple(info.shape) for info in source.tensors()}
        choices = []
        for layer in range(2):
            for site in block_sites(layer, shapes, shapes, LLAMA_SITES):
                act = stats.linears[site.linears[0]].mean_square.sqrt()
                choices.append(Choice(site, 0.5, channel_scales(act, 0.5), []))
        assert len(choices) == 8 and sum(c.site.producer.endswith("v_proj.weight") for c in choices) == 2
        folds = fold_ops(choices)
        assert all(float((c.scales - 1).abs().max()) > 0.1 for c in choices)
        plain, folded = _logits(source), _logits(SmoothedSource(source, folds))
        assert float((plain - folded).abs().max()) <= 1e-4 * float(plain.abs().max())
        # Undoing a Linear's folds gives back its weight.
        name = "model.layers.1.mlp.up_proj.weight"
        assert [how for how, _ in folds[name]] == ["cols", "rows"]
        weight = source.load(name)
        torch.testing.assert_close(effective_weight(apply_ops(weight, folds[name]), folds[name]), weight)


# Sites per architecture (2 blocks; grouped-query attention, so no v -> o site): Llama's three, the
# up -> down site only where the norms are not plain RMSNorms before a Linear, none for StarCoder2.
SITES_PER_BLOCK = {"llama": 3, "qwen3": 3, "granite": 3, "phi3": 2, "olmo2": 1, "gemma2": 1, "gemma3_text": 1,
                   "starcoder2": 0}


@pytest.mark.parametrize("variant", sorted(SITES_PER_BLOCK))
def test_each_architectures_sites_keep_its_float_model(arch_checkpoint, shared_data, variant) -> None:
    """The architecture record's scale sites (SmoothQuant's and AWQ's), folded at alpha 0.5 into a
    tiny random model of each architecture, leave what transformers computes unchanged."""
    with resolve(str(arch_checkpoint(variant, 49152))) as source:
        sites = architecture(source.config).awq_sites
        stats = calibrate(source, calib_set=_calib(source, shared_data, 2, 32), want_hessian=False)
        shapes = {info.name: tuple(info.shape) for info in source.tensors()}
        choices = [Choice(site, 0.5, channel_scales(stats.linears[site.linears[0]].mean_square.sqrt(), 0.5), [])
                   for layer in range(2) for site in block_sites(layer, shapes, shapes, sites)]
        assert len(choices) == 2 * SITES_PER_BLOCK[variant]
        if not choices:
            return
        assert all(float((c.scales - 1).abs().max()) > 0.1 for c in choices)
        plain, folded = _logits(source), _logits(SmoothedSource(source, fold_ops(choices)))
        assert float((plain - folded).abs().max()) <= 1e-4 * float(plain.abs().max())


@pytest.mark.slow
def test_smollm2_awq_beats_rtn_per_block_and_folds_exactly(smollm2_gguf, shared_data) -> None:
    """Real SmolLM2 layers (the first 4 blocks), Q4_0: each block's summed layer-output error of AWQ is
    no worse than round to nearest on the same grid, better on the whole; the packed blocks decode
    (gguf-py) to the scaled weights; and the folded float model computes the original logits."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    with resolve(str(smollm2_gguf)) as source:
        # Folding is exact in float32; the model's own float16 would round every folded norm and weight.
        source.dtype = torch.float32
        stats = calibrate(source, calib_set=_calib(source, shared_data, 4, 128))
        plans = [p for p in build_plan(source.tensors(), Recipe(scheme="Q4_0"), int(source.config["num_hidden_layers"]))
                 if p.keep or layer_index(p.name) < 4]
        items = list(calibrated_weights(source, plans, MethodOptions("awq"), stats=stats))
        assert len(items) == 28
        folds = _merged_folds(items)
        grid = make_grid("Q4_0")
        per_block: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for item in items:
            name = item.plan.name
            weight = source.load(name).to(torch.float32)
            hessian = stats.linears[name].hessian
            per_block[layer_index(name)][0] += _output_error(weight, item.weight, hessian)
            per_block[layer_index(name)][1] += _output_error(weight, quantize_rtn(weight, grid).qweight, hessian)
            stored = torch.from_numpy(dequantize(item.packed.data.numpy(), GGMLQuantizationType.Q4_0)).reshape(weight.shape)
            assert torch.equal(effective_weight(stored, folds.get(name, [])), item.weight)
        for layer, (awq_error, rtn_error) in sorted(per_block.items()):
            assert awq_error <= rtn_error, (layer, awq_error, rtn_error)
        assert sum(a for a, _ in per_block.values()) < 0.9 * sum(r for _, r in per_block.values())

        norms = [n for n in folds if n.endswith("layernorm.weight")]
        assert len(norms) == 8   # both norms of the 4 blocks (SmolLM2 has GQA: no v -> o site)
        assert any(not torch.equal(apply_ops(source.load(n), folds[n]), source.load(n)) for n in norms)
        plain, folded = _logits(source), _logits(SmoothedSource(source, folds))
        assert float((plain - folded).abs().max()) <= 1e-4 * float(plain.abs().max())


def _tiny_stats(source_dir: Path, shared_data: Path, out: Path) -> Path:
    with resolve(str(source_dir)) as source:
        return save_stats(calibrate(source, calib_set=_calib(source, shared_data, 4, 64)), out)


def _reference(source_dir: Path, plans, stats_path: Path):
    """float32 logits of the calibrated weights in the unscaled model, and the folded norms."""
    from qtool.calibration import load_stats

    with resolve(str(source_dir)) as source:
        items = list(calibrated_weights(source, plans, MethodOptions("awq"), stats=load_stats(stats_path)))
        folds = _merged_folds(items)
        logits = _logits(OverlaySource(source, {item.plan.name: item.weight for item in items}))
        norms = {n: apply_ops(source.load(n), ops) for n, ops in folds.items() if n.endswith("layernorm.weight")}
        assert any(not torch.equal(folded, source.load(n)) for n, folded in norms.items())
    return logits[0].numpy(), norms


@pytest.mark.slow
def test_awq_gguf_runs_in_llamacpp(tiny_llama_dir, shared_data, tmp_path, monkeypatch) -> None:
    """`qtool quantize --method awq --type Q4_0 --stats`: the GGUF holds the folded norms (exactly), and
    llama.cpp runs it and computes what the calibrated weights compute in the unscaled model.
    (On this random model, leaving the norms unfolded moves the logits by about llama.cpp's own
    activation-quantization noise, so the exact norm check is the one that catches a missing fold.
    The statistics are taken in float32: the noise bound below was set on the model they give.)"""
    pytest.importorskip("llama_cpp")
    monkeypatch.setenv("QTOOL_FLOAT32_FORWARDS", "1")
    from gguf import GGUFReader

    from qtool.pipeline import plan_model
    from tests._gguf_helpers import llamacpp_logits, llamacpp_model, recipe_for
    from tests.test_cli import qtool

    stats = _tiny_stats(tiny_llama_dir, shared_data, tmp_path / "stats.safetensors")
    out = tmp_path / "awq.gguf"
    result = qtool("quantize", str(tiny_llama_dir), "--type", "Q4_0", "--method", "awq", "--stats", str(stats),
                   "-o", str(out), "-q", "--json")
    assert result.returncode == 0, result.stderr
    with resolve(str(tiny_llama_dir)) as source:
        plans = plan_model(source, recipe_for("Q4_0"), "gguf")
    right, norms = _reference(tiny_llama_dir, plans, stats)

    tensors = {t.name: t for t in GGUFReader(out).tensors}
    for layer in range(2):
        for hf, gguf in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            written = np.asarray(tensors[f"blk.{layer}.{gguf}.weight"].data, dtype=np.float32)
            expected = norms[f"model.layers.{layer}.{hf}.weight"].to(torch.float32).numpy()
            np.testing.assert_array_equal(written, expected)
        assert tensors[f"blk.{layer}.ffn_down.weight"].tensor_type.name == "Q4_0"

    runtime = llamacpp_model(out)
    ours = llamacpp_logits(runtime, PROMPT_IDS[0].tolist())[1:]
    runtime.close()
    right = right[1:]
    # llama.cpp quantizes the activations it multiplies with Q4_0 blocks (tests/test_llamacpp.py: 0.4 std).
    difference = np.abs(ours - right).max(axis=-1)
    assert difference.max() <= 0.4 * float(right.std())
    top2 = np.sort(right, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * difference
    np.testing.assert_array_equal(ours.argmax(-1)[clear], right.argmax(-1)[clear])


@pytest.mark.slow
def test_awq_compressed_tensors_loads_in_transformers(tiny_llama_dir, shared_data, tmp_path) -> None:
    """`--method awq+gptq --scheme int4-sym --group-size 32` (library call): compressed-tensors output
    with the folded norms, loaded by transformers + compressed-tensors, computes the calibrated
    model's logits (bf16 storage of the folded norms aside)."""
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qtool.calibration import load_stats
    from qtool.pipeline import QuantizeOptions, quantize

    stats = _tiny_stats(tiny_llama_dir, shared_data, tmp_path / "stats.safetensors")
    recipe = Recipe(scheme="int4-sym", params={"group_size": 32})
    report = quantize(str(tiny_llama_dir), tmp_path / "out", recipe, QuantizeOptions(method="awq+gptq", stats=stats))
    out = Path(report.output)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    written = {}
    for path in out.glob("*.safetensors"):
        written.update(load_file(str(path)))

    with resolve(str(tiny_llama_dir)) as source:
        plans = build_plan(source.tensors(), recipe, int(source.config["num_hidden_layers"]))
        items = list(calibrated_weights(source, plans, MethodOptions("awq+gptq"), stats=load_stats(stats)))
        folds = _merged_folds(items)
        for name, operations in folds.items():
            if name.endswith("layernorm.weight"):
                assert torch.equal(written[name], apply_ops(source.load(name), operations))
        right = _logits(OverlaySource(source, {item.plan.name: item.weight for item in items}))
        wrong = _logits(OverlaySource(source, {item.plan.name: apply_ops(item.weight, folds.get(item.plan.name, []))
                                               for item in items}))
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(PROMPT_IDS).logits
    scale = float(right.std())
    assert float((got - right).abs().max()) <= 0.05 * scale
    assert float((got - right).abs().mean()) < 0.1 * float((got - wrong).abs().mean())


def test_awq_errors(tiny_llama_dir, shared_data) -> None:
    with resolve(str(tiny_llama_dir)) as source:
        stats = calibrate(source, calib_set=_calib(source, shared_data, 2, 32), want_hessian=False)
        plans = build_plan(source.tensors(), Recipe(scheme="Q4_0"), 2)
        with pytest.raises(BadArgument, match="X\\^T X"):
            list(calibrated_weights(source, plans, MethodOptions("awq"), stats=stats))
        with pytest.raises(BadArgument, match="awq\\+gptq"):
            list(calibrated_weights(source, plans, MethodOptions("awq+typo"), stats=stats))
        no_grid = build_plan(source.tensors(), Recipe(scheme="int8-asym"), 2)
        with pytest.raises(BadArgument, match="--method"):
            list(calibrated_weights(source, no_grid, MethodOptions("awq"), calib_set=_calib(source, shared_data, 2, 32)))
