"""Architectures beyond the Llama layout, on tiny random checkpoints built with transformers' own config
classes: a layout qtool's default rule does not know is refused (never exit 0 with nothing quantized),
and eval / calibrate pick an attention implementation the model class supports (Gemma 2: eager)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli import app

from tests._architectures import MODEL_TYPES

# Decoder blocks outside model.layers.N: where each layout's blocks are, and the globs of their Linear weights.
UNKNOWN_LAYOUTS = {
    "falcon": ("transformer.h.0.",
               ["transformer.h.*.self_attention.*.weight", "transformer.h.*.mlp.*.weight"]),
    "gpt_neox": ("gpt_neox.layers.0.",
                 ["gpt_neox.layers.*.attention.*.weight", "gpt_neox.layers.*.mlp.*.weight"]),
}
LINEARS_PER_BLOCK = 4     # fused qkv, attention output, MLP up, MLP down
N_LAYERS = 2


def tiny_checkpoint(folder: Path, model_type: str, *, vocab_size: int = 256, tokenizer_from: Path | None = None,
                    **config_fields: int) -> Path:
    """A random ``model_type`` model (hidden 64, 4 heads, 2 layers) saved as transformers saves it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4, num_hidden_layers=N_LAYERS,
                                  vocab_size=vocab_size, **config_fields)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    if tokenizer_from is not None:
        for path in tokenizer_from.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def unknown_layout_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {model_type: tiny_checkpoint(tmp_path_factory.mktemp(model_type), model_type, intermediate_size=128)
            for model_type in UNKNOWN_LAYOUTS}


@pytest.fixture(scope="session")
def gemma2_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 2 refuses sdpa attention; SmolLM2's tokenizer (49152 tokens) from the tiny Llama."""
    return tiny_checkpoint(tmp_path_factory.mktemp("gemma2"), "gemma2", vocab_size=49152, tokenizer_from=tiny_llama_dir,
                           head_dim=16, num_key_value_heads=2, intermediate_size=128)


@pytest.fixture(scope="session")
def calibration_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = "the quick brown fox jumps over a lazy dog while birds sing in the old forest".split()
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(words[(index * 7) % len(words)] for index in range(600)) + "\n")
    return path


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def one_line(text: str) -> str:
    """stderr with rich's line wrapping undone."""
    return " ".join(text.split())


@pytest.mark.parametrize("model_type", sorted(UNKNOWN_LAYOUTS))
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_unknown_layout_is_refused_not_a_silent_copy(unknown_layout_dirs, model_type, dry_run, tmp_path):
    out = tmp_path / "out"
    result = run_cli("quantize", unknown_layout_dirs[model_type], "--bits", "4", "-o", out,
                     *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 4, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    message = one_line(result.stderr)
    block_prefix, include_globs = UNKNOWN_LAYOUTS[model_type]
    assert f"{model_type}: the plan quantizes no weight" in message
    assert f"{N_LAYERS * LINEARS_PER_BLOCK} of the model's" in message and f"(e.g. {block_prefix}" in message
    for glob in include_globs:   # what to pass is spelled out
        assert f"--include '{glob}'" in message
    assert not out.exists()


@pytest.mark.parametrize("model_type", sorted(UNKNOWN_LAYOUTS))
def test_include_from_the_error_quantizes_every_block_linear(unknown_layout_dirs, model_type, tmp_path):
    _, include_globs = UNKNOWN_LAYOUTS[model_type]
    includes = [arg for glob in include_globs for arg in ("--include", glob)]
    result = run_cli("quantize", unknown_layout_dirs[model_type], "--bits", "4", "-o", tmp_path / "out",
                     *includes, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    quantized = [row["name"] for row in json.loads(result.stdout)["tensors"] if row["scheme"] != "keep"]
    assert len(quantized) == N_LAYERS * LINEARS_PER_BLOCK
    assert all(name.endswith(".weight") and ("attention" in name or ".mlp." in name) for name in quantized)


def test_skip_that_keeps_everything_warns(unknown_layout_dirs, tmp_path):
    out = tmp_path / "out"
    result = run_cli("quantize", unknown_layout_dirs["falcon"], "--bits", "4", "-o", out, "--skip", "transformer.*")
    assert result.exit_code == 0, result.stderr
    assert "warning: the plan quantizes no weight: --skip / keep rules keep 9 of the model's 9 2-D weights" in one_line(result.stderr)
    assert (out / "model.safetensors").is_file()


def test_include_that_misses_the_blocks_warns(unknown_layout_dirs, tmp_path):
    result = run_cli("quantize", unknown_layout_dirs["falcon"], "--scheme", "int8-sym", "-o", tmp_path / "out",
                     "--include", "transformer.word_embeddings.weight", "--dry-run")
    assert result.exit_code == 0, result.stderr
    message = one_line(result.stderr)
    assert "but none of the 8 Linear weight(s) of the decoder blocks" in message
    assert "--include 'transformer.h.*.mlp.*.weight'" in message


def test_eval_gemma2_picks_an_attention_it_supports(gemma2_dir, calibration_text):
    result = run_cli("eval", gemma2_dir, "--text", calibration_text, "--ctx", "64", "--chunks", "2",
                     "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    perplexity = json.loads(result.stdout)["models"][0]["ppl"]
    assert math.isfinite(perplexity) and perplexity > 1


def test_calibrate_gemma2(gemma2_dir, calibration_text, tmp_path):
    from safetensors import safe_open

    stats = tmp_path / "stats.safetensors"
    result = run_cli("calibrate", gemma2_dir, "-o", stats, "--calib", calibration_text, "--calib-samples", "2",
                     "--calib-seqlen", "32", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    with safe_open(str(stats), "pt") as handle:
        names = list(handle.keys())
    assert any("model.layers.1.self_attn.q_proj" in name for name in names), names[:5]


GEMMA_BLOCKS = {
    # A sliding window shorter than the calibration windows: the sliding layers see only the last 8 tokens.
    "gemma2": dict(head_dim=16, num_key_value_heads=2, intermediate_size=128, sliding_window=8),
    "gemma3_text": dict(head_dim=16, num_key_value_heads=2, intermediate_size=128, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
}


def _calibration_matches_forward(folder: Path) -> None:
    """Every decoder Linear's input absmax as calibration sees it equals what the model's own forward
    pass feeds it."""
    import torch
    from transformers import AutoModelForCausalLM

    from qtool.calibration.data import CalibrationSet
    from qtool.calibration.runner import calibrate
    from qtool.evaluation.model import attention_implementation
    from qtool.sources.resolve import resolve

    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with resolve(str(folder)) as source:
        stats = calibrate(source, calib_set=CalibrationSet(tokens, "random tokens", tokens.numel(), 0),
                          want_hessian=False).linears
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.set_attn_implementation(attention_implementation(model.config))
    seen: dict[str, torch.Tensor] = {}
    watched = {f"{name}.weight": module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")}
    for name, module in watched.items():
        module.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(
            name, args[0].abs().flatten(0, -2).amax(0)))
    with torch.inference_mode():
        model(tokens)
    assert len(watched) >= 8 and set(watched) <= set(stats)
    for name in watched:
        torch.testing.assert_close(stats[name].absmax, seen[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("model_type", sorted(GEMMA_BLOCKS))
def test_calibration_sees_the_inputs_the_model_computes(model_type, tmp_path, monkeypatch):
    """Block by block, calibration must reproduce the model's own forward pass: Gemma's scaled embeddings,
    eager attention's causal mask, sliding windows and Gemma 3's per-layer-type rotary tables (in
    float32 like the reference: the mechanism is compared, not the CPU's bfloat16 products)."""
    monkeypatch.setenv("QTOOL_FLOAT32_FORWARDS", "1")
    _calibration_matches_forward(tiny_checkpoint(tmp_path / model_type, model_type, **GEMMA_BLOCKS[model_type]))


@pytest.mark.parametrize("variant", ["llama3", *MODEL_TYPES])
def test_calibration_sees_the_inputs_every_architecture_computes(arch_checkpoint, variant, monkeypatch):
    """The same on every architecture's shared checkpoint (Granite's embedding and residual multipliers,
    Phi-3's fused projections, OLMo 2's post-norms, StarCoder2's LayerNorms, Llama 3's rope scaling)."""
    monkeypatch.setenv("QTOOL_FLOAT32_FORWARDS", "1")
    _calibration_matches_forward(arch_checkpoint(variant))


def test_weights_outside_any_block_are_refused_unless_included():
    from qtool.errors import Unsupported
    from qtool.plan import Recipe, build_plan, check_coverage
    from qtool.sources.base import TensorInfo

    infos = [TensorInfo("encoder.proj.weight", (64, 64), "F32", 64 * 64 * 4), TensorInfo("encoder.norm.weight", (64,), "F32", 256)]
    config = {"model_type": "custom", "num_hidden_layers": 1}
    with pytest.raises(Unsupported, match=r"custom: the plan quantizes no weight: the model has 1 2-D weight\(s\) "
                                          r"\(e\.g\. encoder\.proj\.weight\), none in numbered decoder blocks; pass --include"):
        check_coverage(build_plan(infos, Recipe(scheme="int8-sym"), 1), Recipe(scheme="int8-sym"), config)
    included = Recipe(scheme="int8-sym", include=["encoder.proj.weight"])
    assert check_coverage(build_plan(infos, included, 1), included, config) is None
