"""Hostile config.json and tokenizer files (issue 16): each is refused before any model is built, with
its documented exit code (5 corrupt, 4 unsupported, 3 not found) and one ``error:`` line naming the
file and the field; `qtool eval`, `qtool calibrate` and `qtool quantize --method gptq` alike."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from qtool.cli import app
from qtool.errors import CorruptFile, NotFound, Unsupported

CORRUPT, NOT_FOUND, UNSUPPORTED = CorruptFile.exit_code, NotFound.exit_code, Unsupported.exit_code
_DROP = object()   # a config change that removes the key


@pytest.fixture(scope="module")
def small_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    return path


def _model_copy(tiny_llama_dir: Path, destination: Path) -> Path:
    """The tiny Llama folder, weights hard-linked (never changed), text files copied (the tests edit them)."""
    destination.mkdir()
    for item in tiny_llama_dir.iterdir():
        if item.suffix == ".safetensors":
            try:
                os.link(item, destination / item.name)
                continue
            except OSError:
                pass
        shutil.copyfile(item, destination / item.name)
    return destination


def _edit_json(path: Path, changes: dict[str, Any]) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is _DROP:
            document.pop(key, None)
        else:
            document[key] = value
    path.write_text(json.dumps(document), encoding="utf-8")


def _command(kind: str, model: Path, text: Path, tmp_path: Path) -> list[str]:
    if kind == "eval":
        return ["eval", str(model), "--text", str(text), "--ctx", "32", "--chunks", "2", "--device", "cpu"]
    calib = ["--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "16", "--device", "cpu"]
    if kind == "calibrate":
        return ["calibrate", str(model), "-o", str(tmp_path / "stats.safetensors"), *calib]
    return ["quantize", str(model), "-o", str(tmp_path / "out"), "--scheme", "int4-sym", "--method", "gptq", *calib]


def _assert_refused(result, code: int, *mentions: str) -> None:
    stderr = result.stderr
    assert result.exit_code == code, (result.exit_code, stderr, result.stdout)
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    for mention in mentions:
        assert mention in lines[0], lines[0]


# (config changes, exit code, words the error line must hold besides "config.json")
CONFIG_CASES: dict[str, tuple[dict[str, Any], int, str]] = {
    "layers-1e9": ({"num_hidden_layers": 1_000_000_000}, CORRUPT, "num_hidden_layers"),
    "layers-more-than-present": ({"num_hidden_layers": 3}, CORRUPT, "num_hidden_layers"),
    "layers-fewer-than-present": ({"num_hidden_layers": 1}, CORRUPT, "num_hidden_layers"),
    "layers-zero": ({"num_hidden_layers": 0}, CORRUPT, "num_hidden_layers"),
    "layers-negative": ({"num_hidden_layers": -2}, CORRUPT, "num_hidden_layers"),
    "layers-string": ({"num_hidden_layers": "2"}, CORRUPT, "num_hidden_layers"),
    "layers-bool": ({"num_hidden_layers": True}, CORRUPT, "num_hidden_layers"),
    "layers-float": ({"num_hidden_layers": 2.0}, CORRUPT, "num_hidden_layers"),
    "layers-list": ({"num_hidden_layers": [2]}, CORRUPT, "num_hidden_layers"),
    "hidden-1e12": ({"hidden_size": 10**12}, CORRUPT, "hidden_size"),
    "hidden-off-by-one": ({"hidden_size": 65, "head_dim": _DROP, "num_attention_heads": 5,
                           "num_key_value_heads": 5}, CORRUPT, "hidden_size"),
    "vocab-1e12": ({"vocab_size": 10**12}, CORRUPT, "vocab_size"),
    "vocab-off-by-one": ({"vocab_size": 49153}, CORRUPT, "vocab_size"),
    "intermediate-1e12": ({"intermediate_size": 10**12}, CORRUPT, "intermediate_size"),
    "intermediate-wrong": ({"intermediate_size": 256}, CORRUPT, "intermediate_size"),
    "heads-zero": ({"num_attention_heads": 0}, CORRUPT, "num_attention_heads"),
    "heads-not-dividing-hidden": ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": _DROP},
                                  CORRUPT, "num_attention_heads"),
    "heads-wrong": ({"num_attention_heads": 8, "num_key_value_heads": 2}, CORRUPT, "num_attention_heads"),
    "kv-heads-not-dividing": ({"num_key_value_heads": 3}, CORRUPT, "num_key_value_heads"),
    "kv-heads-wrong": ({"num_key_value_heads": 4}, CORRUPT, "num_key_value_heads"),
    "head-dim-1e9": ({"head_dim": 10**9}, CORRUPT, "head_dim"),
    "eps-negative": ({"rms_norm_eps": -1}, CORRUPT, "rms_norm_eps"),
    "eps-string": ({"rms_norm_eps": "1e-5"}, CORRUPT, "rms_norm_eps"),
    "rope-theta-zero": ({"rope_theta": 0}, CORRUPT, "rope_theta"),
    "rope-factor-zero": ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, CORRUPT, "factor"),
    "dtype-float128": ({"torch_dtype": "float128"}, UNSUPPORTED, "torch_dtype"),
    "dtype-int8": ({"torch_dtype": "int8"}, UNSUPPORTED, "torch_dtype"),
    "model-type-unknown": ({"model_type": "evil"}, UNSUPPORTED, "evil"),
    "model-type-list": ({"model_type": ["llama"]}, CORRUPT, "model_type"),
    "act-unknown": ({"hidden_act": "bogus"}, CORRUPT, "bogus"),
    "tie-embeddings-string": ({"tie_word_embeddings": "yes"}, CORRUPT, "tie_word_embeddings"),
    "rope-scaling-string": ({"rope_scaling": "linear"}, CORRUPT, "rope_parameters"),
    "quantization-config-string": ({"quantization_config": "x"}, CORRUPT, "quantization_config"),
}


@pytest.mark.parametrize("command", ["eval", "calibrate"])
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_hostile_config_refused(case: str, command: str, tiny_llama_dir: Path, small_text: Path,
                                tmp_path: Path) -> None:
    changes, code, field = CONFIG_CASES[case]
    model = _model_copy(tiny_llama_dir, tmp_path / "model")
    _edit_json(model / "config.json", changes)
    started = time.process_time()   # CPU time: wall time on a shared machine says little
    result = CliRunner().invoke(app, _command(command, model, small_text, tmp_path))
    _assert_refused(result, code, "config.json", field)
    assert time.process_time() - started < 5
    assert not (tmp_path / "stats.safetensors").exists()


@pytest.mark.parametrize("case", ["layers-1e9", "layers-string", "heads-zero", "vocab-1e12", "dtype-float128"])
def test_hostile_config_refused_by_gptq(case: str, tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    changes, code, field = CONFIG_CASES[case]
    model = _model_copy(tiny_llama_dir, tmp_path / "model")
    _edit_json(model / "config.json", changes)
    result = CliRunner().invoke(app, _command("quantize", model, small_text, tmp_path))
    _assert_refused(result, code, "config.json", field)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e400"])
def test_non_finite_float_in_config_refused(literal: str, tiny_llama_dir: Path, small_text: Path,
                                           tmp_path: Path) -> None:
    """Python's json reads NaN/Infinity (not strict JSON): a NaN rms_norm_eps must not reach a forward pass."""
    model = _model_copy(tiny_llama_dir, tmp_path / "model")
    path = model / "config.json"
    path.write_text(path.read_text().replace('"rms_norm_eps": 1e-05', f'"rms_norm_eps": {literal}'))
    assert literal in path.read_text()
    result = CliRunner().invoke(app, _command("eval", model, small_text, tmp_path))
    _assert_refused(result, CORRUPT, "config.json")


def test_unchanged_copy_still_works(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    """The copies the cases start from are good models: eval scores one, calibrate writes statistics."""
    model = _model_copy(tiny_llama_dir, tmp_path / "model")
    evaluated = CliRunner().invoke(app, _command("eval", model, small_text, tmp_path) + ["--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["models"][0]["ppl"] > 1
    calibrated = CliRunner().invoke(app, _command("calibrate", model, small_text, tmp_path))
    assert calibrated.exit_code == 0, calibrated.stderr
    assert (tmp_path / "stats.safetensors").is_file()


# ------------------------------------------------------------------------------------------ tokenizers
def _break_tokenizer_json_text(model: Path) -> None:
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"', encoding="utf-8")


def _tokenizer_json_list(model: Path) -> None:
    (model / "tokenizer.json").write_text("[1, 2, 3]", encoding="utf-8")


def _tokenizer_json_no_model(model: Path) -> None:
    _edit_json(model / "tokenizer.json", {"model": _DROP})


def _tokenizer_json_wrong_model(model: Path) -> None:
    _edit_json(model / "tokenizer.json", {"model": {"type": "BPE", "vocab": 5, "merges": "x"}})


def _tokenizer_json_deep(model: Path) -> None:
    (model / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")


def _no_tokenizer_files(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)


def _only_tokenizer_config(model: Path) -> None:
    (model / "tokenizer.json").unlink()


def _auto_map(model: Path) -> None:
    _edit_json(model / "tokenizer_config.json",
               {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})


def _auto_map_in_config(model: Path) -> None:
    _edit_json(model / "tokenizer_config.json", {"tokenizer_class": _DROP})
    _edit_json(model / "config.json", {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})


def _tokenizer_config_bad_json(model: Path) -> None:
    (model / "tokenizer_config.json").write_bytes(b"{\"tokenizer_class\": \xff}")


TOKENIZER_CASES = {
    "tokenizer.json-not-json": (_break_tokenizer_json_text, CORRUPT, "tokenizer.json"),
    "tokenizer.json-a-list": (_tokenizer_json_list, CORRUPT, "tokenizer.json"),
    "tokenizer.json-no-model": (_tokenizer_json_no_model, CORRUPT, "tokenizer.json"),
    "tokenizer.json-wrong-model": (_tokenizer_json_wrong_model, CORRUPT, "tokenizer.json"),
    "tokenizer.json-nested-100000": (_tokenizer_json_deep, CORRUPT, "tokenizer.json"),
    "no-tokenizer": (_no_tokenizer_files, NOT_FOUND, "tokenizer"),
    "only-tokenizer-config": (_only_tokenizer_config, NOT_FOUND, "tokenizer.json"),
    "auto-map": (_auto_map, UNSUPPORTED, "tokenizer_config.json"),
    "auto-map-in-config": (_auto_map_in_config, UNSUPPORTED, "config.json"),
    "tokenizer-config-not-utf8": (_tokenizer_config_bad_json, CORRUPT, "tokenizer_config.json"),
}


@pytest.mark.parametrize("command", ["eval", "calibrate"])
@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_hostile_tokenizer_refused(case: str, command: str, tiny_llama_dir: Path, small_text: Path,
                                   tmp_path: Path) -> None:
    mutate, code, mention = TOKENIZER_CASES[case]
    model = _model_copy(tiny_llama_dir, tmp_path / "model")
    mutate(model)
    result = CliRunner().invoke(app, _command(command, model, small_text, tmp_path))
    _assert_refused(result, code, mention)
    assert not (tmp_path / "stats.safetensors").exists()


# ------------------------------------------------------------------------------------ bounded work
_MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run([sys.executable, "-m", "qtool", *sys.argv[1:]], capture_output=True, text=True)
wall = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(done.returncode, usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss)
sys.stderr.write(done.stderr)
"""


def test_billion_layers_bounded_in_a_fresh_process(tiny_llama_dir: Path, small_text: Path, tmp_path: Path) -> None:
    """The issue's case in a process of its own: exit 5 within 5 s of CPU and 500 MB (peak RSS, the
    imports included). A wrapper process runs it, so RUSAGE_CHILDREN sees this one child alone. CPU
    time, not wall time, is bounded: on a shared 2-core machine importing torch alone can take 10 s
    of wall time; the wall-time bound only catches a hang."""
    model = _model_copy(tiny_llama_dir, tmp_path / "model")
    _edit_json(model / "config.json", {"num_hidden_layers": 1_000_000_000})
    done = subprocess.run([sys.executable, "-c", _MEASURE, *_command("eval", model, small_text, tmp_path)],
                          capture_output=True, text=True, timeout=120)
    code, cpu_seconds, wall_seconds, peak_kib = done.stdout.split()
    assert int(code) == CORRUPT, done.stderr
    assert "num_hidden_layers" in done.stderr and "Traceback" not in done.stderr
    assert float(cpu_seconds) < 5, f"{cpu_seconds} s of CPU"
    assert float(wall_seconds) < 60, f"{wall_seconds} s"
    assert int(peak_kib) * 1024 < 500 * 1024 * 1024, f"peak RSS {int(peak_kib) // 1024} MiB"


# ------------------------------------------------------------------------------------ other entry points
def test_config_checked_under_the_architectures_own_keys() -> None:
    """GPT-2 names its layer count n_layer (transformers' attribute_map): a billion there is refused too."""
    from qtool.sources.base import TensorInfo
    from qtool.sources.config_check import check_config

    tensors = [TensorInfo("transformer.wte.weight", (100, 8), "F32", 3200)] + [
        TensorInfo(f"transformer.h.{layer}.attn.c_attn.weight", (8, 24), "F32", 768) for layer in range(2)]
    good = {"model_type": "gpt2", "n_layer": 2, "n_embd": 8, "n_head": 2, "vocab_size": 100}
    check_config(good, tensors, "gpt2/config.json")
    with pytest.raises(CorruptFile, match=r"gpt2/config\.json: n_layer is 1000000000"):
        check_config(dict(good, n_layer=1_000_000_000), tensors, "gpt2/config.json")
    with pytest.raises(CorruptFile, match=r"n_embd is an integer of about 1001 digits"):
        check_config(dict(good, n_embd=10**1000), tensors, "gpt2/config.json")


def test_plain_quantize_checks_the_config_but_not_the_architecture(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Quantizing builds no model: a model_type transformers does not know is fine there, a layer count
    the tensors do not have is not (the plan's layer ranges would be wrong)."""
    model = _model_copy(tiny_llama_dir, tmp_path / "model")
    _edit_json(model / "config.json", {"num_hidden_layers": [2]})
    args = ["quantize", str(model), "--scheme", "int8-sym", "--device", "cpu"]
    refused = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "refused")])
    _assert_refused(refused, CORRUPT, "config.json", "num_hidden_layers")
    assert not (tmp_path / "refused").exists()
    _edit_json(model / "config.json", {"num_hidden_layers": 2, "model_type": "brand-new-architecture"})
    written = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "written")])
    assert written.exit_code == 0, written.stderr
    assert (tmp_path / "written" / "config.json").is_file()
