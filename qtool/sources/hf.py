"""Hugging Face Hub repos as Sources, through huggingface_hub's cache.

Only what a quantizer needs is downloaded: config, generation config, tokenizer files,
safetensors shards and their index. huggingface_hub itself honours HF_TOKEN, HF_HOME,
HF_HUB_OFFLINE and HF_ENDPOINT; here its exceptions become qtool errors with one line each.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from qtool import ui
from qtool.errors import NetworkError, NotFound, Unsupported
from qtool.redact import redact_url

if TYPE_CHECKING:
    from qtool.sources.local import SafetensorsSource

ALLOW_PATTERNS = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "*.safetensors", "model.safetensors.index.json",
]
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def is_hub_id(repo_id: str) -> bool:
    return bool(_HUB_ID_RE.match(repo_id)) and ".." not in repo_id


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _endpoint() -> str:
    """HF_ENDPOINT as printed: without the credentials a user may have put in it."""
    from huggingface_hub import constants

    return redact_url(constants.ENDPOINT)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (huggingface_hub wraps HTTP errors)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def server_answer(exc: BaseException) -> tuple[int, str] | None:
    """(status, reason) of the HTTP answer behind ``exc``, if a server answered at all."""
    for link in _chain(exc):
        response = getattr(link, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            reason = str(getattr(response, "reason_phrase", "") or "")
            return status, reason[:60]
    return None


def describe_answer(status: int, reason: str, fallback: str) -> tuple[str, str]:
    """(``HTTP 500 Internal Server Error``, what the user can do about it)."""
    answer = f"HTTP {status} {reason}".strip()
    if status >= 500:
        return answer, f"the server failed; try again later, or {fallback}"
    if status == 429:
        return answer, f"too many requests; wait a while and try again, or {fallback}"
    return answer, f"check the name, the revision and HF_ENDPOINT, or {fallback}"


def _translate(exc: BaseException, repo_id: str, revision: str | None) -> Exception:
    """A huggingface_hub / httpx exception as a qtool error (never echoing a token)."""
    from huggingface_hub import errors

    where = _where(repo_id, revision)
    token_set = bool(os.environ.get("HF_TOKEN"))
    typed = next((link for link in _chain(exc) if isinstance(link, (errors.GatedRepoError, errors.RevisionNotFoundError,
                                                                    errors.RepositoryNotFoundError))), None)
    if isinstance(typed, errors.GatedRepoError):
        return NotFound(f"Hub repo {repo_id} is gated: accept its terms on the Hub and set HF_TOKEN to a token "
                        "of that account")
    if isinstance(typed, errors.RevisionNotFoundError):
        return NotFound(f"revision {revision!r} does not exist in Hub repo {repo_id}; check the branch, tag "
                        "or commit")
    if isinstance(typed, errors.RepositoryNotFoundError):
        hint = ("check the name, and that HF_TOKEN can read it" if token_set
                else "check the name; if it is private, set HF_TOKEN")
        return NotFound(f"Hub repo {repo_id} not found; {hint}")
    answer = server_answer(exc)
    if answer is not None and answer[0] in (401, 403) and not _offline():
        if token_set:
            return NotFound(f"Hub refused access to {where} (HTTP {answer[0]}): HF_TOKEN is invalid or lacks "
                            "read access; set a valid token")
        return NotFound(f"Hub refused access to {where} (HTTP {answer[0]}): set HF_TOKEN to a token with "
                        "read access")
    return network_error(exc, where, "set HF_HUB_OFFLINE=1 to use the cache")


def network_error(exc: BaseException, where: str, fallback: str) -> NetworkError:
    """Offline, an HTTP error answer (said as the server said it), or no answer at all, for ``where``
    (a repo or a file); ``fallback`` is what the user can do instead of downloading."""
    import httpx2
    from huggingface_hub import errors

    if isinstance(exc, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)) and _offline():
        return NetworkError(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; run once "
                            f"online (unset HF_HUB_OFFLINE) to download it, or {fallback}")
    answer = server_answer(exc)
    if answer is not None and answer[0] >= 400:
        # The server is reachable: say what it answered, not that it cannot be reached.
        answer_text, hint = describe_answer(*answer, fallback)
        return NetworkError(f"the Hub at {_endpoint()} answered {answer_text} for {where}; {hint}")
    if isinstance(exc, (errors.LocalEntryNotFoundError, httpx2.TransportError, ConnectionError, TimeoutError)):
        return NetworkError(f"cannot reach the Hub at {_endpoint()} for {where} and it is not fully cached; "
                            f"check your network (or HF_ENDPOINT), or {fallback}")
    return NetworkError(f"downloading {where} from {_endpoint()} failed ({type(exc).__name__}); check your "
                        f"network or HF_ENDPOINT and try again, or {fallback}")


def quiet_hub_logs() -> None:
    """huggingface_hub's own warnings (``HTTP Error 500 thrown while requesting HEAD <url>``, retries)
    print request URLs with any credentials in them, on lines of their own; qtool says what failed."""
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()


def download_snapshot(repo_id: str, *, revision: str | None = None) -> tuple[Path, str]:
    """Download (or find in the cache) what qtool needs of ``repo_id``; returns (folder, commit sha)."""
    import httpx2
    from huggingface_hub import errors, snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    # huggingface_hub's tqdm bars only on a terminal; plain stderr gets one line after the fact.
    if ui._state.get("quiet") or not ui.stderr.is_terminal:
        disable_progress_bars()
    quiet_hub_logs()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except (errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError,
            httpx2.HTTPError, httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise _translate(exc, repo_id, revision) from None
    except errors.HFValidationError:
        raise NotFound(f"{repo_id!r} is not a valid Hub repo id; use org/name[@revision]") from None
    if not any(folder.glob("*.safetensors")):
        _explain_missing_weights(repo_id, folder)
    ui.log(f"{repo_id}@{folder.name}: {sum(1 for _ in folder.iterdir())} files in {folder}")
    return folder, folder.name


def _explain_missing_weights(repo_id: str, folder: Path) -> None:
    """No safetensors were downloaded: say whether the repo only has pickles or GGUF files."""
    names: list[str] = []
    if not _offline():
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(repo_id, revision=folder.name)
            names = [sibling.rfilename for sibling in info.siblings or []]
        except Exception:  # noqa: BLE001 - only for a better message; the error below stands either way
            names = []
    if any(name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in names):
        raise Unsupported(f"Hub repo {repo_id} has only pickle checkpoints (.bin/.pt); qtool never unpickles "
                          "files. Use a repo with safetensors weights")
    if any(name.endswith(".gguf") for name in names):
        raise Unsupported(f"Hub repo {repo_id} has GGUF files but no safetensors; download a .gguf with "
                          "`hf download` and pass the file path")
    raise NotFound(f"Hub repo {repo_id} at {folder.name} has no safetensors weights")


def open_hub(repo_id: str, *, revision: str | None = None, spec: str | None = None) -> SafetensorsSource:
    """A Hub repo (at a branch, tag or commit) as a lazily read safetensors Source."""
    if not is_hub_id(repo_id):
        raise NotFound(f"{repo_id!r} is not a valid Hub repo id; use org/name[@revision]")
    from qtool.sources.local import open_folder

    folder, commit = download_snapshot(repo_id, revision=revision)
    return open_folder(folder, spec or _where(repo_id, revision), description=f"{repo_id}@{commit}",
                       revision=commit)
