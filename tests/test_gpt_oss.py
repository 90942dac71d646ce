"""gpt-oss (issue #18): experts stored fused by the checkpoint itself (``mlp.experts.gate_up_proj`` [E, H, 2I],
input-major, gate and up interleaved, with biases), in MXFP4 in OpenAI's checkpoints.

qtool sees them one matrix and bias per expert (qtool/sources/fused_experts.py), so GGUF, calibration and
the report treat them as every other mixture of experts' (GGUF and llama.cpp logits: tests/test_gguf_*.py).
Here: transformers' MXFP4 checkpoints read as transformers dequantizes them, GPTQ on the experts into a
GGUF llama.cpp runs, and the safetensors formats refused (transformers loads no per-expert gpt-oss).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qtool.cli import app

from tests._safetensors_helpers import logits

VOCAB_SIZE = 49152
PROMPT_IDS = [1, 50, 73, 120, 9, 201, 33, 250, 17, 88, 5, 17, 200, 33]
CALIB_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "groups_merged.txt"
CALIB_ARGS = ("--calib", CALIB_TEXT, "--calib-samples", "4", "--calib-seqlen", "32")


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def gpt_oss(arch_checkpoint) -> Path:
    return arch_checkpoint("gpt_oss", VOCAB_SIZE)


@pytest.fixture(scope="module")
def mxfp4_checkpoint(gpt_oss: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny gpt-oss in OpenAI's on-disk form: experts as uint8 ``*_blocks`` [E, out, in / 32, 16] (two
    E2M1 codes a byte, the even element low) and E8M0 ``*_scales`` [E, out, in / 32] of random codes,
    config.json's quantization_config saying mxfp4; everything else as it was."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("mxfp4")
    for path in gpt_oss.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    (stored,) = gpt_oss.glob("*.safetensors")
    state = load_file(stored)
    generator = torch.Generator().manual_seed(3)
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = state.pop(name).shape
        state[f"{name}_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), dtype=torch.uint8,
                                                generator=generator)
        state[f"{name}_scales"] = torch.randint(118, 123, (experts, outputs, inputs // 32), dtype=torch.uint8,
                                                generator=generator)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((gpt_oss / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_mxfp4_checkpoint_reads_as_transformers_dequantizes_it(mxfp4_checkpoint: Path) -> None:
    """qtool's MXFP4 reader gives the weights transformers' own loader dequantizes (on a CPU it always
    dequantizes): the same logits, and the per-expert matrices of its fused parameters."""
    from transformers import AutoModelForCausalLM

    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve

    theirs = AutoModelForCausalLM.from_pretrained(mxfp4_checkpoint, dtype=torch.float32).eval()
    with resolve(str(mxfp4_checkpoint)) as source:
        assert source.is_quantized
        experts = theirs.model.layers[1].mlp.experts
        gate = source.load("model.layers.1.mlp.experts.2.gate_proj.weight")
        down = source.load("model.layers.1.mlp.experts.3.down_proj.weight")
        assert torch.equal(gate.float(), experts.gate_up_proj[2][:, 0::2].T)
        assert torch.equal(down.float(), experts.down_proj[3].T)
        ours = model_from_source(source)
    assert torch.equal(logits(ours, [PROMPT_IDS]), logits(theirs, [PROMPT_IDS]))


def test_safetensors_formats_are_refused_in_one_line(gpt_oss: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("quantize", gpt_oss, "-o", out, "--scheme", "int4-sym")
    assert result.exit_code == 4, result.output
    error = result.stderr.strip()
    assert "gpt_oss" in error and "--format gguf" in error and "\n" not in error
    assert not out.exists()


def test_gptq_on_every_expert_into_a_gguf_llamacpp_runs(mxfp4_checkpoint: Path, tmp_path: Path) -> None:
    """GPTQ from the MXFP4 checkpoint: every expert matrix calibrated (its own routed tokens, counted), the
    merged GGUF tensors written, llama.cpp's logits those of qtool's read-back of the file."""
    from tests._gguf_helpers import llamacpp_logits, llamacpp_model, transformers_logits

    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve

    out = tmp_path / "gptq.gguf"
    result = run_cli("quantize", mxfp4_checkpoint, "-o", out, "--type", "Q8_0", "--method", "gptq", *CALIB_ARGS,
                     "--expert-min-tokens", "1", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    calibration = report["calibration"]
    assert calibration["fallbacks"] == {}
    assert [sum(counts) for counts in calibration["expert_tokens"].values()] == [4 * 32 * 2] * 2
    assert report["experts"]["tensors"] == 2 * 4 * 3 and report["experts"]["scheme"] == "Q8_0"

    pytest.importorskip("llama_cpp")
    with resolve(str(out)) as opened:
        expected = transformers_logits(model_from_source(opened), PROMPT_IDS)
    got = llamacpp_logits(llamacpp_model(out), PROMPT_IDS)
    # (llama.cpp rounds activations to 8 bits in Q8_0 products: close, not equal)
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99


def test_mxfp4_moe_gguf_keeps_the_checkpoint_experts_exactly(mxfp4_checkpoint: Path, tmp_path: Path) -> None:
    """--type MXFP4_MOE (llama-quantize's mix: routed experts MXFP4, Q8_0 elsewhere, Q6_K output): from OpenAI's
    MXFP4 checkpoint the experts keep their values exactly (same blocks along the same rows), and llama.cpp runs
    the file with the logits of its read-back."""
    from gguf import GGUFReader, LlamaFileType

    from qtool.sources.resolve import resolve
    from tests._gguf_helpers import llamacpp_logits, llamacpp_model, transformers_logits

    from qtool.evaluation.model import model_from_source

    out = tmp_path / "mxfp4.gguf"
    result = run_cli("quantize", mxfp4_checkpoint, "-o", out, "--type", "MXFP4_MOE", "--json")
    assert result.exit_code == 0, result.stderr
    reader = GGUFReader(out)
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert int(reader.fields["general.file_type"].parts[-1][0]) == LlamaFileType.MOSTLY_MXFP4_MOE
    experts = {name: kind for name, kind in types.items() if "_exps.weight" in name}
    assert len(experts) == 2 * 3 and set(experts.values()) == {"MXFP4"}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    with resolve(str(mxfp4_checkpoint)) as source, resolve(str(out)) as written:
        names = [info.name for info in source.tensors() if ".experts." in info.name and info.name.endswith("proj.weight")]
        assert len(names) == 2 * 4 * 3
        for name in names:
            assert torch.equal(written.load(name).float(), source.load(name).float()), name
        expected = transformers_logits(model_from_source(written), PROMPT_IDS)
    pytest.importorskip("llama_cpp")
    got = llamacpp_logits(llamacpp_model(out), PROMPT_IDS)
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99
