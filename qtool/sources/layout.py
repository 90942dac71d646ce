"""Hugging Face folder layout, without torch: which files hold the weights, JSON helpers.

Kept free of heavy imports so ``qtool inspect`` and error paths start fast.
"""
from __future__ import annotations

import os
from pathlib import Path

from qtool.errors import CorruptFile, NotFound, Unsupported
from qtool.sources.jsonfile import clip, load_json, require_regular_file

INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
EXTRA_FILES = ("generation_config.json",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a model file, through :func:`qtool.sources.jsonfile.load_json`."""
    return load_json(path, what)


def check_folder_files(folder: Path) -> None:
    """Refuse (exit 2) a model folder whose known files are FIFOs, sockets or devices.

    Checked before anything in the folder is opened: reading a FIFO blocks forever, and the
    tokenizer files are read later by libraries that would just open them.
    """
    for name in ("config.json", INDEX_NAME, *TOKENIZER_FILES, *EXTRA_FILES):
        if os.path.lexists(folder / name):
            require_regular_file(folder / name, f"a file of the model folder {folder}")


def read_index(folder: Path) -> dict[str, str] | None:
    """``weight_map`` of the folder's shard index (tensor name -> shard file name), or None without one."""
    index_path = folder / INDEX_NAME
    if not os.path.lexists(index_path):
        return None
    index = read_json(index_path, "safetensors shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptFile(f"{index_path} has no weight_map; re-download or re-save the model")
    for tensor_name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CorruptFile(f"{index_path} names a shard {clip(shard, 60)} for tensor {clip(tensor_name)} "
                              "outside the folder")
    return weight_map


def check_index(folder: Path, weight_map: dict[str, str], tensors_by_shard: dict[str, list[str]]) -> None:
    """The index and the shards must list the same tensors, each in the shard the index names.

    ``tensors_by_shard``: shard file name -> the tensor names its header holds. An index that names
    a tensor no shard holds, or a shard tensor the index omits, is a corrupt (half-written or
    hand-edited) checkpoint: transformers would fail or silently leave weights at random.
    """
    index_path = folder / INDEX_NAME
    where: dict[str, str] = {}
    for shard, names in tensors_by_shard.items():
        for name in names:
            where[name] = shard
            if name not in weight_map:
                raise CorruptFile(f"{index_path} omits tensor {clip(name)} that {shard} holds; the index "
                                  "and the shards disagree (re-download or re-save the model)")
            if weight_map[name] != shard:
                raise CorruptFile(f"{index_path} places tensor {clip(name)} in {clip(weight_map[name], 60)} "
                                  f"but {shard} holds it; re-download or re-save the model")
    for name, shard in weight_map.items():
        if name not in where:
            raise CorruptFile(f"{index_path} names tensor {clip(name)} in {clip(shard, 60)}, which does not "
                              "hold it; the checkpoint is incomplete (re-download or re-save the model)")


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder, in index order (or the single file)."""
    check_folder_files(folder)
    weight_map = read_index(folder)
    if weight_map is not None:
        names: list[str] = []
        for shard in weight_map.values():
            if shard not in names:
                names.append(shard)
        missing = [name for name in names if not os.path.lexists(folder / name)]
        if missing:
            raise NotFound(f"{folder}: shard {clip(missing[0], 60)} listed in {INDEX_NAME} is missing"
                           f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download it again")
        return [folder / name for name in names]
    single = folder / "model.safetensors"
    if os.path.lexists(single):
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
