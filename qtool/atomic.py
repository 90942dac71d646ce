"""Outputs appear whole or not at all, and never at the cost of something else.

An output is first *claimed* (:class:`OutputClaim`): it must not be, contain or lie inside anything
the source reads; what is already there must be something ``--force`` may replace (a file or folder
qtool writes, or an empty one); and a lock file beside it (``.NAME.qtool-lock``, held with
``flock``) keeps a second qtool run from writing the same path at the same time. The output is
then written under a temporary name beside it (:class:`StagedOutput`), flushed to disk and renamed
into place at the end. Every ``OSError`` on the way becomes :class:`~qtool.errors.OutputFailed`
(one line: the path and the cause), after the staged output is removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from qtool import signals
from qtool.errors import BadArgument, OutputExists, OutputFailed

PRODUCER = "qtool"
"""``__metadata__["producer"]`` of the safetensors files qtool writes: what ``--force`` may replace."""
STATS_FORMAT = "qtool-calibration-stats/1"
"""``__metadata__["format"]`` of the statistics `qtool calibrate` writes (also what ``--force`` may replace)."""

committed_outputs: list[Path] = []
"""Outputs renamed into place by this process, in order (the CLI tells a late Ctrl-C they are whole)."""

_LOCK_SUFFIX = ".qtool-lock"
_STAGED_MARK = ".qtool-tmp-"
_OLD_MARK = ".qtool-old-"
_MAX_HEADER_BYTES = 100 * 2**20        # a safetensors header larger than this is no output of ours

# What the user can do about an errno, after the system's own words for it.
_HINTS = {
    errno.ENOSPC: "free some space or choose another -o",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another -o",
    errno.EFBIG: "the file is larger than this filesystem or a limit (ulimit -f) allows; choose another -o",
    errno.EROFS: "the filesystem is read-only; choose another -o",
    errno.EACCES: "no permission to write there; choose another -o",
    errno.EPERM: "no permission to write there; choose another -o",
    errno.ENOTDIR: "a parent of the output is a file, not a folder; choose another -o",
}


def describe_os_error(path: str | Path, exc: OSError) -> str:
    """One line: which output could not be written, the system's reason, and what to do."""
    reason = exc.strerror or type(exc).__name__
    # The staged names (.NAME.qtool-tmp-...) mean nothing to the user; other paths are worth naming.
    named = str(exc.filename or "")
    where = f" ({named})" if named and named != str(path) and ".qtool-" not in named else ""
    hint = _HINTS.get(exc.errno or 0)
    return f"cannot write {path}: {reason}{where}" + (f"; {hint}" if hint else "")


@contextlib.contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing the output ``path`` into ``OutputFailed``."""
    try:
        yield
    except OSError as exc:
        raise OutputFailed(describe_os_error(path, exc)) from exc


class OutputClaim:
    """The right to write ``final``: refused (``BadArgument``) when it is, contains or lies inside a
    path in ``reads`` (what the source reads), refused (``OutputExists``) when something is there that
    ``--force`` may not replace, when it exists without ``force``, or when another qtool run holds
    its lock. Held until ``release()`` (``StagedOutput.commit``/``abort`` call it)."""

    def __init__(self, final: str | Path, *, force: bool, reads: Iterable[str | Path] = ()) -> None:
        self.final = Path(final)
        self.target = _absolute(self.final)
        self.force = force
        check_not_source(self.final, self.target, reads)
        # Checked once before anything is created (no lock file beside /dev/null), again under the lock.
        check_replaceable(self.final, self.target, force=force)
        self._lock_fd: int | None = None
        self._created_dirs: list[Path] = []
        self.lock_path = self.target.parent / f".{self.target.name}{_LOCK_SUFFIX}"
        try:
            with output_errors(self.final):
                self._created_dirs = _make_parents(self.target)
                self._lock_fd = _lock(self.lock_path, self.final)
            check_replaceable(self.final, self.target, force=force)
            _remove_leftovers(self.target)
        except BaseException:
            self.release(committed=False)
            raise

    def release(self, *, committed: bool = False) -> None:
        """Remove the lock file and drop the lock (idempotent); without a commit, also the folders
        the claim created for the output."""
        if self._lock_fd is not None:
            # Unlinked before it is unlocked: a run that opened this file meanwhile sees it is gone.
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None
        if not committed:
            for folder in self._created_dirs:      # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self._created_dirs = []


class StagedOutput:
    """A temporary file or folder next to ``final`` that becomes ``final`` on ``commit()``.

    The temporary path sits in the same folder so the rename is atomic on one filesystem,
    and starts with '.' so a half-written output is never mistaken for a result. ``claim``: an
    output claimed earlier (the pipeline claims before its long work); else it is claimed here.
    """

    def __init__(self, final: str | Path, *, force: bool, is_dir: bool, reads: Iterable[str | Path] = (),
                 claim: OutputClaim | None = None) -> None:
        self.claim = claim if claim is not None else OutputClaim(final, force=force, reads=reads)
        self.final = self.claim.final
        self.is_dir = is_dir
        self.path = self.claim.target.parent / f".{self.claim.target.name}{_STAGED_MARK}{uuid.uuid4().hex[:8]}"
        try:
            if is_dir:
                with output_errors(self.final):
                    self.path.mkdir()
        except BaseException:
            self.claim.release()
            raise

    def commit(self) -> Path:
        """Flush the staged output to disk and rename it over ``final``; record it as committed."""
        target = self.claim.target
        try:
            with output_errors(self.final):
                _fsync_tree(self.path)
                # Something may have appeared at the target during the run (not a qtool run: those
                # wait for the lock): the same rules as at the start.
                check_replaceable(self.final, target, force=self.claim.force)
        except BaseException:
            self.abort()
            raise
        # A signal during the rename waits until the output is recorded as complete, so the CLI
        # never says "nothing was written" about an output that is in place.
        with signals.held():
            try:
                with output_errors(self.final):
                    _rename_into_place(self.path, target)
            except BaseException:
                self.abort()
                raise
            committed_outputs.append(self.final)
            with contextlib.suppress(OSError):
                _fsync_dir(target.parent)
            self.claim.release(committed=True)
        return self.final

    def abort(self) -> None:
        _remove(self.path)
        self.claim.release()

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


# -- the source's files ----------------------------------------------------------------------------
def check_not_source(final: Path, target: Path, reads: Iterable[str | Path]) -> None:
    """``BadArgument`` when the output is, contains or lies inside a path the source reads.

    Paths are compared as the files they are (device and inode, after symlinks and '..'), so a
    symlink, a hard link or a bind mount of the input is caught as well as the input itself."""
    read_ids: dict[tuple[int, int], Path] = {}
    around_ids: dict[tuple[int, int], Path] = {}      # each read path and every folder above it
    for read in reads:
        read_path = Path(read)
        identity = _identity(read_path)
        if identity is None:
            continue
        read_ids.setdefault(identity, read_path)
        for start in (Path(os.path.abspath(read_path)), read_path.resolve()):   # a link's folders, its target's
            for folder in (start, *start.parents):
                folder_id = _identity(folder)
                if folder_id is not None:
                    around_ids.setdefault(folder_id, read_path)
    if not read_ids:
        return
    advice = "write the output somewhere the source does not read"
    for target_id in (_identity(target, follow=False), _identity(target)):   # a symlink, and what it names
        if target_id in read_ids:
            raise BadArgument(f"-o {final} is the input {read_ids[target_id]}; {advice}")
        if target_id in around_ids:
            raise BadArgument(f"-o {final} contains {around_ids[target_id]}, which the source reads; {advice}")
    for folder in target.parents:
        folder_id = _identity(folder)
        if folder_id in read_ids:
            raise BadArgument(f"-o {final} lies inside {read_ids[folder_id]}, which the source reads; {advice}")


def _identity(path: Path, *, follow: bool = True) -> tuple[int, int] | None:
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


# -- what --force may replace ----------------------------------------------------------------------
def check_replaceable(final: Path, target: Path, *, force: bool) -> None:
    """``OutputExists`` unless ``target`` is free, or holds what ``--force`` may replace and ``force``."""
    try:
        info = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):     # a parent that is a file: reported when made
        return
    except OSError as exc:
        raise OutputFailed(describe_os_error(final, exc)) from exc
    why = not_replaceable(target, info)
    if why:
        raise OutputExists(f"{final} {why}; --force replaces only a file or folder qtool wrote "
                           "(GGUF, qtool safetensors or statistics, or an empty one): remove it yourself "
                           "or choose another -o")
    if not force:
        raise OutputExists(f"{final} exists; pass --force to overwrite")


def not_replaceable(path: Path, info: os.stat_result) -> str | None:
    """Why ``--force`` must not replace ``path`` (None: it may): only what qtool writes is replaced."""
    mode = info.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    if stat.S_ISFIFO(mode):
        return "is a FIFO"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISREG(mode):
        if info.st_size == 0 or qtool_file(path):
            return None
        return "is a file qtool did not write (not a GGUF, qtool safetensors or statistics file)"
    if stat.S_ISDIR(mode):
        entries = list(os.scandir(path))
        if not entries:
            return None
        if any(not entry.is_file(follow_symlinks=False) for entry in entries):
            return "is a folder with subfolders, links or special files, which qtool never writes"
        if not any(entry.name.endswith(".safetensors") and qtool_file(Path(entry.path)) for entry in entries):
            return "is a folder qtool did not write (no safetensors file made by qtool)"
        return None
    return "is not a regular file or folder"


# The first line of a plan preset qtool writes (--save-plan): what lets --force replace one.
PLAN_MARK = b"# qtool plan"


def qtool_file(path: Path) -> bool:
    """A GGUF file, a plan preset qtool wrote, or a safetensors file whose metadata says qtool wrote it
    (a quantized model's shard or calibration statistics)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(PLAN_MARK))
            if head[:4] == b"GGUF" or head == PLAN_MARK:
                return True
            head = head[:8]
            handle.seek(8)
            if len(head) < 8:
                return False
            header_size = int.from_bytes(head, "little")
            if not 2 <= header_size <= _MAX_HEADER_BYTES:
                return False
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError, RecursionError):       # unreadable, not UTF-8, not JSON, nested too deep
        return False
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        return False
    if metadata.get("producer") == PRODUCER:
        return True
    return metadata.get("format") == STATS_FORMAT


# -- files and folders -----------------------------------------------------------------------------
def _absolute(final: Path) -> Path:
    """``final`` with its parent folder's real path (symlinks and '..' resolved), the name as given:
    the output itself, if it is a symlink, is judged as one rather than followed."""
    if final.name in ("", ".", ".."):
        return final.resolve()
    return final.parent.resolve() / final.name


def _make_parents(target: Path) -> list[Path]:
    """Create the missing folders above ``target``; return them, deepest first."""
    missing: list[Path] = []
    for folder in target.parents:
        if folder.is_dir():
            break
        if os.path.lexists(folder):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        missing.append(folder)
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.insert(0, folder)
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return created


def _lock(lock_path: Path, final: Path) -> int:
    """An open descriptor of ``lock_path`` holding an exclusive ``flock``; ``OutputExists`` when
    another process holds it. The kernel drops the lock when its holder dies, so a crashed run's
    leftover lock file blocks nothing."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputExists(f"{final}: another qtool run is writing it (it holds {lock_path}); wait for "
                               "it to finish or choose another -o") from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder removes the file after its rename: if that happened after our open,
        # we locked a file nobody else will see; take the one now at the path instead.
        current = _identity(lock_path, follow=False)
        held = os.fstat(fd)
        if current == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def _remove_leftovers(target: Path) -> None:
    """Staged outputs of earlier runs that died (we hold the lock: no live run owns them)."""
    prefixes = (f".{target.name}{_STAGED_MARK}", f".{target.name}{_OLD_MARK}")
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            if entry.name.startswith(prefixes):
                _remove(Path(entry.path))


def _rename_into_place(staged: Path, target: Path) -> None:
    staged_is_dir = staged.is_dir()
    try:
        target_info = os.lstat(target)
    except FileNotFoundError:
        os.replace(staged, target)
        return
    if not staged_is_dir and stat.S_ISREG(target_info.st_mode):
        os.replace(staged, target)      # one atomic step: the old file stays until the new one is there
        return
    # A folder (or a file replacing a folder) cannot be renamed over a non-empty one: move the old
    # one aside, put the new one in place, then delete the old one.
    old = target.parent / f".{target.name}{_OLD_MARK}{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.replace(old, target)
        raise
    _remove(old)


def _fsync_tree(path: Path) -> None:
    """Flush a staged file, or a staged folder's files and the folder, to disk before the rename."""
    if path.is_dir():
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False):
                _fsync_file(Path(entry.path))
        _fsync_dir(path)
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
