"""qtool's GGUF against llama.cpp's own converter (convert_hf_to_gguf.py, vendored in the
llama-cpp-python sdist `make install` downloads): for the same tiny checkpoint (SmolLM2's tokenizer, or
a small SentencePiece one where the converter takes only that), both F16 files must have the same tensor names and shapes, the same metadata keys, and the same
values for every scalar key both write. Each allowed difference is listed below with its reason.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtool import architectures
from qtool.sources.gguf_file import GGUFFile

from tests import _converter
from tests._architectures import ALL_VARIANTS, build_checkpoint
from tests._gguf_helpers import train_spm_tokenizer, write_gguf

pytestmark = pytest.mark.slow

VOCAB = 49152   # SmolLM2's tokenizer: the converter needs a real one
SPM_VOCAB = 512  # the SentencePiece tokenizers trained for SPM_VARIANTS: 256 byte pieces, 253 merges

# Variants the converter refuses with SmolLM2's tokenizer: variant -> (part of its error, why). Each is
# compared on a checkpoint with a SentencePiece tokenizer.model instead (SPM_VARIANTS).
REFUSED: dict[str, tuple[str, str]] = {
    "qwen2": ("BPE pre-tokenizer was not recognized",
              "transformers loads SmolLM2's tokenizer.json as a Qwen2Tokenizer (chosen by model_type), whose own "
              "pre-tokenizer changes the hash the converter identifies tokenizers by"),
    "phi3": ("tokenizer.model", "its Phi-3 class takes only a SentencePiece tokenizer.model"),
    "phi3-longrope": ("tokenizer.model", "its Phi-3 class takes only a SentencePiece tokenizer.model"),
    "gemma2": ("tokenizer.model", "its Gemma 2 class takes only a SentencePiece tokenizer.model"),
}
# Variants compared with a SentencePiece tokenizer (tokenizer.model, with the tokenizer.json and
# tokenizer_config.json transformers writes for it; Gemma's prepends no space, as Gemma's own):
# variant -> why.
SPM_VARIANTS = {
    "phi3": "Phi-3 (mini 4k/128k, medium) ships a SentencePiece tokenizer.model, the converter's Phi-3 input",
    "phi3-longrope": "as phi3",
    "gemma2": "Gemma 2 ships a SentencePiece tokenizer.model, the converter's Gemma 2 input",
    # Byte-level BPE cannot pass for Qwen2 offline: transformers 5 loads any tokenizer of a model_type
    # "qwen2" folder as Qwen2Tokenizer whatever tokenizer_config.json names (qwen2 is in its
    # MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which splits with Qwen2's regex, and the converter
    # knows that regex only by the token ids of Qwen's own 151k vocabulary. Its Qwen2 class tries a
    # tokenizer.model first, so a SentencePiece one takes the converter's other Qwen2 path.
    "qwen2": "the converter's Qwen2 class reads a SentencePiece tokenizer.model before tokenizer.json",
}
assert set(REFUSED) <= set(SPM_VARIANTS)
CONVERTED = list(ALL_VARIANTS)   # the mixtures of experts too

# Keys only qtool writes ({arch} is general.architecture).
QTOOL_ONLY_KEYS = {
    "general.quantized_by": "qtool signs its files; the converter writes it only from a --metadata override",
    "{arch}.vocab_size": "qtool writes it for every architecture so a GGUF without a vocabulary reads back "
                         "(the converter's Llama class writes it too; llama.cpp counts the tokens otherwise)",
    "gemma2.rope.freq_base": "the converter's Gemma 2 class writes no rope key (llama.cpp's default, 10000, is "
                             "Gemma 2's rope_theta); qtool writes rope_theta for every architecture",
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


@pytest.fixture(scope="session")
def spm_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """"llama" and "gemma" -> a folder with that SentencePiece tokenizer (SPM_VOCAB pieces), each trained
    once (a tenth of a second). tokenizer_config.json lists <unk> <s> </s> in added_tokens_decoder, as
    every Llama 2, Phi-3 and Gemma repository's does (transformers 5 saves none): without it the
    converter's Phi-3 class takes them from tokenizer.json instead, as control tokens scored -1000
    (<unk> too), where its other classes and qtool keep tokenizer.model's types and scores."""
    folders = {}
    for kind in ("llama", "gemma"):
        folder = train_spm_tokenizer(tmp_path_factory.mktemp(f"spm-{kind}"), SPM_VOCAB, gemma=kind == "gemma")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {
            str(index): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": True}
            for index, text in enumerate(("<unk>", "<s>", "</s>"))}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        folders[kind] = folder
    return folders


@pytest.fixture(scope="module")
def checkpoint(arch_checkpoint, spm_tokenizers, tmp_path_factory: pytest.TempPathFactory):
    """``checkpoint(variant)`` -> the folder both converters read: SmolLM2's tokenizer, or the
    SentencePiece one for SPM_VARIANTS (built once)."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in SPM_VARIANTS:
            return arch_checkpoint(variant, VOCAB)
        if variant not in built:
            kind = "gemma" if ALL_VARIANTS[variant][0].startswith("gemma") else "llama"
            # Not named after the architecture: llama.cpp reads Phi-3 token attributes by general.name.
            built[variant] = build_checkpoint(variant, tmp_path_factory.mktemp("spm-checkpoint"),
                                              tokenizer_from=spm_tokenizers[kind], vocab_size=SPM_VOCAB)
        return built[variant]

    return get


@pytest.fixture(scope="module")
def converted(checkpoint, arch_checkpoint,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path | None, str | None]]:
    """job -> (the converter's F16 GGUF, None) or (None, its error), in one converter run: each variant,
    and each REFUSED variant with SmolLM2's tokenizer as "VARIANT/smollm2"."""
    sdist = _converter.sdist_path()
    root = tmp_path_factory.mktemp("llama-converter")
    sources = _converter.unpack(sdist, root / "llama.cpp")
    jobs = {v: (checkpoint(v), root / f"{v}.gguf") for v in CONVERTED}
    jobs.update({f"{v}/smollm2": (arch_checkpoint(v, VOCAB), root / f"{v}-smollm2.gguf") for v in REFUSED})
    errors = _converter.convert(sources, jobs, root / "convert.log")
    return {job: (None, errors[job]) if errors[job] else (jobs[job][1], None) for job in jobs}


@pytest.fixture(scope="module")
def pair(converted, checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """``pair(variant)`` -> (converter GGUF, qtool GGUF) read, each written once per module."""
    cache: dict[str, tuple[dict, dict]] = {}
    folder = tmp_path_factory.mktemp("qtool-gguf")

    def get(variant: str) -> tuple[dict, dict]:
        if variant not in cache:
            path, error = converted[variant]
            assert path is not None, f"the converter refused {variant}: {error}"
            ours = write_gguf(checkpoint(variant), "F16", folder / f"{variant}.gguf")
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
        path, error = converted[f"{variant}/smollm2"]
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
    arch = architectures.architecture({"model_type": ALL_VARIANTS[variant][0]}).name
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
