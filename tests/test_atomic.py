"""Staged outputs: nothing appears at OUT until commit; an existing OUT needs --force, and --force
replaces only what qtool writes; the source's files are never an output; one run per output."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from qtool import atomic
from qtool.atomic import OutputClaim, StagedOutput
from qtool.errors import BadArgument, OutputExists, OutputFailed

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_safetensors(path: Path, metadata: dict[str, str]) -> Path:
    """A one-tensor safetensors file with the given ``__metadata__``."""
    header = json.dumps({"__metadata__": metadata,
                         "t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0")
    return path


def qtool_folder(path: Path) -> Path:
    """What a qtool safetensors output looks like to --force."""
    path.mkdir()
    write_safetensors(path / "model.safetensors", {"format": "pt", "producer": "qtool"})
    (path / "config.json").write_text("{}")
    (path / "README.md").write_text("# Quantized\n")
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_commit_renames_folder_into_place_and_records_it(tmp_path):
    out = tmp_path / "out"
    staged = StagedOutput(out, force=False, is_dir=True)
    (staged.path / "a.txt").write_text("x")
    assert not out.exists()
    assert (tmp_path / ".out.qtool-lock").exists()      # held while the output is written
    staged.commit()
    assert (out / "a.txt").read_text() == "x"
    assert listing(tmp_path) == ["out"]                  # staged folder and lock file gone
    assert atomic.committed_outputs[-1] == out


def test_abort_leaves_nothing(tmp_path):
    committed = list(atomic.committed_outputs)
    with pytest.raises(RuntimeError):
        with StagedOutput(tmp_path / "f.gguf", force=False, is_dir=False) as staged:
            staged.path.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert atomic.committed_outputs == committed


def test_folders_made_for_an_aborted_output_are_removed(tmp_path):
    staged = StagedOutput(tmp_path / "a" / "b" / "out.gguf", force=False, is_dir=False)
    assert (tmp_path / "a" / "b").is_dir()
    staged.abort()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = qtool_folder(tmp_path / "out")
    with pytest.raises(OutputExists, match="--force"):
        StagedOutput(out, force=False, is_dir=True)
    staged = StagedOutput(out, force=True, is_dir=True)
    (staged.path / "new").write_text("new")
    staged.commit()
    assert listing(out) == ["new"]
    assert listing(tmp_path) == ["out"]


def _gguf_file(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(20))
    return path


@pytest.mark.parametrize("make", [
    pytest.param(_gguf_file, id="gguf"),
    pytest.param(lambda p: write_safetensors(p, {"format": "qtool-calibration-stats/1", "stats": "{}"}), id="stats"),
    pytest.param(qtool_folder, id="qtool-folder"),
    pytest.param(lambda p: p.write_bytes(b"") and p, id="empty-file"),
    pytest.param(lambda p: p.mkdir(), id="empty-folder"),
])
def test_force_replaces_what_qtool_wrote(tmp_path, make):
    out = tmp_path / "out"
    make(out)
    staged = StagedOutput(out, force=True, is_dir=False)
    staged.path.write_bytes(b"GGUF new")
    staged.commit()
    assert out.read_bytes() == b"GGUF new"
    assert listing(tmp_path) == ["out"]


def _foreign_folder(path: Path) -> None:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")


def _folder_with_subfolder(path: Path) -> None:
    qtool_folder(path)
    (path / ".git").mkdir()


def _symlink_to_gguf(path: Path) -> None:
    path.symlink_to(_gguf_file(path.parent / "elsewhere.gguf"))


def _char_device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))    # what /dev/null is
    except PermissionError:
        pytest.skip("creating a device node needs root (CAP_MKNOD)")


@pytest.mark.parametrize("make, reason", [
    pytest.param(_char_device, "is a device", id="device"),
    pytest.param(lambda p: os.mkfifo(p), "is a FIFO", id="fifo"),
    pytest.param(_foreign_folder, "folder qtool did not write", id="foreign-folder"),
    pytest.param(_folder_with_subfolder, "subfolders", id="folder-with-subfolder"),
    pytest.param(_symlink_to_gguf, "symbolic link", id="symlink"),
    pytest.param(lambda p: p.write_text("notes"), "file qtool did not write", id="text-file"),
    pytest.param(lambda p: write_safetensors(p, {"format": "pt"}), "file qtool did not write", id="foreign-safetensors"),
])
def test_force_refuses_what_qtool_did_not_write(tmp_path, make, reason):
    out = tmp_path / "out"
    make(out)
    before = {p.name: os.lstat(p) for p in tmp_path.iterdir()}
    for force in (True, False):     # the reason is given first, so --force is not suggested in vain
        with pytest.raises(OutputExists, match=reason):
            StagedOutput(out, force=force, is_dir=False)
    after = {p.name: os.lstat(p) for p in tmp_path.iterdir()}      # no lock file was made either
    assert {name: (s.st_ino, s.st_mode) for name, s in after.items()} == \
        {name: (s.st_ino, s.st_mode) for name, s in before.items()}


def test_something_appearing_at_the_output_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out.gguf"
    staged = StagedOutput(out, force=False, is_dir=False)
    staged.path.write_bytes(b"GGUF new")
    out.write_bytes(b"GGUF written by another program meanwhile")
    with pytest.raises(OutputExists, match="--force"):
        staged.commit()
    assert out.read_bytes() == b"GGUF written by another program meanwhile"
    assert listing(tmp_path) == ["out.gguf"]


# -- the source's files --------------------------------------------------------------------------
@pytest.fixture
def source_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", {"format": "pt"})
    (folder / "config.json").write_text("{}")
    return folder


def test_output_over_the_source_is_refused_with_or_without_force(tmp_path, source_folder):
    weights = source_folder / "model.safetensors"
    reads = [source_folder, weights, source_folder / "config.json"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(weights)
    os.link(weights, tmp_path / "hardlink.safetensors")
    (tmp_path / "folder-link").symlink_to(source_folder)
    cases = {
        weights: "is the input",
        source_folder: "is the input",
        tmp_path / "sub" / ".." / "model" / "model.safetensors": "is the input",
        tmp_path / "link.safetensors": "is the input",
        tmp_path / "hardlink.safetensors": "is the input",
        tmp_path: "contains",
        tmp_path / "folder-link" / "config.json": "is the input",
        source_folder / "new.gguf": "lies inside",
        tmp_path / "folder-link" / "deeper" / "out": "lies inside",
        weights / "out.gguf": "lies inside",
    }
    for final, relation in cases.items():
        for force in (True, False):
            with pytest.raises(BadArgument, match=relation):
                OutputClaim(final, force=force, reads=reads)
    assert listing(source_folder) == ["config.json", "model.safetensors"]
    assert not (tmp_path / "folder-link" / "deeper").exists()
    OutputClaim(tmp_path / "elsewhere", force=False, reads=reads).release()    # beside it is fine


# -- one run per output --------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys
    from qtool.atomic import OutputClaim
    claim = OutputClaim(sys.argv[1], force=False)
    print("claimed", flush=True)
    sys.stdin.read()
    claim.release()
""")


def start_holder(out: Path) -> subprocess.Popen:
    """Another process claiming ``out`` (as a running qtool does) until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert holder.stdout.readline().strip() == "claimed"
    return holder


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path):
    out = tmp_path / "out.gguf"
    holder = start_holder(out)
    try:
        with pytest.raises(OutputExists, match="another qtool run is writing it"):
            StagedOutput(out, force=True, is_dir=False)
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    assert list(tmp_path.iterdir()) == []           # the holder removed its lock file
    staged = StagedOutput(out, force=False, is_dir=False)
    staged.path.write_bytes(b"GGUF")
    staged.commit()
    assert listing(tmp_path) == ["out.gguf"]


def test_a_crashed_run_leaves_no_lock_that_blocks(tmp_path):
    out = tmp_path / "out"
    holder = start_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert (tmp_path / ".out.qtool-lock").exists()       # the file stays, the lock died with its holder
    (tmp_path / ".out.qtool-tmp-deadbeef").mkdir()        # and a half-written output of the dead run
    staged = StagedOutput(out, force=False, is_dir=True)
    staged.commit()
    assert listing(tmp_path) == ["out"]


# -- output-side I/O failures ---------------------------------------------------------------------
def test_a_parent_that_is_a_file_is_an_output_failure(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(OutputFailed, match=r"afile.*Not a directory") as raised:
        StagedOutput(afile / "out.gguf", force=True, is_dir=False)
    assert str(afile / "out.gguf") in raised.value.message
    assert afile.read_text() == "keep me" and listing(tmp_path) == ["afile"]


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user to meet a permission error needs root")
def test_no_permission_is_an_output_failure(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="qtool-perm-"))      # beside tmp_path, which 'nobody' cannot reach
    os.chmod(base, 0o711)
    locked = base / "locked"
    locked.mkdir(mode=0o555)
    out = locked / "out.gguf"
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:      # as 'nobody', without exec (the venv's interpreter may be out of its reach)
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            OutputClaim(out, force=False)
        except OutputFailed as exc:
            os.write(write_end, exc.message.encode())
            code = exc.exit_code
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    exit_code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    try:
        assert exit_code == 9, message
        assert message.startswith(f"cannot write {out}: Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base)


def test_a_signal_during_the_rename_waits_until_the_output_is_recorded(tmp_path):
    """SIGINT arriving between the rename and its record would report a whole output as not written."""
    import os
    import signal

    from qtool import atomic, signals

    signals.install()
    out = tmp_path / "out.gguf"
    staged = StagedOutput(out, force=False, is_dir=False)
    staged.path.write_bytes(b"GGUF")
    real_replace = os.replace

    def replace_then_signal(src, dst):   # the signal lands right after the rename itself
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    os.replace = replace_then_signal
    try:
        with pytest.raises(KeyboardInterrupt):
            staged.commit()
    finally:
        os.replace = real_replace
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    assert out.read_bytes() == b"GGUF"
    assert atomic.committed_outputs[-1] == out
