"""Ctrl-C and SIGTERM, installed before anything heavy is imported.

Both unwind as KeyboardInterrupt (SIGTERM as its subclass ``Terminated``), so staged outputs are
removed on the way out and the CLI prints one line with its own exit code. A signal that arrives while
a module is being imported waits until the import has moved on: an exception raised inside an
extension module's initialisation can abort the process (``terminate called ...``) or be swallowed.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from qtool.errors import Terminated

_RETRY_S = 0.05
_pending: list[int] = []   # a signal held back until the import under way, or a held block, is done
_holding = [0]             # depth of held() blocks


def _in_import(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


raised: list[int] = []
"""Signals turned into exceptions in this process, oldest first."""


def _raise(signum: int) -> None:
    _pending.clear()
    raised.append(signum)
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


@contextmanager
def held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then unwind as usual: for steps that must happen
    together (an output's rename and the record that it is complete)."""
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
        if not _holding[0] and _pending:
            _raise(_pending[0])


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _holding[0]:
        if not _pending:
            _pending.append(signum)
        return
    if _in_import(frame):
        if not _pending:
            _pending.append(signum)
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _raise(signum)


def _on_retry(signum: int, frame: FrameType | None) -> None:
    if not _pending:
        return
    if _in_import(frame):
        signal.setitimer(signal.ITIMER_REAL, _RETRY_S)
        return
    _raise(_pending[0])


def install() -> None:
    """Route SIGINT and SIGTERM through the handlers above (main thread only; idempotent)."""
    try:
        signal.signal(signal.SIGALRM, _on_retry)   # first: the others may need it at once
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
    except ValueError:   # not the main thread (a library caller's worker): leave their handlers be
        pass
