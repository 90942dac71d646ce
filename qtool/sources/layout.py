"""Hugging Face folder layout, without torch: which files hold the weights, JSON helpers.

Kept free of heavy imports so ``qtool inspect`` and error paths start fast.
"""
from __future__ import annotations

import json
from pathlib import Path

from qtool.errors import CorruptFile, NotFound, Unsupported

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
EXTRA_FILES = ("generation_config.json",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist ({what})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(f"{path} is not valid JSON ({str(exc).splitlines()[0][:80]}); fix or re-download it") \
            from None
    if not isinstance(value, dict):
        raise CorruptFile(f"{path} must hold a JSON object ({what})")
    return value


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder, in index order (or the single file)."""
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        index = read_json(index_path, "safetensors shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptFile(f"{index_path} has no weight_map; re-download or re-save the model")
        names: list[str] = []
        for shard in weight_map.values():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise CorruptFile(f"{index_path} names a shard {str(shard)[:60]!r} outside the folder")
            if shard not in names:
                names.append(shard)
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise NotFound(f"{folder}: shard {missing[0]} listed in {INDEX_NAME} is missing"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download it again")
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise Unsupported(f"{folder} holds only pickle checkpoints (pytorch_model*.bin / .pt); qtool never "
                          "unpickles files. Convert to safetensors first (transformers: "
                          "save_pretrained(..., safe_serialization=True))")
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        raise NotFound(f"{folder} has no .safetensors files; to read the GGUF in it, pass the file: {ggufs[0]}")
    raise NotFound(f"{folder} has no .safetensors files (and no {INDEX_NAME}); not a model folder")
