"""Every architecture qtool writes as GGUF, from one record each (qtool/architectures.py).

Each architecture is a tiny random checkpoint built with transformers' own config class (float32,
SmolLM2's tokenizer), the mixtures of experts included (their experts merged into llama.cpp's 3-D
ffn_*_exps tensors and split again when read back). qtool's F16 GGUF must give llama.cpp the logits transformers gives (same
top-1 at every position, |diff| <= 2e-3 x the largest |logit|), Q8_0 must load and run, and qtool
must read its own GGUF back to the Hugging Face names, config and weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qtool import architectures
from qtool.errors import Unsupported
from qtool.sources.resolve import resolve

from tests._architectures import ALL_VARIANTS, SIZES, VARIANTS
from tests._gguf_helpers import llamacpp_logits, llamacpp_model, transformers_logits, write_gguf

ARCHS = list(ALL_VARIANTS)
PROMPT = "The capital of France is Paris, and the capital of Germany is Berlin. 12345"
LOGIT_TOLERANCE = 2e-3   # relative to the largest |logit| of the prompt


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, arch_checkpoint) -> tuple[str, Path]:
    return request.param, arch_checkpoint(request.param, 49152)


def _hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as qtool sees them (gpt-oss's fused experts one matrix per expert)."""
    with resolve(str(folder)) as source:
        return {info.name: source.load(info.name) for info in source.tensors()}


def test_record_names_cover_the_transformers_model(checkpoint: tuple[str, Path]) -> None:
    variant, folder = checkpoint
    model_type = ALL_VARIANTS[variant][0]
    record = architectures.architecture({"model_type": model_type})
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[record.gguf_arch]}
    # A mixture of experts is told from the dense architecture of its GGUF name by its expert count.
    metadata = {f"{record.name}.expert_count": 4} if record.is_moe else None
    with resolve(str(folder)) as source:    # as qtool sees the checkpoint (gpt-oss's fused experts per expert)
        names = [info.name for info in source.tensors()]
    for name in names:
        gguf_name = architectures.hf_to_gguf_name(name, model_type)
        # A name gguf-py lists for this architecture (blk.N.x -> blk.{bid}.x), and back to the same HF name
        # (one expert's matrix: to the merged name it is a slice of).
        stem = gguf_name.rsplit(".", 1)[0]
        parts = stem.split(".")
        template = "blk.{bid}." + ".".join(parts[2:]) if parts[0] == "blk" else stem
        assert template in allowed, (name, gguf_name)
        merged = architectures.merged_expert_name(name)
        assert (merged is not None) == ("_exps." in gguf_name), name
        assert architectures.gguf_to_hf_name(gguf_name, record.name, metadata) == (merged[0] if merged else name)


def test_unknown_architecture_refused_in_one_message() -> None:
    with pytest.raises(Unsupported, match="architecture 'falcon' is not supported; qtool handles llama, "):
        architectures.check_supported({"model_type": "falcon"})
    with pytest.raises(Unsupported, match="GGUF architecture 'falcon' is not supported"):
        architectures.hf_config_from_gguf({"general.architecture": "falcon"})


def test_metadata_keys_the_converter_writes() -> None:
    qwen3 = {"model_type": "qwen3", **SIZES, "vocab_size": 49152, "head_dim": 32}
    metadata = architectures.gguf_metadata_from_hf(qwen3)
    assert metadata["qwen3.attention.key_length"] == metadata["qwen3.attention.value_length"] == 32
    granite = {"model_type": "granite", **SIZES, "vocab_size": 49152, "head_dim": 16, **VARIANTS["granite"][1]}
    metadata = architectures.gguf_metadata_from_hf(granite)
    assert "granite.attention.key_length" not in metadata   # GraniteModel drops head_dim
    assert (metadata["granite.embedding_scale"], metadata["granite.residual_scale"],
            metadata["granite.attention.scale"], metadata["granite.logit_scale"]) == (4.0, 0.5, 0.1, 2.0)
    back = architectures.hf_config_from_gguf(metadata, tensor_names=["token_embd.weight", "output.weight"])
    assert {k: back[k] for k in VARIANTS["granite"][1]} == pytest.approx(VARIANTS["granite"][1])
    phi3 = {"model_type": "phi3", **SIZES, "vocab_size": 49152, "partial_rotary_factor": 0.5, "sliding_window": 64}
    metadata = architectures.gguf_metadata_from_hf(phi3)
    assert metadata["phi3.rope.dimension_count"] == 8 and metadata["phi3.attention.sliding_window"] == 64
    back = architectures.hf_config_from_gguf(metadata, tensor_names=["token_embd.weight"])
    assert back["partial_rotary_factor"] == 0.5 and back["sliding_window"] == 64 and back["tie_word_embeddings"]


def test_rope_factors_are_the_ones_transformers_applies() -> None:
    """llama.cpp divides each rotary frequency by rope_freqs (Llama 3) or multiplies by the longrope
    factors (Phi-3): qtool's tensors must be what transformers' own rotary embedding computes."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model_type, fields = VARIANTS["llama3"]
    config = AutoConfig.for_model(model_type, **SIZES, vocab_size=256, **fields)
    extra = architectures.gguf_extra_tensors(config.to_dict())
    head_dim = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    plain = 1.0 / (fields["rope_parameters"]["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    scaled = LlamaRotaryEmbedding(config).inv_freq
    assert set(extra) == {"rope_freqs.weight"} and extra["rope_freqs.weight"].dtype == torch.float32
    assert float(extra["rope_freqs.weight"].max()) == 8.0 and float(extra["rope_freqs.weight"].min()) == 1.0
    torch.testing.assert_close(extra["rope_freqs.weight"], plain / scaled, rtol=1e-5, atol=0)

    factors = {"long_factor": [1.0 + i for i in range(8)], "short_factor": [1.0 + i / 8 for i in range(8)]}
    phi3 = {"model_type": "phi3", **SIZES, "vocab_size": 256, "max_position_embeddings": 8192,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                "original_max_position_embeddings": 1024, **factors}}
    extra = architectures.gguf_extra_tensors(phi3)
    assert extra["rope_factors_long.weight"].tolist() == factors["long_factor"]
    assert extra["rope_factors_short.weight"].tolist() == factors["short_factor"]
    metadata = architectures.gguf_metadata_from_hf(phi3)
    assert metadata["phi3.rope.scaling.attn_factor"] == pytest.approx(math.sqrt(1 + math.log(8) / math.log(1024)))
    assert metadata["phi3.rope.scaling.original_context_length"] == 1024
    assert architectures.gguf_extra_tensors({"model_type": "llama", **SIZES, "vocab_size": 256}) == {}


def _tokens(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))(PROMPT, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_llamacpp_logits_match_transformers(checkpoint: tuple[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    variant, folder = checkpoint
    model_type, fields = ALL_VARIANTS[variant]
    tokens = _tokens(folder)
    reference = transformers_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokens)

    original = _hf_state(folder)
    f16 = write_gguf(folder, "F16", tmp_path / "model-f16.gguf")
    metadata = {key: field.contents() for key, field in gguf.GGUFReader(f16).fields.items()
                if not key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"))}
    # Keys llama.cpp's converter writes: the parameter count label, the BOS choice (SmolLM2 adds none).
    merged: dict[str, list[tuple[int, ...]]] = {}
    for name, weight in original.items():
        if (expert := architectures.merged_expert_name(name)) is not None:
            merged.setdefault(expert[0], []).append(tuple(weight.shape))
    assert metadata["general.size_label"] == architectures.size_label(
        (w.shape for name, w in original.items() if architectures.merged_expert_name(name) is None),
        ((len(shapes), *shapes[0]) for shapes in merged.values()))
    assert metadata["tokenizer.ggml.add_bos_token"] is False
    arch = metadata["general.architecture"]
    if fields.get("head_dim"):
        assert metadata[f"{arch}.attention.key_length"] == metadata[f"{arch}.attention.value_length"] \
            == fields["head_dim"]
    if merged:   # a mixture of experts: 3 merged tensors a layer, and the expert counts
        assert metadata[f"{arch}.expert_count"] == 4 and metadata[f"{arch}.expert_used_count"] == 2
        merged_weights = [name for name in merged if name.endswith(".weight")]   # (gpt-oss's biases merge too)
        assert len(merged_weights) == 3 * (SIZES["num_hidden_layers"] - fields.get("first_k_dense_replace", 0))
    got = llamacpp_logits(llamacpp_model(f16), tokens)
    assert np.array_equal(got.argmax(-1), reference.argmax(-1)), model_type
    assert np.abs(got - reference).max() <= LOGIT_TOLERANCE * np.abs(reference).max(), model_type

    q8 = write_gguf(folder, "Q8_0", tmp_path / "model-q8.gguf")
    got_q8 = llamacpp_logits(llamacpp_model(q8), tokens)
    assert np.isfinite(got_q8).all()
    assert np.corrcoef(got_q8.ravel(), reference.ravel())[0, 1] > 0.99
    # llama-quantize's Q4_K_M mix (K-quants with their fallbacks on these 64-wide rows) loads and runs.
    q4km = write_gguf(folder, "Q4_K_M", tmp_path / "model-q4km.gguf")
    got_q4 = llamacpp_logits(llamacpp_model(q4km), tokens)
    assert np.isfinite(got_q4).all()
    assert np.corrcoef(got_q4.ravel(), reference.ravel())[0, 1] > 0.9

    # GGUF as input: the same HF names, config and (F16-rounded) weights.
    with resolve(str(f16)) as source:
        # Llama 3's and longrope's scaling come back from the rope tensors.
        rope = json.loads((folder / "config.json").read_text()).get("rope_parameters") or {}
        for field_name in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings", "long_factor", "short_factor"):
            if field_name in rope and rope.get("rope_type") != "default":
                assert source.config["rope_parameters"][field_name] == pytest.approx(rope[field_name]), field_name
        # A GGUF reads back as its record's first model_type (llama.cpp writes Mistral as llama).
        assert source.config["model_type"] == architectures.architecture({"model_type": model_type}).model_types[0]
        assert {info.name for info in source.tensors()} == set(original)
        for name, weight in original.items():
            assert torch.allclose(source.load(name).float(), weight, atol=1e-3, rtol=1e-3), name
        config = {k: v for k, v in source.config.items() if k not in ("torch_dtype", "dtype", "architectures")}
        from transformers import AutoConfig

        if architectures.architecture({"model_type": model_type}).fused_experts is not None:
            # No loader of transformers' fuses gpt-oss's per-expert matrices: qtool's evaluator does.
            from qtool.evaluation.model import model_from_source

            back = model_from_source(source)
        elif merged:
            # transformers fuses per-expert matrices only in its own loader: a folder it loads.
            from safetensors.torch import save_file

            (tmp_path / "back").mkdir()
            AutoConfig.for_model(**config).save_pretrained(tmp_path / "back")
            save_file({name: source.load(name).float().contiguous() for name in original},
                      tmp_path / "back" / "model.safetensors", metadata={"format": "pt"})
            back = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
        else:
            back = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).to(torch.float32).eval()
            missing, unexpected = back.load_state_dict({name: source.load(name).float() for name in original},
                                                       strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)   # tied: no lm_head
    read_back = transformers_logits(back, tokens)
    assert np.array_equal(read_back.argmax(-1), reference.argmax(-1))

    from qtool.cli import app

    result = CliRunner().invoke(app, ["inspect", str(f16), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # Every checkpoint tensor, and the ones llama.cpp's converter computes from the config (no HF name).
    computed = set(architectures.gguf_extra_tensors(json.loads((folder / "config.json").read_text())))
    # (a merged experts tensor by the merged name its experts' matrices are slices of)
    assert {row["hf_name"] for row in report["tensors"] if row["name"] not in computed} == \
        {name for name in original if architectures.merged_expert_name(name) is None} | set(merged)
    assert {row["name"] for row in report["tensors"] if row["hf_name"] is None} == computed
    assert computed == {"llama3": {"rope_freqs.weight"},
                        "phi3-longrope": {"rope_factors_long.weight", "rope_factors_short.weight"}}.get(variant, set())
