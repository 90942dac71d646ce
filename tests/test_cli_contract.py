"""The CLI's contract with people and CI scripts: one strict JSON document on stdout with --json in every
case (errors included), control characters from files never reach the terminal, and Ctrl-C / SIGTERM
end with their documented codes and one line, at any moment of a run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from qtool.cli import run
from qtool.errors import (EXIT_INTERRUPTED, EXIT_INTERRUPTED_COMPLETE, EXIT_TERMINATED, BadArgument, NotFound,
                          QualityGateFailed)

QTOOL = [sys.executable, "-m", "qtool"]


def strict_json(text: str) -> dict:
    """Python's parser with NaN/Infinity refused, as strict parsers (jq, JSON.parse) do."""
    def refuse(literal: str) -> None:
        raise ValueError(f"non-standard JSON literal {literal}")
    return json.loads(text, parse_constant=refuse)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`qtool ARGV` in this process, through the console script's own entry (run), not CliRunner."""
    with pytest.raises(SystemExit) as stop:
        run(argv)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def write_gguf(path: Path, *, name: str, tensor: str = "w", rope_base: float | None = None) -> Path:
    """A valid llama GGUF with one small tensor and the given (possibly hostile) name and values."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if rope_base is not None:
        writer.add_float32("llama.rope.freq_base", rope_base)
    writer.add_string("general.name", name)
    writer.add_tensor(tensor, np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def hostile_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Names and values carrying terminal escapes, NUL bytes and a NaN float."""
    return write_gguf(tmp_path_factory.mktemp("hostile") / "evil.gguf", rope_base=float("nan"),
                      name="evil\x1b[2J\x1b]0;pwned\x07name\x00end", tensor="blk.0.\x1b[2Jattn_q.weight")


# ---------------------------------------------------------------- --json in every case
@pytest.mark.parametrize("argv, code, kind", [
    (["inspect", "/no/such/model.gguf", "--json"], NotFound.exit_code, "NotFound"),
    (["inspect", "--json", "--no-such-option", "x"], BadArgument.exit_code, "BadArgument"),
    (["quantize", "--json"], BadArgument.exit_code, "BadArgument"),                       # missing MODEL
    (["quantize", "x.gguf", "--bits", "3", "-o", "out", "--json"], BadArgument.exit_code, "BadArgument"),
])
def test_json_failure_is_one_error_document(argv, code, kind, capsys):
    rc, out, err = run_cli(argv, capsys)
    assert rc == code
    document = strict_json(out)
    assert set(document) == {"error"}
    assert document["error"]["exit_code"] == code
    assert document["error"]["type"] == kind
    assert document["error"]["message"] and "\n" not in document["error"]["message"]
    assert err.count("error: ") == 1 and "Traceback" not in err


def test_json_is_strict_for_non_finite_metadata(hostile_gguf, capsys):
    rc, out, _ = run_cli(["inspect", str(hostile_gguf), "--json"], capsys)
    assert rc == 0
    document = strict_json(out)
    assert document["metadata"]["llama.rope.freq_base"] is None
    assert "NaN" not in out


def test_gate_failure_is_one_document_with_report_and_error(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    quantized = tmp_path / "q.gguf"
    rc, _, _ = run_cli(["quantize", str(tiny_llama_dir), "--type", "Q4_0", "-o", str(quantized), "--quiet"],
                       capsys)
    assert rc == 0
    rc, out, err = run_cli(["eval", str(quantized), "--baseline", str(tiny_llama_dir), "--text", str(text),
                            "--ctx", "32", "--chunks", "2", "--max-kld", "0.0", "--json", "--quiet"], capsys)
    assert rc == QualityGateFailed.exit_code
    document = strict_json(out)
    assert document["error"]["type"] == "QualityGateFailed"
    assert document["models"], "the numbers are in the same document as the error"
    assert "kl" in document["error"]["message"].lower()


# ---------------------------------------------------------------- the terminal
def test_control_characters_from_files_are_escaped(hostile_gguf, capsys):
    rc, out, err = run_cli(["inspect", str(hostile_gguf)], capsys)
    assert rc == 0
    assert "\x1b" not in out and "\x00" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "\\x00" in out


def test_markup_in_names_is_printed_as_written(tmp_path, capsys):
    path = write_gguf(tmp_path / "markup.gguf", name="[red]not red[/red] :smile:")
    rc, out, _ = run_cli(["inspect", str(path)], capsys)
    assert rc == 0 and "[red]not red[/red] :smile:" in out


def test_error_messages_are_one_escaped_line(tmp_path, capsys):
    rc, out, err = run_cli(["inspect", str(tmp_path / "a\x1b[2Jb\nc.gguf"), "--json"], capsys)
    assert rc == NotFound.exit_code
    assert "\x1b" not in err and "\x1b" not in out
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert "\\x1b[2J" in strict_json(out)["error"]["message"]


# ---------------------------------------------------------------- signals
def _handlers_installed(pid: int) -> bool:
    """qtool's handlers are in: SIGTERM is caught (Python itself catches only SIGINT at start-up)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(QTOOL + argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, EXIT_INTERRUPTED, "interrupted"),
                                                (signal.SIGTERM, EXIT_TERMINATED, "terminated")])
def test_signal_during_start_up(signum, code, word, tiny_llama_dir, tmp_path):
    """The signal lands while typer, rich and torch are still being imported."""
    out = tmp_path / "out.gguf"
    process = _start(["quantize", str(tiny_llama_dir), "--type", "Q8_0", "-o", str(out)], tmp_path)
    _wait_for(lambda: _handlers_installed(process.pid))
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert f"error: {word}" in err and "nothing was written" in err
    assert "Traceback" not in err and "terminate called" not in err
    assert list(tmp_path.iterdir()) == [], "no output and no staged leftovers"


def test_sigterm_mid_run_removes_the_staged_output(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    text = tmp_path / "text.txt"
    text.write_text("Some calibration text for the test. " * 400)
    process = _start(["quantize", str(tiny_llama_dir), "--scheme", "int4-asym", "--group-size", "64", "--method",
                      "gptq", "--calib", str(text), "--calib-samples", "64", "--calib-seqlen", "256", "-o", str(out)],
                     tmp_path)
    lines: list[str] = []
    # The first progress line of the GPTQ pass: the run is past start-up and into the work.
    _wait_for(lambda: lines.append(process.stderr.readline()) or lines[-1].startswith("gptq"), timeout=300)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    err = "".join(lines) + err
    assert process.returncode == EXIT_TERMINATED, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


def test_signal_after_the_rename_says_the_output_is_complete(tiny_llama_dir, tmp_path):
    """`--eval` runs after the output is in place: a Ctrl-C then leaves a whole output and says so."""
    out = tmp_path / "out.gguf"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 2000)
    process = _start(["quantize", str(tiny_llama_dir), "--type", "Q8_0", "-o", str(out), "--eval",
                      "--text", str(text), "--ctx", "64"], tmp_path)
    _wait_for(lambda: out.exists(), timeout=120)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED_COMPLETE, err
    assert "is whole" in err and "Traceback" not in err
    assert out.read_bytes()[:4] == b"GGUF"
