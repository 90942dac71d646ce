"""Staged outputs: nothing appears at OUT until commit; an existing OUT needs force."""
import pytest

from qtool.atomic import StagedOutput
from qtool.errors import OutputExists


def test_commit_renames_folder_into_place(tmp_path):
    out = tmp_path / "out"
    staged = StagedOutput(out, force=False, is_dir=True)
    (staged.path / "a.txt").write_text("x")
    assert not out.exists()
    staged.commit()
    assert (out / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StagedOutput(tmp_path / "f.gguf", force=False, is_dir=False) as staged:
            staged.path.write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(OutputExists, match="--force"):
        StagedOutput(out, force=False, is_dir=True)
    staged = StagedOutput(out, force=True, is_dir=True)
    (staged.path / "new").write_text("new")
    staged.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
