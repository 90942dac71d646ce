"""Options and presets are checked before any work: every bad value is a one-line exit 2 that names
the option (or the preset file and key), and nothing is downloaded, read or written first.

The "no work first" part is real: the model is a Hub id served by tests/_hub_server.py, and the
server's request log must stay empty."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli import app
from qtool.errors import BadArgument, NotFound
from qtool.plan import PARAM_CHECKS, Recipe
from qtool.schemes.base import all_schemes
from tests._hub_server import FakeHub

BAD = BadArgument.exit_code


def assert_one_line_error(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def hub_server():
    with FakeHub() as server:
        yield server


@pytest.fixture()
def hub(hub_server: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """huggingface_hub pointed at a local Hub look-alike (in this process) with an empty cache."""
    from huggingface_hub import constants

    hub_server.requests.clear()
    hub_server.repos.clear()
    hub_server.fail_with = None
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub_server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return hub_server


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("content, key", [
    (b"scheme: nf4\ndescription: caf\xe9\n", "not UTF-8"),
    (b"scheme: nf4\nparams: [1, 2]\n", "params"),
    (b"scheme: int4-sym\nparams: {group_size: abc}\n", "params.group_size"),
    (b"scheme: int4-sym\nparams: {group_size: 1.0e400}\n", "params.group_size"),
    (b"scheme: int4-sym\nparams: {group_size: 1e400}\n", "params.group_size"),     # YAML 1.1: a string
    (b"scheme: int4-sym\nparams: {group_size: true}\n", "params.group_size"),
    (b"scheme: nf4\nparams: {block_size: 100}\n", "params.block_size"),
    (b"scheme: nf4\nparams: {double_quant: 'yes'}\n", "params.double_quant"),
    (b"scheme: nf4\nparams: {bogus: 1}\n", "params.bogus"),
    (b"scheme: w8a8\nparams: {smooth: .nan}\n", "params.smooth"),
    (b"scheme: w8a8\nparams: {act_range: widest}\n", "params.act_range"),
    (b"scheme: nf4\ninclude: [[model.*]]\n", "include"),
    (b"scheme: nf4\ninclude: 'model.*'\n", "include"),
    (b"scheme: nf4\nskip: {a: 1}\n", "skip"),
    (b"scheme: nf4\nbogus: 1\n", "bogus"),
    (b"scheme: [nf4]\n", "scheme"),
    (b"scheme: nf5\n", "scheme"),
    (b"scheme: nf4\nformat: onnx\n", "format"),
    (b"scheme: nf4\ndescription: [a]\n", "description"),
    (b"scheme: nf4\nrules: {match: x}\n", "rules"),
    (b"scheme: nf4\nrules: [lm_head.weight]\n", "rules[0]"),
    (b"scheme: nf4\nrules: [{match: '*', scheme: nf4, layers: everywhere}]\n", "rules[0].layers"),
    (b"scheme: nf4\nrules: [{match: '*', scheme: nf4, layers: [1, -2]}]\n", "rules[0].layers"),
    (b"scheme: nf4\nrules: [{match: '*', scheme: nf4, layers: [true]}]\n", "rules[0].layers"),
    (b"scheme: nf4\nrules: [{match: 3, scheme: nf4}]\n", "rules[0].match"),
    (b"scheme: nf4\nrules: [{match: '*'}]\n", "rules[0].scheme"),
    (b"scheme: nf4\nrules: [{match: '*', scheme: Q9_K}]\n", "rules[0].scheme"),
    (b"scheme: nf4\nrules: [{match: '*', scheme: nf4, params: {group_size: 64}}]\n", "rules[0].params.group_size"),
    (b"scheme: nf4\nrules: [{match: '*', scheme: keep, params: {block_size: 64}}]\n", "rules[0].params.block_size"),
    (b"scheme: nf4\nparams: {block_size: " + b"9" * 5000 + b"}\n", "not a usable YAML"),
    (b"scheme: nf4\nparams: " + b"[" * 5_000 + b"]" * 5_000 + b"\n", "preset"),
    (b"!!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_bad_preset_names_file_and_key(tmp_path: Path, content: bytes, key: str) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_bytes(content)
    with pytest.raises(BadArgument) as err:
        Recipe.from_yaml(preset)
    assert str(preset) in err.value.message and key in err.value.message, err.value.message
    # Short besides the file's path (pytest's temporary paths grow with its run counter).
    assert len(err.value.message.replace(str(preset), "")) < 350


def test_bad_preset_on_the_command_line_is_exit_2(tmp_path: Path, hub: FakeHub) -> None:
    preset = tmp_path / "p.yaml"
    preset.write_text("scheme: int4-sym\ninclude: 'model.*'\n")
    result = CliRunner().invoke(app, ["quantize", "org/name", "--config", str(preset), "-o", str(tmp_path / "o")])
    assert_one_line_error(result, BAD, str(preset), "include", "[")
    assert hub.requests == [] and not (tmp_path / "o").exists()


def test_preset_that_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)      # reading it would block forever
    with pytest.raises(BadArgument, match="not a regular file"):
        Recipe.from_yaml(fifo)
    with pytest.raises(NotFound):
        Recipe.from_yaml(tmp_path / "absent.yaml")


def test_shipped_presets_load_and_every_scheme_param_has_a_check(repo_root: Path) -> None:
    for preset in sorted((repo_root / "configs").glob("*.yaml")):
        assert Recipe.from_yaml(preset).scheme is not None, preset
    declared = {name for scheme in all_schemes().values() for name in scheme.params}
    assert declared == set(PARAM_CHECKS)


def test_preset_params_are_kept_and_typed(tmp_path: Path) -> None:
    preset = tmp_path / "ok.yaml"
    preset.write_text("scheme: int4-asym\nparams: {group_size: 64}\ninclude: ['lm_head.weight']\n"
                      "rules: [{match: 'model.layers.*.mlp.down_proj.weight', scheme: keep, layers: [0, 1]}]\n")
    recipe = Recipe.from_yaml(preset)
    assert recipe.params == {"group_size": 64} and recipe.include == ["lm_head.weight"]
    assert recipe.rules[0].scheme == "keep" and recipe.rules[0].layers == [0, 1]


# ---------------------------------------------------------------- command-line options
@pytest.mark.parametrize("args, needle", [
    (["quantize", "org/name", "--bits", "4", "--method", "evil", "-o", "{tmp}/o"], "--method evil"),
    (["quantize", "org/name", "--bits", "4", "-o", ""], "-o/--output"),
    (["quantize", "org/name", "--bits", "4", "-o", "{tmp}/o", "--eval", "--text", "/dev/null"], "--text /dev/null"),
    (["quantize", "org/name", "--bits", "4", "-o", "{tmp}/o", "--eval", "--text", "{tmp}/empty.txt"], "empty"),
    (["quantize", "org/name", "--bits", "4", "-o", "{tmp}/o", "--eval", "--text", "{tmp}/t.txt", "--ctx", "0"],
     "--ctx 0"),
    (["quantize", "org/name", "--bits", "4", "-o", "{tmp}/o", "--eval", "--text", "{tmp}/t.txt", "--chunks", "0"],
     "--chunks 0"),
    (["quantize", "org/name", "--bits", "4", "-o", "{tmp}/o", "--text", "{tmp}/t.txt"], "--eval"),
    (["quantize", "org/name", "--bits", "4", "--type", "Q8_0", "-o", "{tmp}/o.gguf"], "--bits 4"),
    (["quantize", "org/name", "--bits", "8", "--scheme", "nf4", "-o", "{tmp}/o"], "--bits 8"),
    (["quantize", "org/name", "--bits", "8", "--type", "F16", "-o", "{tmp}/o.gguf"], "--bits 8"),
    (["quantize", "org/name", "--bits", "4", "--max-shard-size", "infGB", "-o", "{tmp}/o"], "--max-shard-size"),
    (["quantize", "org/name", "--bits", "4", "--max-shard-size", "nanGB", "-o", "{tmp}/o"], "--max-shard-size"),
    (["quantize", "org/name", "--bits", "4", "--max-shard-size", "1e400GB", "-o", "{tmp}/o"], "--max-shard-size"),
    (["quantize", "org/name", "--bits", "4", "--max-shard-size", "-5GB", "-o", "{tmp}/o"], "--max-shard-size"),
    (["quantize", "org/name", "--bits", "4", "--calib-samples", "0", "-o", "{tmp}/o"], "--calib-samples 0"),
    (["quantize", "org/name", "--bits", "4", "--calib-seqlen", "1", "-o", "{tmp}/o"], "--calib-seqlen 1"),
    (["quantize", "org/name", "--scheme", "int4-sym", "--group-size", "0", "-o", "{tmp}/o"], "--group-size 0"),
    (["quantize", "org/name", "--scheme", "int4-sym", "--group-size", "-64", "-o", "{tmp}/o"], "--group-size -64"),
    (["quantize", "org/name", "--scheme", "int4-sym", "--group-size", "7", "-o", "{tmp}/o"], "--group-size 7"),
    (["quantize", "org/name", "--scheme", "nf4", "--block-size", "63", "-o", "{tmp}/o"], "--block-size 63"),
    (["quantize", "org/name", "--scheme", "nf4", "--block-size", "8192", "-o", "{tmp}/o"], "--block-size 8192"),
    (["quantize", "org/name", "--scheme", "nf4", "--group-size", "64", "-o", "{tmp}/o"], "--group-size"),
    (["quantize", "org/name", "--type", "Q4_0", "--block-size", "64", "-o", "{tmp}/o.gguf"], "--block-size"),
    (["quantize", "org/name", "--scheme", "int4-sym", "--no-double-quant", "-o", "{tmp}/o"], "--no-double-quant"),
    (["quantize", "org/name", "--scheme", "nf5", "-o", "{tmp}/o"], "nf5"),
    (["quantize", "org/name", "--type", "Q9_K", "-o", "{tmp}/o.gguf"], "Q9_K"),
    (["quantize", "org/name", "--scheme", "w8a8", "--smooth", "2", "-o", "{tmp}/o"], "--smooth"),
    (["quantize", "org/name", "--scheme", "w8a8", "--smooth", "nan", "-o", "{tmp}/o"], "--smooth"),
    (["quantize", "org/name", "--config", "configs/gguf-q4_k_m.yaml", "--format", "safetensors", "-o", "{tmp}/o"],
     "gguf"),
    (["eval", "org/name", "--baseline", "org/base", "--max-ppl-increase", "-50", "--text", "{tmp}/t.txt"],
     "--max-ppl-increase"),
    (["eval", "org/name", "--baseline", "org/base", "--max-ppl-increase", "nan", "--text", "{tmp}/t.txt"],
     "--max-ppl-increase"),
    (["eval", "org/name", "--baseline", "org/base", "--max-kld", "-1", "--text", "{tmp}/t.txt"], "--max-kld"),
    (["eval", "org/name", "--baseline", "org/base", "--max-kld", "nan", "--text", "{tmp}/t.txt"], "--max-kld"),
    (["eval", "org/name", "--text", "/dev/null"], "--text /dev/null"),
    (["eval", "org/name", "--text", "{tmp}/empty.txt"], "empty"),
    (["eval", "org/name", "--ctx", "0"], "--ctx 0"),
    (["eval", "org/name", "--chunks", "0"], "--chunks 0"),
    (["eval", "org/name", "--stride", "0"], "--stride 0"),
    (["eval", "org/name", "--batch-size", "0"], "--batch-size 0"),
    (["eval", "org/name", "--dtype", "fp8"], "--dtype fp8"),
    (["eval", "org/name", "--runtime", "magic"], "--runtime magic"),
    (["eval", "org/name", "--dataset", "pile"], "--dataset pile"),
    (["eval", "org/name", "--gpu-memory", "infGiB"], "--gpu-memory"),
])
def test_bad_option_is_exit_2_before_any_work(args: list[str], needle: str, tmp_path: Path, hub: FakeHub,
                                              repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo_root)      # configs/ as a user in the checkout names them
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "t.txt").write_text("some evaluation text\n" * 50)
    hub.repo("org/name")   # exists, so only the options can be at fault
    filled = [arg.format(tmp=tmp_path) for arg in args]
    result = CliRunner().invoke(app, filled)
    assert_one_line_error(result, BAD, needle)
    assert hub.requests == [], "the Hub was asked before the options were checked"
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()


def test_good_options_still_pass(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The checks refuse nonsense only: group sizes that divide the columns, --bits agreeing with the type."""
    for args in (["--scheme", "int4-sym", "--group-size", "32"], ["--bits", "4", "--type", "Q4_0"],
                 ["--bits", "4", "--scheme", "nf4", "--block-size", "128", "--no-double-quant"],
                 ["--bits", "4", "--max-shard-size", "1.5GB"]):
        result = CliRunner().invoke(app, ["quantize", str(tiny_llama_dir), *args, "--dry-run", "--json"])
        assert result.exit_code == 0, (args, result.stderr)
