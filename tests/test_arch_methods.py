"""Calibration-aware quantization and evaluation on every architecture: `qtool calibrate` once, then GPTQ,
AWQ and imatrix from the saved statistics, and `qtool eval` of the result against its source. Tiny random
checkpoints of tests/_architectures.py with SmolLM2's tokenizer; calibration on groups_merged.txt."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli import app

from tests._architectures import MODEL_TYPES


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    # A slice of WikiText-2's test text: evaluation, never calibration.
    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:20000]
    path = tmp_path_factory.mktemp("eval") / "wiki.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("variant", MODEL_TYPES)
def test_calibrate_methods_and_eval(arch_checkpoint, shared_data, eval_text, variant, tmp_path):
    source = arch_checkpoint(variant, 49152)
    stats = tmp_path / "stats.safetensors"
    result = run_cli("calibrate", source, "-o", stats, "--calib", shared_data / "calibration" / "groups_merged.txt",
                     "--calib-samples", "2", "--calib-seqlen", "32", "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr

    outputs = {}
    for method in ("gptq", "awq", "imatrix"):
        out = tmp_path / method
        result = run_cli("quantize", source, "--scheme", "int4-sym", "--group-size", "32", "--method", method,
                         "--stats", stats, "-o", out, "--json", "--quiet")
        assert result.exit_code == 0, (method, result.stderr)
        report = json.loads(result.stdout)
        assert report["calibration"]["method"] == method
        quantized = {row["scheme"]: row["tensors"] for row in report["per_scheme"]}["int4-sym"]
        assert quantized == report["calibration"]["tensors"] > 0, (method, report["calibration"])
        outputs[method] = out

    result = run_cli("eval", outputs["gptq"], "--baseline", source, "--text", eval_text, "--ctx", "64",
                     "--chunks", "2", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    models = json.loads(result.stdout)["models"]
    assert all(math.isfinite(model["ppl"]) and model["ppl"] > 1 for model in models)
