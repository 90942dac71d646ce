"""Plans and recipes: which tensor gets which scheme, and how flags override presets."""
from pathlib import Path

import pytest

from qtool.errors import BadArgument, NotFound
from qtool.plan import KEEP, Recipe, Rule, build_plan, uses_more_bits
from qtool.recipes import choose_format, recipe_from_options
from qtool.sources.base import TensorInfo


def _llama_infos(n_layers=4):
    infos = [TensorInfo("model.embed_tokens.weight", (100, 16), "BF16", 3200)]
    for i in range(n_layers):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            infos.append(TensorInfo(f"model.layers.{i}.{proj}.weight", (16, 16), "BF16", 512))
        infos.append(TensorInfo(f"model.layers.{i}.input_layernorm.weight", (16,), "BF16", 32))
    infos.append(TensorInfo("lm_head.weight", (100, 16), "BF16", 3200))
    return infos


def test_default_plan_quantizes_block_linears_only():
    plans = {p.name: p for p in build_plan(_llama_infos(), Recipe(scheme="nf4", params={"block_size": 64}), 4)}
    assert plans["model.layers.0.self_attn.q_proj.weight"].scheme == "nf4"
    assert plans["model.layers.0.self_attn.q_proj.weight"].params == {"block_size": 64}
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert plans[kept].scheme == KEEP


def test_rules_skip_include_and_layer_selectors():
    recipe = Recipe(scheme="Q4_K", skip=["*.k_proj.weight"], include=["lm_head.weight"],
                    rules=[Rule(match="*.mlp.down_proj.weight", scheme="Q6_K", layers="more_bits")])
    plans = {p.name: p for p in build_plan(_llama_infos(8), recipe, 8)}
    assert plans["model.layers.3.self_attn.k_proj.weight"].scheme == KEEP
    assert plans["lm_head.weight"].scheme == "Q4_K"
    for i in range(8):
        expected = "Q6_K" if uses_more_bits(i, 8) else "Q4_K"
        assert plans[f"model.layers.{i}.mlp.down_proj.weight"].scheme == expected


def test_more_bits_matches_llama_cpp_choice_for_30_layers():
    # llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, with integer division.
    chosen = [i for i in range(30) if uses_more_bits(i, 30)]
    assert chosen == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_preset_yaml_and_flag_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("scheme: nf4\nparams: {block_size: 128}\nskip: ['*.q_proj.weight']\n")
    recipe = recipe_from_options(fmt="safetensors", bits=None, scheme="fp4", gguf_type=None, config=preset,
                                 block_size=64, group_size=None, double_quant=False, include=[], skip=["x"])
    assert recipe.scheme == "fp4"
    assert recipe.params == {"block_size": 64, "double_quant": False}
    assert recipe.skip == ["*.q_proj.weight", "x"]


@pytest.mark.parametrize("text, message", [
    ("scheme: [", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
    ("scheme: nf4\nbogus: 1\n", "unknown key(s) bogus"),
    ("rules: [{match: '*', nope: 1}]\n", "bad rule"),
])
def test_bad_presets_name_the_file(tmp_path, text, message):
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    with pytest.raises(BadArgument) as err:
        Recipe.from_yaml(preset)
    assert message in err.value.message and str(preset) in err.value.message


def test_missing_preset_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        Recipe.from_yaml(tmp_path / "nope.yaml")


def test_bits_defaults_and_format_choice():
    assert choose_format(None, "Q4_0", None, None) == "gguf"
    assert choose_format(None, None, Path("m.gguf"), None) == "gguf"
    assert choose_format(None, None, Path("out"), None) == "safetensors"
    common = dict(scheme=None, gguf_type=None, config=None, block_size=None, group_size=None,
                  double_quant=None, include=[], skip=[])
    assert recipe_from_options(fmt="safetensors", bits=4, **common).scheme == "nf4"
    assert recipe_from_options(fmt="safetensors", bits=8, **common).scheme == "int8-sym"
    assert recipe_from_options(fmt="gguf", bits=8, **common).scheme == "Q8_0"
    with pytest.raises(BadArgument, match="choose 4 or 8"):
        recipe_from_options(fmt="safetensors", bits=3, **common)
    with pytest.raises(BadArgument, match="nothing to do"):
        recipe_from_options(fmt="safetensors", bits=None, **common)
    with pytest.raises(BadArgument, match="GGUF type"):
        recipe_from_options(fmt="safetensors", bits=None, **{**common, "gguf_type": "Q4_0"})
