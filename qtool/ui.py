"""Progress and log lines, always on stderr so stdout stays free for ``--json``.

Library code calls ``ui.task(...)`` / ``ui.log(...)``; the CLI decides once how they show:
rich bars on a terminal, plain lines when stderr is not a TTY, nothing with ``--quiet``.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

_state = {"quiet": False}

# C0 controls but newline and tab, DEL, C1 controls (0x9b is a one-byte CSI on some terminals),
# lone surrogates, and the bidirectional overrides that reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
_UNSAFE_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, *, one_line: bool = False) -> str:
    """``text`` with every character that could drive a terminal written as an escape (``\\x1b``).

    Names and metadata come from files anyone can craft; they are printed only through this.
    """
    return (_UNSAFE_ONE_LINE if one_line else _UNSAFE).sub(_escape, text)


MESSAGE_LIMIT = 2000
"""Characters of one error or warning line: names read from files can be any length."""


def message_line(text: str) -> str:
    """One printable line of at most MESSAGE_LIMIT characters (a longer one says how much was cut)."""
    line = printable(text, one_line=True)
    if len(line) <= MESSAGE_LIMIT:
        return line
    return f"{line[:MESSAGE_LIMIT]}... ({len(line) - MESSAGE_LIMIT:,} more characters)"


class SafeConsole(Console):
    """A rich console that never interprets markup or emoji codes in the strings it is given and
    escapes control characters in them, so text read from a file prints as it is and cannot clear,
    retitle or reprogram the user's terminal. Every string a table cell, title or print gets passes
    through ``render_str``; styles are still applied with ``style=``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("markup", False)
        kwargs.setdefault("emoji", False)
        kwargs.setdefault("highlight", False)
        super().__init__(**kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(printable(text), **kwargs)


stderr = SafeConsole(stderr=True)

# Plain (non-TTY) mode prints at most one line per task every this many seconds.
_PLAIN_INTERVAL_S = 5.0


def configure(*, quiet: bool) -> None:
    _state["quiet"] = quiet


def log(message: str) -> None:
    if not _state["quiet"]:
        stderr.print(message, highlight=False, markup=False)


def warn(message: str) -> None:
    """Warnings show even with --quiet: they are about the result."""
    stderr.print(f"warning: {message_line(message)}", style="yellow", soft_wrap=True)


class Task:
    def __init__(self, description: str, total: float | None) -> None:
        self.description = description
        self.total = total
        self.done = 0.0
        self.status = ""
        self._rich: Progress | None = None
        self._id = None
        self._last_line = 0.0
        if _state["quiet"]:
            return
        if stderr.is_terminal:
            self._rich = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                  console=stderr, transient=True)
            self._rich.start()
            self._id = self._rich.add_task(description, total=total, status="")
        else:
            self._last_line = time.monotonic()
            stderr.print(f"{description} ...", highlight=False, markup=False)

    def advance(self, amount: float = 1, status: str | None = None) -> None:
        self.done += amount
        if status is not None:
            self.status = status
        if self._rich is not None:
            self._rich.update(self._id, advance=amount, status=self.status)
        elif not _state["quiet"] and time.monotonic() - self._last_line >= _PLAIN_INTERVAL_S:
            self._last_line = time.monotonic()
            of_total = f"/{self.total:g}" if self.total else ""
            stderr.print(f"{self.description}: {self.done:g}{of_total} {self.status}".rstrip(),
                         highlight=False, markup=False)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


@contextmanager
def task(description: str, total: float | None = None) -> Iterator[Task]:
    current = Task(description, total)
    try:
        yield current
    finally:
        current.close()
