"""A model's tokenizer, as calibration and evaluation both use it.

Loaded from the tokenizer files the source provides (transformers' AutoTokenizer on local files; no
code from the checkpoint runs), and probed for whether it puts BOS first, which decides whether
calibration and evaluation windows start with BOS (as llama.cpp's tools do then).
"""
from __future__ import annotations

from typing import Any

from qtool.errors import NotFound
from qtool.sources.base import Source


def load_tokenizer(source: Source, purpose: str = "this command") -> Any:
    folder = source.tokenizer_dir()
    if folder is None:
        raise NotFound(f"{source.description}: no tokenizer files found; {purpose} needs the model's tokenizer "
                       "(tokenizer.json) next to the weights")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def bos_policy(tokenizer: Any) -> tuple[bool, int | None]:
    """(adds BOS, BOS id) as the tokenizer is configured, which is what llama.cpp follows too.

    Probed on a sample instead of read from ``add_bos_token``: that attribute is missing or
    misleading for several tokenizer classes, while the post-processor is what actually runs.
    """
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False, None
    with_special = tokenizer("a b", add_special_tokens=True)["input_ids"]
    without = tokenizer("a b", add_special_tokens=False)["input_ids"]
    adds = len(with_special) > len(without) and with_special[0] == bos_id
    return adds, int(bos_id)
