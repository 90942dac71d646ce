"""GGUF output never holds what it cannot hold: non-finite or out-of-range weights are refused
(exit 2, naming the tensor) on every kernel path, tensors a block type cannot store are kept
unquantized so that the file reads back, and tensors kept from a quantized GGUF source take the
model's 16-bit dtype instead of float32."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qtool.cli import app
from qtool.kernels.cpu import cpu_kernel
from qtool.plan import build_plan
from qtool.schemes.ggml import ScaleOverflow, ggml_type
from qtool.schemes.int4 import NonFiniteWeight
from qtool.containers.gguf import gguf_plans
from qtool.sinks.gguf import GGUFSink, stored_type
from qtool.plan import TensorPlan
from qtool.sources.base import TensorInfo
from qtool.sources.gguf_file import GGUFFile
from qtool.sources.resolve import resolve

from tests._gguf_helpers import recipe_for, write_gguf

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
PLANTED = "model.layers.1.mlp.down_proj.weight"


def _planted_copy(tiny_llama_dir: Path, folder: Path, value: float) -> Path:
    """A copy of the tiny Llama with ``value`` planted in one bf16 weight."""
    shutil.copytree(tiny_llama_dir, folder)
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    weight = tensors[PLANTED].clone()
    weight[3, 17] = value
    tensors[PLANTED] = weight
    save_file(tensors, shard, metadata={"format": "pt"})
    return folder


def _weight(value: float, dtype: torch.dtype) -> torch.Tensor:
    weight = torch.randn(4, 512, generator=torch.Generator().manual_seed(0)).to(dtype)
    weight[2, 300] = value
    return weight


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_block_type_refuses_inf_and_nan_on_c_and_torch_paths(type_name: str, value: float) -> None:
    scheme = ggml_type(type_name)
    for dtype in (torch.bfloat16, torch.float32):
        weight = _weight(value, dtype)
        assert cpu_kernel(ggml_type(type_name)) is not None          # the C path is the default here
        with pytest.raises(NonFiniteWeight):
            scheme.quantize(weight)
        with pytest.raises(NonFiniteWeight):               # the torch reference (QTOOL_CPU_KERNELS=0)
            scheme._quantize_chunks(weight.reshape(-1, scheme.block_size))


@pytest.mark.parametrize("type_name", BLOCK_TYPES + ["F16"])
@pytest.mark.parametrize("value", [1e30, 3e38, 1e10])
def test_values_whose_scale_overflows_float16_are_refused(type_name: str, value: float) -> None:
    """1e30 gave Q8_0 / Q4_K blocks with an inf fp16 scale; 3e38 overflowed the K-quants' float32
    sums into scales that looked finite. Both are refused, saying why."""
    with pytest.raises(ScaleOverflow, match="float16"):
        ggml_type(type_name).quantize(_weight(value, torch.float32))


def test_mxfp4_refuses_huge_values_without_speaking_of_float16() -> None:
    """MXFP4's block scales are E8M0 exponents: what it refuses is the input limit every type has."""
    with pytest.raises(ScaleOverflow, match="past the 1.07e[+]09 that no GGML type stores") as refused:
        ggml_type("MXFP4").quantize(_weight(1e10, torch.float32))
    assert "float16" not in str(refused.value)


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_large_values_a_type_can_hold_still_round_trip(type_name: str) -> None:
    """The refusal is not a blanket limit: what a type's scale can hold is written and read back."""
    scheme = ggml_type(type_name)
    weight = _weight(1000.0, torch.float32)
    restored = scheme.dequantize(scheme.quantize(weight))
    assert torch.isfinite(restored).all()
    assert abs(float(restored[2, 300]) - 1000.0) < 300


@pytest.mark.parametrize(("type_name", "value", "says"), [
    ("Q8_0", float("inf"), "inf or nan"), ("Q4_K_M", float("nan"), "inf or nan"),
    ("Q8_0", 1e30, "float16"), ("Q4_K_M", 1e30, "float16"),
])
def test_cli_refuses_gguf_with_planted_value_exit_2(tiny_llama_dir: Path, tmp_path: Path, type_name: str,
                                                    value: float, says: str) -> None:
    model = _planted_copy(tiny_llama_dir, tmp_path / "model", value)
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(app, ["quantize", str(model), "--type", type_name, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert PLANTED in result.output and says in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# -- tensors a block type cannot store ----------------------------------------------------------

@pytest.mark.parametrize(("shape", "type_name", "expected"), [
    ((0, 64), "Q8_0", "F16"), ((64, 0), "Q8_0", "F16"), ((0, 256), "Q4_K", "F16"),
    ((64,), "Q8_0", "F32"), ((64, 50), "Q8_0", "F16"), ((64, 96), "Q4_K", "Q5_0"), ((2, 4, 64), "Q8_0", "Q8_0"),
])
def test_unstorable_shapes_are_kept_unquantized_and_read_back(tiny_llama_dir: Path, tmp_path: Path, shape: tuple,
                                                              type_name: str, expected: str) -> None:
    """Written through the sink with one plan given an awkward shape: the file reads back with
    qtool's reader and `qtool inspect`, the tensor stored as llama-quantize would fall back."""
    name = "model.layers.0.mlp.down_proj.weight"
    out = tmp_path / "out.gguf"
    with resolve(str(tiny_llama_dir)) as source:
        plans = gguf_plans(source.tensors(), recipe_for(type_name), source.config)
        plans = [TensorPlan(p.name, shape, type_name) if p.name == name else p for p in plans]
        assert stored_type(next(p for p in plans if p.name == name)) == expected
        sink = GGUFSink(out, source, plans, force=False)
        for plan in plans:
            sink.add(plan, torch.randn(shape) if plan.name == name else source.load(plan.name))
        sink.finish("")
    with GGUFFile(out) as written:
        tensor = written.tensor("blk.0.ffn_down.weight")
        assert (tensor.type_name, tuple(tensor.shape)) == (expected, shape)
    result = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output


def test_sink_refuses_a_tensor_whose_shape_differs_from_the_header(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from qtool.errors import BadArgument

    with resolve(str(tiny_llama_dir)) as source:
        plans = gguf_plans(source.tensors(), recipe_for("Q8_0"), source.config)
        sink = GGUFSink(tmp_path / "out.gguf", source, plans, force=False)
        try:
            with pytest.raises(BadArgument, match="the plan says"):
                sink.add(plans[0], torch.zeros(3, 64))
        finally:
            sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_empty_weights_are_kept_by_default() -> None:
    infos = [TensorInfo("model.layers.0.mlp.down_proj.weight", (0, 64), "BF16", 0),
             TensorInfo("model.layers.0.mlp.up_proj.weight", (64, 64), "BF16", 8192)]
    plans = build_plan(infos, recipe_for("Q8_0"), n_layers=1)
    assert [p.scheme for p in plans] == ["keep", "Q8_0"]


# -- kept tensors from a quantized GGUF source --------------------------------------------------

@pytest.fixture(scope="module")
def tiny_q8_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quantized GGUF (Q8_0 matrices, F32 norms), as a model downloaded from the Hub would be."""
    return write_gguf(tiny_llama_dir, "Q8_0", tmp_path_factory.mktemp("q8") / "tiny-q8_0.gguf")


def test_quantized_gguf_source_hands_out_16_bit_tensors(tiny_q8_gguf: Path, tiny_llama_dir: Path,
                                                        tmp_path: Path) -> None:
    with resolve(str(tiny_q8_gguf)) as source:
        assert source.is_quantized
        assert source.load("model.embed_tokens.weight").dtype == torch.float16      # Q8_0 in the file
        assert source.load("model.norm.weight").dtype == torch.float16              # F32 in the file
    bf16 = write_gguf(tiny_llama_dir, "BF16", tmp_path / "tiny-bf16.gguf")
    with resolve(str(bf16)) as source:
        assert source.load("model.norm.weight").dtype == torch.bfloat16             # the BF16 tensors say so
        assert source.load("model.embed_tokens.weight").dtype == torch.bfloat16


@pytest.mark.slow
def test_nf4_and_int8_from_a_quantized_gguf_keep_16_bit_tensors(tiny_q8_gguf: Path, tmp_path: Path) -> None:
    for bits in ("4", "8"):
        out = tmp_path / f"out-{bits}"
        result = CliRunner().invoke(app, ["quantize", str(tiny_q8_gguf), "--bits", bits, "-o", str(out)])
        assert result.exit_code == 0, result.output
        with safe_open(str(out / "model.safetensors"), "pt") as handle:
            kept = {name: handle.get_slice(name).get_dtype() for name in handle.keys()
                    if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
                    or name.endswith("layernorm.weight")}
        assert kept and set(kept.values()) == {"F16"}, kept


@pytest.mark.slow
def test_gguf_from_a_quantized_gguf_has_no_float32_matrices(tiny_q8_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    result = CliRunner().invoke(app, ["quantize", str(tiny_q8_gguf), "--type", "Q4_0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with GGUFFile(out) as written:
        types = {t.name: t.type_name for t in written.tensors}
    assert all(types[t.name] == "F32" for t in written.tensors if len(t.shape) == 1)   # norms as llama.cpp
    assert "F32" not in {types[t.name] for t in written.tensors if len(t.shape) == 2}
