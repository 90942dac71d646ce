"""The GGUF writer: what lands in the file (read back with gguf-py's reader), plans and errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, quants

from qtool import architectures
from qtool.errors import OutputExists, Unsupported
from qtool.plan import Recipe
from qtool.schemes.ggml import ggml_type
from qtool.containers.gguf import gguf_plans, plain_type_recipe
from qtool.sinks.gguf import GGUFSink, packed_nbytes, stored_type
from qtool.sources.base import TensorInfo
from qtool.sources.resolve import resolve

from tests._gguf_helpers import recipe_for, write_gguf



def _fields(reader: GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def test_q8_0_file_has_llama_metadata_tokenizer_and_exact_tensors(tiny_llama_dir, tmp_path):
    out = write_gguf(tiny_llama_dir, "Q8_0", tmp_path / "tiny.gguf")
    assert out == tmp_path / "tiny.gguf"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.gguf"]   # no temporary left behind
    reader = GGUFReader(out)
    meta = _fields(reader)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert meta["general.architecture"] == "llama"
    assert meta["general.file_type"] == 7 and meta["general.quantization_version"] == 2
    assert meta["llama.block_count"] == 2 and meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count_kv"] == 2 and meta["llama.rope.dimension_count"] == 16
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert meta["tokenizer.ggml.merges"][:2] == ["Ġ t", "Ġ a"]
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "im_start" in meta["tokenizer.chat_template"]

    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {architectures.hf_to_gguf_name(n) for n in _hf_names(tiny_llama_dir)}
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    assert tensors["output.weight"].tensor_type == GGMLQuantizationType.Q8_0
    with resolve(str(tiny_llama_dir)) as source:
        q_proj = source.load("model.layers.1.self_attn.q_proj.weight")
        k_proj = source.load("model.layers.1.self_attn.k_proj.weight")
    # q/k rows permuted the way llama.cpp's converter does, then quantized byte-exactly.
    for name, weight, heads in (("blk.1.attn_q.weight", q_proj, 4), ("blk.1.attn_k.weight", k_proj, 2)):
        expected = quants.quantize(architectures.permute_qk(weight.float(), heads).numpy(), GGMLQuantizationType.Q8_0)
        np.testing.assert_array_equal(np.asarray(tensors[name].data), expected)
        assert tuple(int(d) for d in tensors[name].shape) == (64, weight.shape[0])   # GGML ne order


def _hf_names(folder: Path) -> list[str]:
    with resolve(str(folder)) as source:
        return [info.name for info in source.tensors()]


def test_k_type_rows_not_multiple_of_256_fall_back_like_llama_quantize(tiny_llama_dir, tmp_path):
    out = write_gguf(tiny_llama_dir, "Q4_K_M", tmp_path / "mix.gguf")
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    # hidden 64: Q4_K -> Q5_0; Q6_K -> Q8_0; down_proj rows of 128 -> Q5_0 / Q8_0 as well.
    assert types["blk.0.attn_q.weight"] == "Q5_0"
    assert types["output.weight"] == "Q8_0"
    assert types["blk.1.attn_v.weight"] == "Q8_0"      # more_bits layer: Q6_K -> Q8_0
    assert types["blk.0.attn_v.weight"] == "Q5_0"
    assert types["blk.0.ffn_norm.weight"] == "F32"
    assert _fields(GGUFReader(out))["general.file_type"] == 15


@pytest.mark.slow
def test_packed_nbytes_matches_the_file_for_every_type(tiny_llama_dir, tmp_path):
    for type_name in ("Q4_0", "Q2_K", "F16", "BF16"):
        out = write_gguf(tiny_llama_dir, type_name, tmp_path / f"{type_name}.gguf")
        with resolve(str(tiny_llama_dir)) as source:
            plans = {architectures.hf_to_gguf_name(p.name): p
                     for p in gguf_plans(source.tensors(), recipe_for(type_name), source.config)}
        for tensor in GGUFReader(out).tensors:
            assert int(tensor.n_bytes) == packed_nbytes(plans[tensor.name]), (type_name, tensor.name)
            assert tensor.tensor_type.name == stored_type(plans[tensor.name])


def test_mix_presets_follow_llama_quantize_layer_choices():
    n_layers = 16
    infos = [TensorInfo("model.embed_tokens.weight", (1024, 256), "BF16", 0),
             TensorInfo("lm_head.weight", (1024, 256), "BF16", 0)]
    # llama-quantize's ffn_down rules take every tensor named ffn_down*: the merged experts (Mixtral's w2, the
    # others' experts.N.down_proj) and shared experts, by their block's index.
    experts = ("block_sparse_moe.experts.0.w2", "mlp.experts.1.down_proj", "mlp.shared_expert.down_proj",
               "mlp.shared_experts.down_proj")
    for layer in range(n_layers):
        for stem, shape in (("self_attn.v_proj", (256, 256)), ("mlp.down_proj", (256, 512)),
                            ("self_attn.o_proj", (256, 256)), ("input_layernorm", (256,)),
                            *((expert, (256, 512)) for expert in experts)):
            infos.append(TensorInfo(f"model.layers.{layer}.{stem}.weight", shape, "BF16", 0))
    config = {"num_hidden_layers": n_layers}

    def types(mix: str, stem: str) -> list[str]:
        plans = gguf_plans(infos, recipe_for(mix), config)
        return [stored_type(p) for p in plans if f".{stem}." in p.name]

    more_bits = [0, 1, 4, 7, 10, 13, 14, 15]   # llama.cpp's use_more_bits for 16 layers
    assert types("Q4_K_M", "v_proj") == ["Q6_K" if i in more_bits else "Q4_K" for i in range(n_layers)]
    assert types("Q4_K_M", "mlp.down_proj") == ["Q6_K" if i in more_bits else "Q4_K" for i in range(n_layers)]
    assert types("Q4_K_M", "o_proj") == ["Q4_K"] * n_layers
    for expert in experts:
        assert types("Q4_K_M", expert) == [
            "Q6_K" if i in more_bits else "Q4_K" for i in range(n_layers)], expert
        assert types("Q3_K_M", expert) == ["Q5_K"] + ["Q4_K"] * 15, expert
    assert types("Q4_K_S", "v_proj") == ["Q5_K"] * 4 + ["Q4_K"] * 12
    assert types("Q4_K_S", "mlp.down_proj") == ["Q5_K"] * 2 + ["Q4_K"] * 14
    assert types("Q3_K_M", "v_proj") == ["Q5_K"] * 2 + ["Q4_K"] * 14
    assert types("Q3_K_M", "mlp.down_proj") == ["Q5_K"] + ["Q4_K"] * 15
    assert types("Q3_K_M", "o_proj") == ["Q4_K"] * n_layers
    assert types("Q5_K_M", "v_proj") == ["Q6_K" if i in more_bits else "Q5_K" for i in range(n_layers)]
    plans = {p.name: stored_type(p) for p in gguf_plans(infos, recipe_for("Q4_K_M"), config)}
    assert plans["lm_head.weight"] == "Q6_K" and plans["model.embed_tokens.weight"] == "Q4_K"
    assert plans["model.layers.3.input_layernorm.weight"] == "F32"


def test_tied_embeddings_get_the_output_type():
    infos = [TensorInfo("model.embed_tokens.weight", (1024, 256), "BF16", 0)]
    for mix, expected in (("Q4_K_M", "Q6_K"), ("Q4_0", "Q6_K"), ("Q8_0", "Q8_0")):
        plans = gguf_plans(infos, recipe_for(mix), {"num_hidden_layers": 4})
        assert stored_type(plans[0]) == expected
    assert plain_type_recipe("Q4_0").rules[0].scheme == "Q6_K"


def test_unsupported_architecture_is_refused_before_writing(tiny_llama_dir, tmp_path):
    folder = tmp_path / "neox"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    with resolve(str(folder)) as source:
        plans = gguf_plans(source.tensors(), Recipe(scheme="Q8_0"), source.config)
        with pytest.raises(Unsupported, match="gpt_neox"):
            GGUFSink(tmp_path / "out.gguf", source, plans, force=False)
    assert not (tmp_path / "out.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_needs_force_and_abort_leaves_nothing(tiny_llama_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"GGUF old")      # a GGUF: what --force may replace
    with resolve(str(tiny_llama_dir)) as source:
        plans = gguf_plans(source.tensors(), Recipe(scheme="Q8_0"), source.config)
        with pytest.raises(OutputExists):
            GGUFSink(out, source, plans, force=False)
        sink = GGUFSink(out, source, plans, force=True)
        sink.add(plans[0], source.load(plans[0].name))
        sink.abort()
    assert out.read_bytes() == b"GGUF old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.slow
def test_gguf_input_requantizes(smollm2_gguf, tmp_path):
    """A quantized GGUF source (SmolLM2, Q4_1) written again as Q4_0: the tensors that the source
    stored as Q4_1 come back as the Q4_0 of their dequantized values."""
    out = write_gguf(smollm2_gguf, "Q4_0", tmp_path / "smol-q4_0.gguf")
    tensors = {t.name: t for t in GGUFReader(out).tensors}
    source = {t.name: t for t in GGUFReader(smollm2_gguf).tensors}
    name = "blk.2.ffn_up.weight"
    # The source hands out the model's dtype (float16 for a quantized file without F16 tensors).
    values = quants.dequantize(np.asarray(source[name].data), source[name].tensor_type).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(tensors[name].data),
                                  quants.quantize(values.astype(np.float32), GGMLQuantizationType.Q4_0))
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0   # 576 % 256: Q6_K -> Q8_0
    assert "output.weight" not in tensors
    assert ggml_type("Q4_0").nbytes((1536, 576)) == int(tensors["blk.2.ffn_up.weight"].n_bytes)
