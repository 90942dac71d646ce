"""CLI wiring: JSON on stdout, one-line errors with the documented exit codes, dry runs write nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def qtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "qtool", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_version():
    result = qtool("--version")
    assert result.returncode == 0 and result.stdout.startswith("qtool ")


def test_dry_run_json_plans_and_writes_nothing(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    result = qtool("quantize", str(tiny_llama_dir), "--bits", "4", "-o", str(out), "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)   # exactly one JSON document
    assert report["dry_run"] is True and report["output"] is None
    schemes = {row["name"]: row["scheme"] for row in report["tensors"]}
    assert schemes["model.layers.0.mlp.down_proj.weight"] == "nf4"
    assert schemes["model.embed_tokens.weight"] == "keep"
    assert schemes["model.norm.weight"] == "keep"
    # NF4 with double quantization: 4 bits + one 8-bit absmax per 64 weights, plus per-tensor state
    # (quant maps, nested absmax) that is large next to the tiny model's 64x64 weights.
    assert 4.125 < report["bits_per_weight_quantized"] < 8
    assert not out.exists()


def test_quantize_json_then_existing_output_needs_force(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    first = qtool("quantize", str(tiny_llama_dir), "--scheme", "int8-sym", "-o", str(out), "--json", "--quiet")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    report = json.loads(first.stdout)
    assert report["output"] == str(out) and (out / "config.json").is_file()
    assert report["bytes_after"] < report["bytes_before"]
    again = qtool("quantize", str(tiny_llama_dir), "--scheme", "int8-sym", "-o", str(out))
    assert_one_line_error(again, 7, str(out), "--force")
    forced = qtool("quantize", str(tiny_llama_dir), "--scheme", "int8-sym", "-o", str(out), "--force", "-q")
    assert forced.returncode == 0, forced.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]   # no temporary leftovers


@pytest.mark.parametrize("args, code, needle", [
    (["quantize", "{model}", "--bits", "3", "-o", "{tmp}/o"], 2, "--bits 3"),
    (["quantize", "{model}", "--scheme", "nf5", "-o", "{tmp}/o"], 2, "nf5"),
    (["quantize", "{model}", "--bits", "4"], 2, "-o/--output"),
    (["quantize", "{model}", "--type", "Q4_0", "--format", "safetensors", "-o", "{tmp}/o"], 2, "--format gguf"),
    (["quantize", "{model}", "--bits", "4", "--max-shard-size", "lots", "-o", "{tmp}/o"], 2, "--max-shard-size"),
    (["quantize", "{model}", "--bits", "4", "--config", "{tmp}/none.yaml", "-o", "{tmp}/o"], 3, "none.yaml"),
    (["quantize", "{tmp}/missing-model", "--bits", "4", "-o", "{tmp}/o"], 3, "missing-model"),
    (["inspect", "{tmp}/missing.gguf"], 3, "missing.gguf"),
    (["quantize", "{model}", "--bits", "4", "--device", "tpu", "-o", "{tmp}/o"], 2, "--device tpu"),
])
def test_bad_arguments_exit_codes(tiny_llama_dir, tmp_path, args, code, needle):
    filled = [a.format(model=tiny_llama_dir, tmp=tmp_path) for a in args]
    result = qtool(*filled)
    assert_one_line_error(result, code, needle.format(tmp=tmp_path))
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(tmp_path):
    result = qtool("inspect", str(tmp_path / "missing.gguf"), "--debug")
    assert result.returncode == 3
    assert "Traceback" in result.stderr


def test_calibrate_then_gptq_gguf(tiny_llama_dir, shared_data, tmp_path):
    """`qtool calibrate` saves statistics; `quantize --method gptq --stats` writes GGUF blocks that differ
    from round-to-nearest's and that gguf-py reads back with the right types."""
    from gguf import GGUFReader

    calib = str(shared_data / "calibration" / "groups_merged.txt")
    stats = tmp_path / "stats.safetensors"
    result = qtool("calibrate", str(tiny_llama_dir), "-o", str(stats), "--calib", calib, "--calib-samples", "4",
                   "--calib-seqlen", "64", "--json", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["has_hessian"] is True
    again = qtool("calibrate", str(tiny_llama_dir), "-o", str(stats), "--calib", calib)
    assert_one_line_error(again, 7, str(stats))

    outputs = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.gguf"
        extra = ["--stats", str(stats)] if method == "gptq" else []
        result = qtool("quantize", str(tiny_llama_dir), "--type", "Q4_0", "--method", method, *extra,
                       "-o", str(out), "-q", "--json")
        assert result.returncode == 0, result.stderr
        outputs[method] = {t.name: (t.tensor_type.name, bytes(t.data)) for t in GGUFReader(out).tensors}
    assert outputs["rtn"].keys() == outputs["gptq"].keys()
    name = "blk.0.ffn_down.weight"
    assert outputs["gptq"][name][0] == outputs["rtn"][name][0] == "Q4_0"
    assert outputs["gptq"][name][1] != outputs["rtn"][name][1]
    assert outputs["gptq"]["token_embd.weight"] == outputs["rtn"]["token_embd.weight"]


def test_quantize_eval_reports_size_and_quality(tiny_llama_dir, shared_data, tmp_path):
    out = tmp_path / "out"
    text = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    result = qtool("quantize", str(tiny_llama_dir), "--bits", "8", "-o", str(out), "--eval", "--text", str(text),
                   "--ctx", "128", "--chunks", "2", "--json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bytes_after"] < report["bytes_before"]
    rows = report["evaluation"]["models"]
    assert len(rows) == 2 and all(row["ppl"] > 1 for row in rows)
    assert rows[1]["delta_pct"] is not None and abs(rows[1]["delta_pct"]) < 5
