"""`qtool inspect` on real files: the llama.cpp-written SmolLM2 GGUF, transformers-written and
synthetic safetensors folders, and quantization metadata."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from qtool.cli import app
from qtool.inspect import inspect_model, recognise_quantization, render_inspect
from qtool.synthetic import SHAPES, write_synthetic_llama


def test_inspect_packaged_gguf_cli_json(smollm2_gguf: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "qtool", "inspect", "smollm2-135m", "--json"],
                          check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # exactly one JSON document
    assert report["format"] == "gguf" and report["version"] == 3 and report["alignment"] == 32
    assert report["tensor_count"] == 272 and len(report["tensors"]) == 272
    types = {row["type"]: row for row in report["types"]}
    assert set(types) == {"Q4_1", "Q8_0", "F32"}
    assert (types["Q4_1"]["tensors"], types["Q8_0"]["tensors"], types["F32"]["tensors"]) == (210, 1, 61)
    assert types["Q4_1"]["bits_per_weight"] == 5.0 and types["Q8_0"]["bits_per_weight"] == 8.5
    file_size = smollm2_gguf.stat().st_size
    assert report["file_size"] == file_size
    assert report["header_bytes"] + report["tensor_bytes"] + report["padding_bytes"] == file_size
    assert sum(row["bytes"] for row in report["tensors"]) == report["tensor_bytes"]
    assert 0 <= report["padding_bytes"] < 272 * 32
    # Long arrays are summarized, short values kept.
    tokens = report["metadata"]["tokenizer.ggml.tokens"]
    assert tokens["length"] == 49152 and tokens["first"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert report["metadata"]["llama.block_count"] == 30
    embd = next(row for row in report["tensors"] if row["name"] == "token_embd.weight")
    assert embd["shape"] == [49152, 576] and embd["type"] == "Q8_0" and embd["bytes"] == 49152 * 576 // 32 * 34
    assert embd["hf_name"] == "model.embed_tokens.weight"
    # Cross-check against gguf-py's reader of the same file.
    from gguf import GGUFReader

    reader = GGUFReader(smollm2_gguf)
    assert {t.name: int(t.n_bytes) for t in reader.tensors} == {row["name"]: row["bytes"] for row in report["tensors"]}


def test_inspect_tensor_glob_and_rendering(smollm2_gguf: Path) -> None:
    report = inspect_model(str(smollm2_gguf), tensors="blk.0.*")
    assert len(report.tensors) == 9 and report.tensor_count == 272
    assert {row.type for row in report.tensors} == {"Q4_1", "F32"}
    assert sum(summary.tensors for summary in report.types) == 9
    # Hugging Face names match too.
    assert [row.name for row in inspect_model(str(smollm2_gguf), tensors="*layers.3.self_attn.q_proj*").tensors] \
        == ["blk.3.attn_q.weight"]
    console = Console(record=True, width=160)
    render_inspect(report, console, metadata=False)
    text = console.export_text()
    assert "blk.0.attn_q.weight" in text and "Q4_1" in text and "tokenizer.ggml.tokens" not in text
    console = Console(record=True, width=160)
    render_inspect(report, console)
    assert "ARRAY[STRING] x49152" in console.export_text()


def test_inspect_cli_table_and_options(smollm2_gguf: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", "smollm2-135m", "--tensors", "output_norm*", "--no-metadata"])
    assert result.exit_code == 0, result.stderr
    assert "output_norm.weight" in result.stdout and "general.architecture" not in result.stdout
    result = CliRunner().invoke(app, ["inspect", "smollm2-135m", "--tensors", "nothing-like-this", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["tensors"] == []


def test_inspect_transformers_written_folder(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    report = inspect_model(str(tmp_path / "hf"))
    assert report.format == "safetensors" and len(report.files) > 1
    assert report.architecture == "LlamaForCausalLM"
    names = {row.name for row in report.tensors}
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert {row.type for row in report.tensors} == {"BF16"}
    assert report.bits_per_weight == 16.0
    total = sum(path.stat().st_size for path in (tmp_path / "hf").glob("*.safetensors"))
    assert report.file_size == total == report.header_bytes + report.tensor_bytes + report.padding_bytes
    assert report.metadata.get("format") == "pt"


def test_inspect_single_safetensors_file(tmp_path: Path) -> None:
    folder = write_synthetic_llama(tmp_path / "m", **SHAPES["tiny"], dtype=torch.float16)
    report = inspect_model(str(folder / "model.safetensors"), tensors="*norm*")
    assert report.tensor_count == 21 and len(report.tensors) == 5
    assert report.types[0].type == "F16"
    assert report.quantization is None
    assert report.header_bytes + report.tensor_bytes + report.padding_bytes == report.file_size
    with pytest.raises(Exception, match="revision"):
        inspect_model(str(folder), revision="main")


def test_recognise_quantization_metadata() -> None:
    bnb = recognise_quantization({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                                          "bnb_4bit_quant_type": "nf4"}}, {}, [])
    assert bnb["method"] == "bitsandbytes" and bnb["details"]["bnb_4bit_quant_type"] == "nf4"
    ct = recognise_quantization({"quantization_config": {"quant_method": "compressed-tensors",
                                                         "format": "pack-quantized", "config_groups": {}}}, {}, [])
    assert ct["method"] == "compressed-tensors" and ct["details"]["format"] == "pack-quantized"
    own = recognise_quantization({}, {"qtool": json.dumps({"scheme": "int8-sym"})}, [])
    assert own["method"] == "qtool" and own["qtool"]["qtool"]["scheme"] == "int8-sym"
    by_names = recognise_quantization({}, {}, ["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"])
    assert by_names["method"] == "bitsandbytes" and by_names["details"]["quant_type"] == "nf4"
    assert recognise_quantization({}, {}, ["model.layers.0.mlp.up_proj.weight_packed"])["method"] == \
        "compressed-tensors"
    assert recognise_quantization({}, {"format": "pt"}, ["a.weight"]) is None


def test_inspect_bitsandbytes_checkpoint_written_by_transformers(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    source = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).save_pretrained(source)
    try:
        model = LlamaForCausalLM.from_pretrained(
            source, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
            device_map="cpu")
        model.save_pretrained(tmp_path / "nf4")
    except Exception as exc:  # noqa: BLE001 - bitsandbytes CPU support varies by build
        pytest.skip(f"transformers cannot write a bitsandbytes 4-bit checkpoint here: {exc}")
    report = inspect_model(str(tmp_path / "nf4"))
    assert report.quantization["method"] == "bitsandbytes"
    assert report.quantization["details"]["bnb_4bit_quant_type"] == "nf4"
    assert "U8" in {row.type for row in report.tensors}
