"""The safetensors sinks: streaming shard writer, folder contents, refusals, atomicity, and reading
outputs back (qtool's and transformers' own) through qtool.sources.quantized."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qtool.errors import BadArgument, OutputExists
from qtool.plan import Recipe, TensorPlan
from qtool.schemes.base import get_scheme
from qtool.sinks.bnb import BnbSink
from qtool.sinks.compressed import CompressedSink
from qtool.sinks.safetensors_io import OutputTensor, ShardedWriter, entry_bound
from qtool.sources.resolve import resolve

from tests._safetensors_helpers import dequantized_state, write_output

REPO = Path(__file__).resolve().parents[1]


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            assert handle.metadata()["format"] == "pt"
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


def test_sharded_writer_streams_exact_files(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(10 + i, 7, generator=generator).to(torch.bfloat16) for i in range(6)}
    tensors["ints"] = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    tensors["scalar"] = torch.tensor(0, dtype=torch.uint8)
    # A tensor whose size is only bounded in advance (like bitsandbytes' quant-state JSON).
    tensors["variable"] = torch.frombuffer(bytearray(b'{"a": 1}'), dtype=torch.uint8)
    groups = [[entry_bound(name, value.dtype, tuple(value.shape))] for name, value in tensors.items()
              if name != "variable"]
    groups.append([OutputTensor("variable", 64, json.dumps({"dtype": "U8", "shape": [64], "data_offsets": [0, 0]}))])
    writer = ShardedWriter(tmp_path, groups, max_shard_size=400)
    assert len(writer.file_names) > 2
    # Arrival order differs from plan order within the last shard: offsets follow arrival.
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = read_folder(tmp_path)
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    # Every shard respects the limit (each tensor here is smaller than it).
    for file_name in writer.file_names:
        header_size = int.from_bytes((tmp_path / file_name).read_bytes()[:8], "little")
        assert (tmp_path / file_name).stat().st_size - 8 - header_size <= 400


def test_writer_refuses_unplanned_and_incomplete(tmp_path):
    writer = ShardedWriter(tmp_path, [[entry_bound("a", torch.float32, (2,))], [entry_bound("b", torch.float32, (2,))]],
                           max_shard_size=10**9)
    with pytest.raises(ValueError):
        writer.write("c", torch.zeros(2))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError):
        writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError):
        writer.close()
    writer.abort()


@pytest.mark.parametrize("scheme,params", [("nf4", {}), ("int8-sym", {}), ("int4-asym", {"group_size": 32}),
                                           ("int8-asym", {})])
def test_output_folder(tiny_llama_dir, tmp_path, scheme, params):
    out, plans = write_output(tiny_llama_dir, tmp_path / "out", Recipe(scheme=scheme, params=params),
                              max_shard_size=4_000_000)
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "README.md", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json"} <= files
    assert (out / "README.md").read_text() == "# test model card\n"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")], "staging folder left behind"
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    quant = config["quantization_config"]
    tensors = read_folder(out)
    sink = BnbSink if get_scheme(scheme).family == "bnb" else CompressedSink
    with resolve(str(tiny_llama_dir)) as source:
        for plan in plans:
            if plan.keep:
                # kept tensors: same dtype and bytes as the source
                assert torch.equal(tensors[plan.name], source.load(plan.name))
                assert tensors[plan.name].dtype == torch.bfloat16
    written = {plan.name: 0 for plan in plans}
    for plan in plans:
        for entry in sink.outputs(plan, torch.bfloat16):
            written[plan.name] += tensors[entry.name].numel() * tensors[entry.name].element_size()
        if scheme == "nf4" and not plan.keep:
            assert 0 <= sink.packed_nbytes(plan) - written[plan.name] < 64   # quant-state JSON bound
        else:
            assert sink.packed_nbytes(plan) == written[plan.name]
    assert sum(written.values()) == sum(t.numel() * t.element_size() for t in tensors.values())
    if scheme == "nf4":
        assert quant["quant_method"] == "bitsandbytes" and quant["load_in_4bit"] and quant["bnb_4bit_use_double_quant"]
        assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_compute_dtype"] == "bfloat16"
        state = bytes(tensors["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"].tolist())
        assert json.loads(state)["shape"] == [128, 64]
        assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (128 * 64 // 2, 1)
    elif scheme == "int8-sym":
        assert quant["load_in_8bit"] and not quant["load_in_4bit"]
        assert tensors["model.layers.0.mlp.up_proj.SCB"].dtype == torch.float32
        assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
        assert int(tensors["model.layers.0.mlp.up_proj.weight_format"]) == 0
    else:
        assert quant["quant_method"] == "compressed-tensors" and quant["quantization_status"] == "compressed"
        (group,) = quant["config_groups"].values()
        assert len(group["targets"]) == 14 and "lm_head" not in group["targets"]


def test_outputs_read_back_as_dequantized_weights(tiny_llama_dir, tmp_path):
    """qtool eval/quantize on an output see the float weights: names, shapes and values."""
    for scheme, params in (("nf4", {}), ("fp4", {"double_quant": False}), ("int8-sym", {}), ("int8-asym", {}),
                           ("int4-sym", {"group_size": 64}), ("int4-asym", {"group_size": 32})):
        out, plans = write_output(tiny_llama_dir, tmp_path / scheme, Recipe(scheme=scheme, params=params))
        expected = dequantized_state(tiny_llama_dir, plans)
        with resolve(str(out)) as source:
            assert source.is_quantized and "quantization_config" not in source.config
            infos = source.tensors()
            assert [(i.name, i.shape) for i in infos] == [(p.name, p.shape) for p in plans]
            for info in infos:
                assert torch.equal(source.load(info.name), expected[info.name]), (scheme, info.name)


def test_reads_transformers_bitsandbytes_outputs(tiny_llama_dir, tmp_path):
    """Folders written by transformers' own save_pretrained (bitsandbytes NF4 and int8) read back as
    bitsandbytes' dequantized weights."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    configs = {"nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16),
               "int8": BitsAndBytesConfig(load_in_8bit=True)}
    for name, config in configs.items():
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config, device_map="cpu",
                                                     dtype=torch.bfloat16)
        layer = model.model.layers[1].self_attn.o_proj
        if name == "nf4":
            expected = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        else:
            expected = bnb.functional.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB).to(torch.bfloat16)
        model.save_pretrained(tmp_path / name)
        with resolve(str(tmp_path / name)) as source:
            assert torch.equal(source.load("model.layers.1.self_attn.o_proj.weight"), expected)
            assert not [i for i in source.tensors() if "absmax" in i.name or i.name.endswith("SCB")]


def test_refusals(tiny_llama_dir, tmp_path):
    recipe = Recipe(scheme="nf4")
    out, _ = write_output(tiny_llama_dir, tmp_path / "out", recipe)
    with pytest.raises(OutputExists):
        write_output(tiny_llama_dir, out, recipe)
    before = (out / "config.json").read_text()
    write_output(tiny_llama_dir, out, Recipe(scheme="int8-sym"), force=True)
    assert (out / "config.json").read_text() != before
    with resolve(str(tiny_llama_dir)) as source:
        infos = source.tensors()
        plans = [TensorPlan(i.name, i.shape, "keep") for i in infos]
        quantized = [TensorPlan(i.name, i.shape, "int4-sym", {"group_size": 48}) if "mlp.up_proj" in i.name else p
                     for i, p in zip(infos, plans)]
        with pytest.raises(BadArgument, match="group-size 48"):
            CompressedSink(tmp_path / "g", source, quantized, force=False)
        mixed = [TensorPlan(p.name, p.shape, "int8-sym" if "up_proj" in p.name else "nf4")
                 if p.name.startswith("model.layers.") and len(p.shape) == 2 else p for p in plans]
        with pytest.raises(BadArgument, match="mix"):
            BnbSink(tmp_path / "m", source, mixed, force=False)
        with pytest.raises(BadArgument):
            BnbSink(tmp_path / "f", source, [TensorPlan("x.weight", (4, 64), "int4-sym")], force=False)
        assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_refused_and_nothing_left(tiny_llama_dir, tmp_path, bad):
    with resolve(str(tiny_llama_dir)) as source:
        from qtool.plan import build_plan

        plans = build_plan(source.tensors(), Recipe(scheme="int4-sym", params={"group_size": 32}), 2)
        sink = CompressedSink(tmp_path / "out", source, plans, force=False)
        with pytest.raises(BadArgument, match="model.layers.0.self_attn.q_proj.weight"):
            for plan in plans:
                tensor = source.load(plan.name)
                if plan.name == "model.layers.0.self_attn.q_proj.weight":
                    tensor = tensor.clone()
                    tensor[3, 5] = bad
                sink.add(plan, tensor)
        sink.abort()
    assert os.listdir(tmp_path) == []


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qtool.plan import Recipe, build_plan
    from qtool.sinks.bnb import BnbSink
    from qtool.sources.resolve import resolve

    source = resolve(sys.argv[1])
    plans = build_plan(source.tensors(), Recipe(scheme="nf4"), 2)
    sink = BnbSink(Path(sys.argv[2]), source, plans, force=False, options={"max_shard_size": 2_000_000})
    for index, plan in enumerate(plans):
        sink.add(plan, source.load(plan.name))
        if index == len(plans) // 2:
            print("half", flush=True)
            time.sleep(60)
    sink.finish("card")
""")


def test_killed_mid_write_leaves_no_output(tiny_llama_dir, tmp_path):
    """SIGKILL in the middle of writing (no cleanup can run): nothing appears at OUT; at most a
    hidden staging folder beside it."""
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tiny_llama_dir), str(out)],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "half"
        staged = [name for name in os.listdir(tmp_path) if name.startswith(".out.qtool-tmp-")]
        assert staged and any(name.endswith(".safetensors") for name in os.listdir(tmp_path / staged[0]))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert not out.exists()
    assert all(name.startswith(".") for name in os.listdir(tmp_path))
