"""Calibration samples: seeded token windows from a text that is not the evaluation text.

``--calib wikitext2-train`` (default) is the *train* split of wikitext-2-raw-v1 from the Hub's
``Salesforce/wikitext`` (downloaded once through huggingface_hub's cache); ``--calib FILE`` is any
UTF-8 text file. The text is tokenized once, then ``samples`` windows of ``seqlen`` tokens are cut
at random offsets drawn from a seeded generator, so the same options give the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qtool.errors import BadArgument, NetworkError, NotFound
from qtool.tokenizer import bos_policy

WIKITEXT2_TRAIN = "wikitext2-train"
DEFAULT_CALIB = WIKITEXT2_TRAIN
DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512
_WIKITEXT_REPO = "Salesforce/wikitext"
_WIKITEXT_TRAIN_FILE = "wikitext-2-raw-v1/train-00000-of-00001.parquet"


@dataclass
class CalibrationSet:
    tokens: torch.Tensor      # [samples, seqlen] int64
    description: str          # where the text came from, for reports
    text_tokens: int          # tokens in the whole text the windows were cut from
    seed: int

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seqlen(self) -> int:
        return int(self.tokens.shape[1])


def read_calibration_text(calib: str | Path) -> tuple[str, str]:
    """(text, description) for ``--calib``."""
    if str(calib) == WIKITEXT2_TRAIN:
        return _wikitext2_train(), f"{_WIKITEXT_REPO} wikitext-2-raw-v1 train"
    path = Path(calib)
    if not path.is_file():
        raise NotFound(f"--calib {calib}: no such file; pass a UTF-8 text file or {WIKITEXT2_TRAIN}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadArgument(f"--calib {calib}: not UTF-8 text; pass a plain text file") from None
    if not text.strip():
        raise BadArgument(f"--calib {calib}: the file is empty; pass a text with some thousands of words")
    return text, str(path)


def _wikitext2_train() -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        parquet = hf_hub_download(_WIKITEXT_REPO, _WIKITEXT_TRAIN_FILE, repo_type="dataset")
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise NetworkError(f"--calib {WIKITEXT2_TRAIN}: cannot download {_WIKITEXT_REPO} ({type(exc).__name__}) "
                           "and it is not cached; pass --calib FILE with a local text file") from None
    import pyarrow.parquet as pq

    # The raw files are the rows concatenated (each row keeps its own newline).
    return "".join(pq.read_table(parquet, columns=["text"]).column("text").to_pylist())


def sample_windows(token_ids: torch.Tensor, *, samples: int, seqlen: int, seed: int,
                   bos_token_id: int | None = None) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at seeded random offsets (BOS first when given)."""
    if samples < 1 or seqlen < 2:
        raise BadArgument(f"--calib-samples {samples} / --calib-seqlen {seqlen}: need at least 1 sample of 2 tokens")
    if token_ids.numel() < seqlen:
        raise BadArgument(f"the calibration text has {token_ids.numel()} tokens, fewer than --calib-seqlen "
                          f"{seqlen}; pass a longer --calib FILE or a smaller --calib-seqlen")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen + 1, (samples,), generator=generator)
    windows = token_ids[starts.unsqueeze(1) + torch.arange(seqlen).unsqueeze(0)].clone()
    if bos_token_id is not None:
        # As llama.cpp's perplexity and imatrix tools do: every window starts with BOS.
        windows[:, 0] = bos_token_id
    return windows


def calibration_set(calib: str | Path, tokenizer: Any, *, samples: int = DEFAULT_SAMPLES,
                    seqlen: int = DEFAULT_SEQLEN, seed: int = 0) -> CalibrationSet:
    text, description = read_calibration_text(calib)
    ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    token_ids = torch.tensor(ids, dtype=torch.long)
    adds_bos, bos_id = bos_policy(tokenizer)
    bos = bos_id if adds_bos else None
    windows = sample_windows(token_ids, samples=samples, seqlen=seqlen, seed=seed, bos_token_id=bos)
    return CalibrationSet(windows, description, int(token_ids.numel()), seed)
