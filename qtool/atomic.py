"""Outputs appear whole or not at all: write under a temporary name beside OUT, rename at the end."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from qtool.errors import OutputExists

committed_outputs: list[Path] = []
"""Outputs renamed into place by this process: a signal after that finds the output complete."""


class StagedOutput:
    """A temporary file or folder next to ``final`` that becomes ``final`` on ``commit()``.

    The temporary path sits in the same folder so the rename is atomic on one filesystem,
    and starts with '.' so a half-written output is never mistaken for a result.
    """

    def __init__(self, final: Path, *, force: bool, is_dir: bool) -> None:
        self.final = Path(final)
        self.is_dir = is_dir
        if self.final.exists() and not force:
            raise OutputExists(f"{self.final} exists; pass --force to overwrite")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.final.parent / f".{self.final.name}.qtool-tmp-{uuid.uuid4().hex[:8]}"
        if is_dir:
            self.path.mkdir()

    def commit(self) -> Path:
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.qtool-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)
            os.replace(self.path, self.final)
            _remove(old)
        else:
            os.replace(self.path, self.final)
        committed_outputs.append(self.final)
        return self.final

    def abort(self) -> None:
        _remove(self.path)

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
