"""A model's tokenizer, as calibration and evaluation both use it.

Loaded from the tokenizer files the source provides (transformers' AutoTokenizer on local files; no
code from the checkpoint runs), and probed for whether it puts BOS first, which decides whether
calibration and evaluation windows start with BOS (as llama.cpp's tools do then).

The files are checked before transformers sees them, each failure one line naming the file:

- no tokenizer files, or none transformers can build a tokenizer from (tokenizer.json,
  tokenizer.model, vocab.json): NotFound (3);
- ``auto_map`` in tokenizer_config.json (or an AutoTokenizer entry in config.json's): custom
  tokenizer code, which qtool never runs (there is no trust-remote-code option): Unsupported (4);
- a file that is not JSON, not an object, has a tokenizer.json without its ``model`` section, or
  that transformers / tokenizers cannot build a tokenizer from: CorruptFile (5).

The model's config is checked first (:mod:`qtool.sources.config_check`: against its tensors, then by
transformers): AutoTokenizer reads config.json too, and its refusal would otherwise name the tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from qtool.errors import CorruptFile, NotFound, QtoolError, Unsupported
from qtool.sources.base import Source
from qtool.sources.config_check import check_source_config, config_origin, first_line, hf_config
from qtool.sources.jsonfile import clip, load_json

# Files a tokenizer can be built from (the others only configure one).
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _refuse_auto_map(path: Path, auto_map: Any) -> None:
    names = ", ".join(clip(str(name), 40) for name in list(auto_map)[:3]) if isinstance(auto_map, dict) else ""
    raise Unsupported(f"{path}: auto_map{f' ({names})' if names else ''} names custom tokenizer code; qtool "
                      "never runs code from a checkpoint. Use a model whose tokenizer transformers knows")


def check_tokenizer_files(folder: Path) -> Path:
    """Refuse what transformers must not load (see module doc); returns the file the tokenizer is built from."""
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.exists():
        settings = load_json(tokenizer_config, "tokenizer config")
        if "auto_map" in settings:
            _refuse_auto_map(tokenizer_config, settings["auto_map"])
        tokenizer_class = settings.get("tokenizer_class")
        if tokenizer_class is not None and not isinstance(tokenizer_class, str):
            raise CorruptFile(f"{tokenizer_config}: tokenizer_class is {clip(tokenizer_class, 40)}, not a class name; "
                              "fix or re-download the file")
    model_config = folder / "config.json"
    if model_config.exists():
        auto_map = load_json(model_config, "model config").get("auto_map")
        if isinstance(auto_map, dict) and "AutoTokenizer" in auto_map:
            _refuse_auto_map(model_config, {"AutoTokenizer": None})
    vocabulary = next((folder / name for name in _VOCABULARY_FILES if (folder / name).exists()), None)
    if vocabulary is None:
        raise NotFound(f"{folder}: no {', '.join(_VOCABULARY_FILES[:-1])} or {_VOCABULARY_FILES[-1]}; the model's "
                       "tokenizer is needed next to the weights")
    if vocabulary.name == "tokenizer.json":
        document = load_json(vocabulary, "tokenizer")
        if not isinstance(document.get("model"), dict):
            raise CorruptFile(f"{vocabulary}: not a tokenizers file (no \"model\" object); fix or re-download it")
    elif vocabulary.name == "vocab.json":
        load_json(vocabulary, "tokenizer vocabulary")
    return vocabulary


def load_tokenizer(source: Source, purpose: str = "this command") -> Any:
    folder = source.tokenizer_dir()
    if folder is None:
        raise NotFound(f"{source.description}: no tokenizer files found; {purpose} needs the model's tokenizer "
                       "(tokenizer.json) next to the weights")
    check_source_config(source)
    if source.config.get("model_type"):
        # AutoTokenizer builds the transformers config too: its refusal is about config.json, say so.
        hf_config(source.config, config_origin(source))
    vocabulary = check_tokenizer_files(folder)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except QtoolError:
        raise
    except ImportError as exc:
        raise Unsupported(f"{vocabulary}: loading this tokenizer needs a package that is not installed "
                          f"({first_line(exc)})") from None
    except (MemoryError, RecursionError):
        raise CorruptFile(f"{vocabulary}: the tokenizer is too large or too deeply nested to be a real one; "
                          "fix or re-download it") from None
    except Exception as exc:  # noqa: BLE001 - transformers and the tokenizers Rust parser raise bare Exception types
        raise CorruptFile(f"{vocabulary}: transformers cannot build a tokenizer from {folder} "
                          f"({type(exc).__name__}: {first_line(exc)}); fix or re-download the tokenizer files") \
            from None


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
