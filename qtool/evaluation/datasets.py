"""Evaluation text: a local file (``--text FILE``) or a named dataset from the Hub (``--dataset``).

``wikitext2`` is the test split of ``wikitext-2-raw-v1`` from the Hub's ``Salesforce/wikitext``
(one parquet file, cached by huggingface_hub). Its rows are lines with their line ends, so the
text is the rows concatenated, in order: the same bytes as the ``wiki.test.raw`` file that
llama-perplexity users pass with ``-f``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from qtool.errors import BadArgument, NotFound

WIKITEXT2_REPO = "Salesforce/wikitext"
WIKITEXT2_FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
DATASETS: dict[str, tuple[str, str]] = {"wikitext2": (WIKITEXT2_REPO, WIKITEXT2_FILE)}


@dataclass(frozen=True)
class EvalText:
    text: str
    label: str        # for reports: the file path or "wikitext2 (Salesforce/wikitext test)"
    sha256: str       # of the UTF-8 bytes, so two reports can be checked to use the same text
    nbytes: int


def _eval_text(text: str, label: str) -> EvalText:
    data = text.encode("utf-8")
    return EvalText(text=text, label=label, sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))


def check_text_file(path: str | Path) -> None:
    """--text names a regular, non-empty file (a FIFO or /dev/zero would block or never end)."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"--text {path}: no such file; pass a UTF-8 text file")
    if not path.is_file():
        raise BadArgument(f"--text {path}: not a regular file; pass a UTF-8 text file")
    if path.stat().st_size == 0:
        raise BadArgument(f"--text {path}: the file is empty")


def read_text_file(path: str | Path) -> EvalText:
    """The file's text exactly as stored (line ends kept, as llama-perplexity reads it)."""
    path = Path(path)
    check_text_file(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadArgument(f"--text {path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc
    if not text.strip():
        raise BadArgument(f"--text {path}: the file is empty")
    return _eval_text(text, str(path))


def join_rows(rows: list[str | None]) -> str:
    """Rows of a line-per-row text dataset back into the text (rows keep their line ends)."""
    return "".join(row for row in rows if row)


def _download(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    from qtool.sources.hf import quiet_hub_logs

    quiet_hub_logs()
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision))
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NotFound(f"dataset {where} not found on the Hub; pass --text FILE with the evaluation text") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:   # before EntryNotFoundError, its base
        raise _network_error(exc, where) from None
    except EntryNotFoundError as exc:
        raise NotFound(f"dataset file {where} not found on the Hub; pass --text FILE with the evaluation text") from exc
    except (HfHubHTTPError, ConnectionError, TimeoutError, OSError) as exc:
        raise _network_error(exc, where) from None


def _network_error(exc: BaseException, where: str) -> Exception:
    from qtool.sources.hf import network_error

    return network_error(exc, f"dataset {where}", "pass --text FILE with the evaluation text")


def read_parquet_text(path: Path, column: str = "text") -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise NotFound("reading Hub datasets needs pyarrow (pip install pyarrow); or pass --text FILE") from exc
    table = pq.read_table(path, columns=[column])
    return join_rows(table.column(column).to_pylist())


def dataset_text(name: str, revision: str | None = None) -> EvalText:
    if name not in DATASETS:
        raise BadArgument(f"--dataset {name}: choose one of {', '.join(DATASETS)}, or pass --text FILE")
    repo_id, filename = DATASETS[name]
    text = read_parquet_text(_download(repo_id, filename, revision))
    return _eval_text(text, f"{name} ({repo_id}, {filename.split('/')[0]} test split)")


def load_text(text_file: str | Path | None, dataset: str = "wikitext2") -> EvalText:
    """``--text FILE`` wins over ``--dataset``."""
    if text_file is not None:
        return read_text_file(text_file)
    return dataset_text(dataset)
