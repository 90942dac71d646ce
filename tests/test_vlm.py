"""Vision-language checkpoints (Qwen2-VL, Gemma 3): the language model is quantized under the module
paths transformers 5 gives it (``model.language_model.layers.N``), the vision tower is kept, and the
compressed-tensors output loads in transformers with the logits of a model carrying qtool's own
dequantized weights. Tiny random checkpoints from transformers' config classes, saved as
transformers saves them (the older stored names that its loader renames)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qtool.cli import app

pytest.importorskip("compressed_tensors")

TEXT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=49152)
# model_type -> (text config beyond TEXT, vision config, top-level fields, a vision Linear's module path)
VLMS = {
    "qwen2_vl": ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}},
                 dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2),
                 dict(image_token_id=49000, video_token_id=49001, vision_start_token_id=49002),
                 "model.visual.blocks.0.attn.qkv"),
    "qwen2_5_vl": ({"rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}},
                   dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                        spatial_merge_size=2, fullatt_block_indexes=[1], window_size=56),
                   dict(image_token_id=49000, video_token_id=49001, vision_start_token_id=49002),
                   "model.visual.blocks.0.attn.qkv"),
    "gemma3": ({"head_dim": 16, "query_pre_attn_scalar": 16},
               dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=28, patch_size=14),
               dict(mm_tokens_per_image=4, image_token_index=49000, boi_token_index=49001, eoi_token_index=49002),
               "model.vision_tower.encoder.layers.0.self_attn.q_proj"),
}
PROMPT_IDS = torch.tensor([[1, 504, 3458, 282, 5248, 314, 2209, 30, 378, 1345]])
LANGUAGE_LINEARS = 14      # 2 blocks x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def vlm_dir(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            from transformers import AutoConfig, AutoModelForImageTextToText

            text, vision, fields, _ = VLMS[model_type]
            torch.manual_seed(0)
            config = AutoConfig.for_model(model_type, text_config={**TEXT, **text}, vision_config=vision, **fields)
            folder = tmp_path_factory.mktemp(model_type)
            AutoModelForImageTextToText.from_config(config).to(torch.float32).save_pretrained(folder)
            for path in smollm2_tokenizer_dir.iterdir():
                if path.name.startswith(("tokenizer", "special_tokens")):
                    shutil.copy(path, folder / path.name)
            built[model_type] = folder
        return built[model_type]

    return get


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.mark.parametrize("model_type", sorted(VLMS))
def test_int4_output_loads_with_qtools_weights(vlm_dir, model_type, tmp_path):
    from transformers import AutoModelForImageTextToText, CompressedTensorsConfig

    from qtool.sources.resolve import resolve

    source_dir, out = vlm_dir(model_type), tmp_path / "int4"
    result = run_cli("quantize", source_dir, "--scheme", "int4-asym", "--group-size", "32", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    per_scheme = {row["scheme"]: row["tensors"] for row in json.loads(result.stdout)["per_scheme"]}
    assert per_scheme["int4-asym"] == LANGUAGE_LINEARS

    # The config names modules the runtime model has: the language model's, under transformers 5 paths.
    targets = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["targets"]
    assert len(targets) == LANGUAGE_LINEARS
    assert all(target.startswith("model.language_model.layers.") for target in targets), targets

    # compressed-tensors' dequantize-on-load path (its packed zero points do not load into an empty model).
    loaded = AutoModelForImageTextToText.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)).to(torch.float32).eval()
    reference = AutoModelForImageTextToText.from_pretrained(source_dir).to(torch.float32).eval()
    original = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    with resolve(str(out)) as qtool_output:     # qtool's own reading of its output, dequantized
        dequantized = {name: qtool_output.load(name).to(torch.float32)
                       for name in (f"{target}.weight" for target in targets)}
    missing, unexpected = reference.load_state_dict(dequantized, strict=False)
    assert not unexpected, unexpected
    for name, weight in dequantized.items():
        assert not torch.equal(weight, original[name]), f"{name} was not quantized"
        assert torch.equal(loaded.get_parameter(name), weight), name

    vision = f"{VLMS[model_type][3]}.weight"
    assert torch.equal(loaded.get_parameter(vision), original[vision])      # the vision tower is kept
    with torch.no_grad():
        got, expected = loaded(input_ids=PROMPT_IDS).logits, reference(input_ids=PROMPT_IDS).logits
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), float((got - expected).abs().max())


def test_eval_runs_the_image_text_model(vlm_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog while the birds sing. " * 40)
    result = run_cli("eval", vlm_dir("qwen2_vl"), "--text", text, "--ctx", "64", "--chunks", "2", "--device", "cpu",
                     "--json")
    assert result.exit_code == 0, result.stderr
    perplexity = json.loads(result.stdout)["models"][0]["ppl"]
    assert math.isfinite(perplexity) and perplexity > 1


def test_gguf_is_refused_with_one_line(vlm_dir, tmp_path):
    out = tmp_path / "model.gguf"
    result = run_cli("quantize", vlm_dir("qwen2_vl"), "--format", "gguf", "--type", "Q8_0", "-o", out)
    assert result.exit_code == 4, result.stderr
    message = " ".join(result.stderr.split())
    assert "qwen2_vl" in message and "Traceback" not in result.stderr
    assert not out.exists()
