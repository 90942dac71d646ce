"""Output safety end to end (issue 16): `quantize` and `calibrate` never write over what the source
reads, `--force` replaces only what qtool wrote, a second run on the same output fails at once
(exit 7), and output-side I/O failures are exit 9 with one line naming the path and the cause,
leaving nothing behind."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli import app
from tests.test_atomic import start_holder


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def assert_error(result, code: int, *needles: str) -> str:
    """One ``error:`` line, the last on stderr, with the exit code, no traceback; returns the line."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.stdout)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr      # warnings may come before it
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) by relative name, with a hash of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def src_folder(tiny_llama_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "src"))


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tiny_llama_dir, tmp_path_factory) -> bytes:
    """A GGUF (Q8_0) of the tiny Llama, as bytes, written once for the module; without its
    tokenizer, whose vocabulary takes seconds to convert into GGUF metadata."""
    weights_only = tmp_path_factory.mktemp("tiny-weights")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, weights_only / name)
    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    result = run_cli("quantize", weights_only, "--type", "Q8_0", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    return out.read_bytes()


@pytest.fixture
def src_gguf(tiny_gguf_bytes, tmp_path) -> Path:
    path = tmp_path / "in.gguf"
    path.write_bytes(tiny_gguf_bytes)
    return path


@pytest.fixture
def calib_text(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


def calibrate_args(model: Path, out: Path, calib_text: Path) -> list:
    return ["calibrate", model, "-o", out, "--calib", calib_text, "--calib-samples", "2", "--calib-seqlen", "16"]


# -- 1. never over the source ---------------------------------------------------------------------
def test_quantize_refuses_to_write_over_its_gguf_input(src_gguf, tmp_path):
    before = snapshot(src_gguf)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.gguf").symlink_to(src_gguf)
    for out in (src_gguf, tmp_path / "sub" / ".." / "in.gguf", tmp_path / "link.gguf"):
        assert_error(run_cli("quantize", src_gguf, "--type", "Q4_0", "-o", out, "--force"), 2,
                     "is the input", "source does not read")
    assert_error(run_cli("quantize", src_gguf, "--type", "Q4_0", "-o", tmp_path, "--force"), 2, "contains")
    assert snapshot(src_gguf) == before
    assert (tmp_path / "link.gguf").is_symlink()


@pytest.mark.parametrize("where, relation", [(".", "is the input"), ("model.safetensors", "is the input"),
                                             ("config.json", "is the input"), ("q4.gguf", "lies inside")])
def test_quantize_refuses_to_write_over_its_folder(src_folder, where, relation):
    before = snapshot(src_folder)
    out = src_folder / where
    for fmt in (["--type", "Q4_0"], ["--scheme", "int8-sym"])[: 1 if where.endswith(".gguf") else 2]:
        assert_error(run_cli("quantize", src_folder, *fmt, "-o", out, "--force"), 2, relation)
    assert snapshot(src_folder) == before
    assert not any(p.name.startswith(".") for p in src_folder.iterdir())     # no lock or staged leftovers


def test_calibrate_refuses_to_write_over_its_input(src_folder, src_gguf, calib_text):
    before = snapshot(src_folder), snapshot(src_gguf)
    for model, out, relation in ((src_folder, src_folder / "model.safetensors", "is the input"),
                                 (src_folder, src_folder, "is the input"),
                                 (src_gguf, src_gguf, "is the input")):
        assert_error(run_cli(*calibrate_args(model, out, calib_text), "--force"), 2, relation)
    assert (snapshot(src_folder), snapshot(src_gguf)) == before


def test_the_run_s_other_inputs_are_spared_too(src_folder, tmp_path, calib_text):
    """--stats and --calib files are read by the run: an output over them is refused like the model's."""
    from tests.test_atomic import write_safetensors

    stats = write_safetensors(tmp_path / "stats.safetensors", {"format": "qtool-calibration-stats/1", "stats": "{}"})
    before = snapshot(stats), snapshot(calib_text)
    assert_error(run_cli("quantize", src_folder, "--type", "Q4_0", "--method", "gptq", "--stats", stats,
                         "-o", stats, "--force"), 2, "is the input")
    assert_error(run_cli(*calibrate_args(src_folder, calib_text, calib_text), "--force"), 2, "is the input")
    assert (snapshot(stats), snapshot(calib_text)) == before


# -- 2. --force replaces only what qtool wrote ----------------------------------------------------
def test_force_replaces_a_qtool_output(src_folder, tmp_path):
    out = tmp_path / "out"
    assert run_cli("quantize", src_folder, "--scheme", "int8-sym", "-o", out, "-q").exit_code == 0
    result = run_cli("quantize", src_folder, "--scheme", "nf4", "-o", out, "--force", "-q")
    assert result.exit_code == 0, result.stderr
    assert "bnb_4bit_quant_type" in (out / "config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.slow
def test_force_replaces_a_statistics_file(src_folder, tmp_path, calib_text):
    stats = tmp_path / "stats.safetensors"
    for _ in range(2):
        result = run_cli(*calibrate_args(src_folder, stats, calib_text), "--force", "-q")
        assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src", "stats.safetensors"]


def test_force_refuses_what_qtool_did_not_write(src_folder, tmp_path, calib_text):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"GGUF")
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    link = tmp_path / "link.gguf"
    link.symlink_to(out)
    cases = [(fifo, "is a FIFO"), (foreign, "folder qtool did not write"), (link, "symbolic link"),
             (calib_text, "file qtool did not write")]
    if os.geteuid() == 0:
        device = tmp_path / "null"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))       # a /dev/null of our own
        cases.append((device, "is a device"))
    for target, reason in cases:
        before = os.lstat(target)
        assert_error(run_cli("quantize", src_folder, "--type", "Q8_0", "-o", target, "--force"), 7, reason,
                     "qtool wrote")
        after = os.lstat(target)
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert_error(run_cli(*calibrate_args(src_folder, foreign, calib_text), "--force"), 7, "did not write")
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


# -- 3. one run per output ------------------------------------------------------------------------
def test_second_run_on_the_same_output_fails_at_once(src_folder, tmp_path):
    out = tmp_path / "out"
    holder = start_holder(out)          # a run in another process, still writing
    try:
        for args in (["--scheme", "int8-sym"], ["--type", "Q8_0", "--force"]):
            assert_error(run_cli("quantize", src_folder, *args, "-o", out), 7, "another qtool run is writing it")
        assert not out.exists()
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    result = run_cli("quantize", src_folder, "--scheme", "int8-sym", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# -- 4. output-side I/O failures ------------------------------------------------------------------
def test_parent_that_is_a_file_is_exit_9(src_folder, tmp_path, calib_text):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    stats = afile / "stats.safetensors"
    for args, out in ((["quantize", src_folder, "--type", "Q8_0", "-o", afile / "out.gguf"], afile / "out.gguf"),
                      (["quantize", src_folder, "--scheme", "nf4", "-o", afile / "out"], afile / "out"),
                      (calibrate_args(src_folder, stats, calib_text), stats)):
        assert_error(run_cli(*args), 9, str(out), "Not a directory")
    assert afile.read_text() == "keep"


def mount_tmpfs(mount_point: Path, options: str) -> None:
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to meet a real full or read-only disk "
                    f"({result.stderr.strip() or result.returncode}); needs root with CAP_SYS_ADMIN")


@pytest.fixture
def mounts(tmp_path):
    """Mounts a tmpfs at tmp_path/NAME with options; unmounted after the test."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        mount_point = tmp_path / name
        mount_tmpfs(mount_point, options)
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_disk_full_is_exit_9_and_leaves_nothing(src_folder, mounts, calib_text):
    small = mounts("small", "size=256k")          # the tiny model's outputs are a few MB
    for args, out in ((["--scheme", "int8-sym"], small / "out"), (["--scheme", "nf4"], small / "deep" / "out")):
        assert_error(run_cli("quantize", src_folder, *args, "-o", out), 9, str(out), "No space left on device")
        assert list(small.iterdir()) == []        # no staged output, lock file or folder left
    tiny = mounts("tiny", "size=8k")
    out = tiny / "stats.safetensors"
    assert_error(run_cli(*calibrate_args(src_folder, out, calib_text)), 9, str(out), "No space left on device")
    assert list(tiny.iterdir()) == []


@pytest.mark.slow
def test_disk_full_while_writing_a_gguf_is_exit_9(src_folder, mounts):
    small = mounts("small", "size=256k")
    out = small / "out.gguf"
    assert_error(run_cli("quantize", src_folder, "--type", "Q8_0", "-o", out), 9, str(out), "No space left on device")
    assert list(small.iterdir()) == []


def test_read_only_filesystem_is_exit_9(src_folder, mounts, calib_text):
    read_only = mounts("ro", "ro,size=64k")
    for args in (["quantize", src_folder, "--type", "Q8_0", "-o", read_only / "out.gguf"],
                 ["quantize", src_folder, "--scheme", "nf4", "-o", read_only / "sub" / "out"],
                 calibrate_args(src_folder, read_only / "stats.safetensors", calib_text)):
        assert_error(run_cli(*args), 9, "Read-only file system", "read-only; choose another -o")


@pytest.mark.slow
def test_file_size_limit_is_exit_9(src_folder, tmp_path):
    """RLIMIT_FSIZE: the write itself fails (EFBIG) in the middle of the output, in a real process."""
    import resource

    out = tmp_path / "out.gguf"

    def limit() -> None:
        signal_module = __import__("signal")
        signal_module.signal(signal_module.SIGXFSZ, signal_module.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = subprocess.run([sys.executable, "-m", "qtool", "quantize", str(src_folder), "--type", "Q8_0",
                             "-o", str(out)], capture_output=True, text=True, preexec_fn=limit, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 9, result.stderr
    assert "File too large" in result.stderr and str(out) in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
