"""qtool's GGUF against llama.cpp's own converter (convert_hf_to_gguf.py, vendored in the
llama-cpp-python sdist `make install` downloads): for the same tiny checkpoint (SmolLM2's tokenizer),
both F16 files must have the same tensor names and shapes, the same metadata keys, and the same
values for every scalar key both write. Each allowed difference is listed below with its reason.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from qtool import architectures
from qtool.sources.gguf_file import GGUFFile

from tests import _converter
from tests._architectures import VARIANTS
from tests._gguf_helpers import write_gguf

pytestmark = pytest.mark.slow

VOCAB = 49152   # SmolLM2's tokenizer: the converter needs a real one

# Variants the converter refuses with this checkpoint: variant -> (part of its error, why).
REFUSED: dict[str, tuple[str, str]] = {
    "qwen2": ("BPE pre-tokenizer was not recognized",
              "transformers loads SmolLM2's tokenizer.json as a Qwen2Tokenizer (chosen by model_type), whose own "
              "pre-tokenizer changes the hash the converter identifies tokenizers by"),
    "phi3": ("tokenizer.model", "its Phi-3 class takes only a SentencePiece tokenizer.model"),
    "phi3-longrope": ("tokenizer.model", "its Phi-3 class takes only a SentencePiece tokenizer.model"),
    "gemma2": ("tokenizer.model", "its Gemma 2 class takes only a SentencePiece tokenizer.model"),
}
CONVERTED = [variant for variant in VARIANTS if variant not in REFUSED]

# Keys only qtool writes ({arch} is general.architecture).
QTOOL_ONLY_KEYS = {
    "general.quantized_by": "qtool signs its files; the converter writes it only from a --metadata override",
    "{arch}.vocab_size": "qtool writes it for every architecture so a GGUF without a vocabulary reads back "
                         "(the converter's Llama class writes it too; llama.cpp counts the tokens otherwise)",
}
# Keys only the converter writes.
CONVERTER_ONLY_KEYS: dict[str, str] = {}
# Keys both write with values that may differ.
VALUE_DIFFERENCES = {
    "general.name": "both take the folder's name; the converter title-cases it (checkpoint0 -> Checkpoint0)",
}

# Known differences qtool has not fixed: (variant, test) -> reason.
KNOWN_GAPS: dict[tuple[str, str], str] = {}


def _params(test: str) -> list:
    return [pytest.param(v, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[v, test]))
            if (v, test) in KNOWN_GAPS else v for v in CONVERTED]


@pytest.fixture(scope="module")
def converted(arch_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path | None, str | None]]:
    """variant -> (the converter's F16 GGUF, None) or (None, its error): every variant in one converter run."""
    sdist = _converter.sdist_path()
    root = tmp_path_factory.mktemp("llama-converter")
    sources = _converter.unpack(sdist, root / "llama.cpp")
    jobs = {v: (arch_checkpoint(v, VOCAB), root / f"{v}.gguf") for v in VARIANTS}
    errors = _converter.convert(sources, jobs, root / "convert.log")
    return {v: (None, errors[v]) if errors[v] else (jobs[v][1], None) for v in VARIANTS}


@pytest.fixture(scope="module")
def pair(converted, arch_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """``pair(variant)`` -> (converter GGUF, qtool GGUF) read, each written once per module."""
    cache: dict[str, tuple[dict, dict]] = {}
    folder = tmp_path_factory.mktemp("qtool-gguf")

    def get(variant: str) -> tuple[dict, dict]:
        if variant not in cache:
            path, error = converted[variant]
            assert path is not None, f"the converter refused {variant}: {error}"
            ours = write_gguf(arch_checkpoint(variant, VOCAB), "F16", folder / f"{variant}.gguf")
            cache[variant] = (_read(path), _read(ours))
        return cache[variant]

    return get


def _read(path: Path) -> dict:
    """Tensor dims (GGML order) and metadata as (GGUF type, value). qtool's own reader, which checks the
    layout strictly: gguf-py's GGUFReader takes about 7 s a file over the 49152-token vocabulary."""
    with GGUFFile(path) as gguf_file:
        return {"tensors": {t.name: t.dims for t in gguf_file.tensors},
                "metadata": {key: (gguf_file.metadata_types[key], value) for key, value in gguf_file.metadata.items()}}


def _expand(keys: dict[str, str], arch: str) -> set[str]:
    return {key.format(arch=arch) for key in keys}


def test_refused_variants_are_still_refused(converted) -> None:
    # A converter (or tokenizer) change that lifts a refusal should move the variant into the comparison.
    for variant, (part, _why) in REFUSED.items():
        path, error = converted[variant]
        assert path is None and part in (error or ""), (variant, error)


@pytest.mark.parametrize("variant", _params("tensors"))
def test_tensors_match(pair, variant: str) -> None:
    theirs, ours = (side["tensors"] for side in pair(variant))
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == [], \
        f"only the converter: {sorted(set(theirs) - set(ours))}; only qtool: {sorted(set(ours) - set(theirs))}"
    shapes = {name: (theirs[name], ours[name]) for name in theirs if theirs[name] != ours[name]}
    assert not shapes, f"shapes differ (converter, qtool): {shapes}"


@pytest.mark.parametrize("variant", _params("keys"))
def test_metadata_keys_match(pair, variant: str) -> None:
    theirs, ours = (side["metadata"] for side in pair(variant))
    arch = architectures.architecture({"model_type": VARIANTS[variant][0]}).name
    assert theirs["general.architecture"] == ours["general.architecture"] == ("STRING", arch)
    only_theirs = set(theirs) - set(ours) - _expand(CONVERTER_ONLY_KEYS, arch)
    only_ours = set(ours) - set(theirs) - _expand(QTOOL_ONLY_KEYS, arch)
    assert not only_theirs and not only_ours, \
        f"only the converter writes {sorted(only_theirs)}; only qtool writes {sorted(only_ours)}"


@pytest.mark.parametrize("variant", _params("values"))
def test_metadata_values_match(pair, variant: str) -> None:
    theirs, ours = (side["metadata"] for side in pair(variant))
    # GGUF type and value; floats are FLOAT32 in both files, so equal means exactly equal.
    common = sorted(set(theirs) & set(ours) - set(VALUE_DIFFERENCES))
    scalars = [key for key in common if not theirs[key][0].startswith("ARRAY")]
    differ = {key: (theirs[key], ours[key]) for key in scalars if theirs[key] != ours[key]}
    assert not differ, f"values differ (converter, qtool): {differ}"
    # The vocabulary arrays too (tokens, types, merges): cheap here, and what llama.cpp tokenizes with.
    arrays = [key for key in common if key not in scalars and theirs[key] != ours[key]]
    assert not arrays, f"arrays differ: {arrays}"
