"""JSON from a model file, parsed so that no hostile file can crash or exhaust qtool.

Every JSON document qtool reads from a checkpoint (safetensors headers, shard indexes,
config.json, tokenizer_config.json, generation_config.json, ...) goes through
:func:`load_json`. What Python's ``json`` lets through or raises on hostile input, and what
we do instead (always a QtoolError naming the file, never exit 1):

- a file that is not a regular file (a FIFO would block ``open`` forever): BadArgument (2);
- a file larger than ``max_bytes``: CorruptFile (5), before it is read;
- not UTF-8, not JSON, a 5000-digit integer (Python's int-string limit raises
  ValueError), nesting deep enough to raise RecursionError, ``NaN`` / ``Infinity`` /
  ``1e400`` (not strict JSON), strings with lone surrogates (``"\\ud800"``, not valid
  Unicode: printing or encoding them raises later): CorruptFile (5).
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from qtool.errors import BadArgument, CorruptFile, NotFound

# Real config/tokenizer files are at most tens of MB (large tokenizer.json ~35 MB).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Names and values quoted in messages are cut to this many characters.
QUOTE_LIMIT = 80
# A JSON \u escape of a UTF-16 surrogate: only then can a string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISDIR, "a folder"))


def clip(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a name or value read from a file, cut to ``limit`` characters with ``...``.

    repr escapes control characters and lone surrogates, so the result is always printable;
    lists and objects show their first few items only (no cost in proportion to their size).
    """
    text = _short_repr(value, depth=2)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short_repr(value: object, depth: int) -> str:
    if isinstance(value, str):
        return repr(value[:QUOTE_LIMIT + 1])
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<integer of about {int(value.bit_length() * 0.30103)} digits>"
    if isinstance(value, (list, dict)):
        if depth == 0 or not value:
            return "[...]" if isinstance(value, list) and value else "{...}" if value else repr(value)
        items = list(value.items())[:8] if isinstance(value, dict) else value[:8]
        if isinstance(value, dict):
            inner = ", ".join(f"{_short_repr(k, 0)}: {_short_repr(v, depth - 1)}" for k, v in items)
            return "{" + inner + (", ..." if len(value) > 8 else "") + "}"
        inner = ", ".join(_short_repr(item, depth - 1) for item in items)
        return "[" + inner + (", ..." if len(value) > 8 else "") + "]"
    return repr(value)[:QUOTE_LIMIT + 1]


def require_regular_file(path: Path, what: str) -> os.stat_result:
    """``stat`` of ``path``; refuse (exit 2) anything that is not a regular file.

    Checked before any ``open``: opening a FIFO for reading blocks until a writer appears.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist ({what})") from None
    except OSError as exc:
        raise NotFound(f"{path} cannot be read ({what}): {exc.strerror or exc}") from None
    if not stat.S_ISREG(status.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(status.st_mode)), "not a regular file")
        raise BadArgument(f"{path} is {kind}, not a regular file ({what}); qtool reads only regular files")
    return status


def open_regular(path: Path, what: str):
    """Open a regular file for binary reading without ever blocking on a FIFO swapped in after stat."""
    require_regular_file(path, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadArgument(f"{path} is not a regular file ({what}); qtool reads only regular files")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _reject_constant(name: str) -> float:
    raise _NotStrict(name)


class _NotStrict(ValueError):
    pass


class DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrict(text)
    return value


def _first_invalid_string(value: Any) -> str | None:
    """The first key or string (as repr) holding a lone surrogate; iterative (no recursion)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if not _valid_unicode(key):
                    return key
                pending.append(inner)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str) and not _valid_unicode(item):
            return item
    return None


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_json(source: str | Path | bytes, what: str, *, origin: str | Path | None = None,
              max_bytes: int = DEFAULT_MAX_BYTES, expect: type | None = dict,
              reject_duplicates: bool = False) -> Any:
    """Parse JSON from a model file (a path) or from bytes read out of one (``origin`` names it).

    ``what`` says what the document is ("model config", "safetensors header"), for messages.
    ``expect``: the type the top-level value must have (dict by default; None for any).
    ``reject_duplicates``: a key given twice in one object is corrupt (safetensors headers).
    Raises NotFound, BadArgument (not a regular file) or CorruptFile, each naming the file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
        name = str(origin) if origin is not None else what
        if len(raw) > max_bytes:
            raise CorruptFile(f"{name}: {what} is {len(raw)} bytes, more than the {max_bytes} qtool reads; "
                              "the file is corrupt")
    else:
        path = Path(source)
        name = str(origin) if origin is not None else str(path)
        status = require_regular_file(path, what)
        if status.st_size > max_bytes:
            raise CorruptFile(f"{name}: {what} is {status.st_size} bytes, more than the {max_bytes} qtool "
                              "reads; the file is corrupt or not what it is named")
        with open_regular(path, what) as handle:
            raw = handle.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise CorruptFile(f"{name}: {what} grew past {max_bytes} bytes while being read")

    def fail(problem: str) -> CorruptFile:
        return CorruptFile(f"{name}: {what} {problem}; fix or re-download the file")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"is not UTF-8 (bad byte at offset {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                           object_pairs_hook=_no_duplicates if reject_duplicates else None)
    except DuplicateKey as exc:
        raise fail(f"names key {clip(exc.args[0])} twice") from None
    except _NotStrict as exc:
        raise fail(f"holds the number {clip(exc.args[0], 40)}, which is not finite (not strict JSON)") from None
    except RecursionError:
        raise fail("is nested too deeply to be a real file") from None
    except json.JSONDecodeError as exc:
        raise fail(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except ValueError as exc:
        # Python's int-string limit: "Exceeds the limit (4300 digits) for integer string conversion".
        if "integer string conversion" in str(exc):
            raise fail("holds an integer with thousands of digits") from None
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise fail(f"holds a value Python cannot read ({message[:80]})") from None
    if _SURROGATE_ESCAPE.search(raw):
        bad = _first_invalid_string(value)
        if bad is not None:
            raise fail(f"holds the string {clip(bad)}, which is not valid Unicode (a lone surrogate)")
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        raise fail(f"must hold {kind}, not {type(value).__name__}")
    return value
