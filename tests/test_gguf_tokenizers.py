"""Acceptance: a GGUF tokenizer qtool writes makes llama.cpp tokenize exactly like transformers.

Both families llama.cpp reads, each trained here (tokenizers library, small vocabularies) on the shared
calibration text and saved as a transformers PreTrainedTokenizerFast beside a tiny random Llama:

- ``gpt2`` (byte-level BPE): GPT-2's ByteLevel regex (llama.cpp's ``gpt-2`` pre-tokenizer) and
  Llama 3's Split regex before a regex-less ByteLevel (``llama-bpe``, BOS added by the post-processor);
- ``llama`` (SentencePiece-style BPE with byte fallback, "▁" for spaces, no tokenizer.model): the
  legacy Llama layout (Prepend + Replace normalizers, BOS), Metaspace without a prefix (Gemma-like, no
  BOS: llama.cpp's own default would add one) and Metaspace ``first`` (transformers' Llama layout,
  BOS and EOS from tokenizer_config.json), whose one difference from llama.cpp is pinned down exactly.

Each is converted by qtool, loaded in llama.cpp (llama-cpp-python, vocab only) and must give the same
token ids as transformers for a wikitext slice and edge cases (spaces, newlines, digits, punctuation,
non-ASCII and emoji through byte fallback), without and with special tokens. Tokenizer kinds llama.cpp
cannot reproduce must be refused with a one-line Unsupported.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtool import ui
from qtool.errors import Unsupported
from qtool.gguf_tokenizer import tokenizer_metadata

from tests._architectures import build_checkpoint
from tests._gguf_helpers import CALIBRATION_TEXT, WIKITEXT, write_gguf

SPACE = "\u2581"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
EDGE_CASES = [
    " leading space", "   three leading spaces", "two  spaces   three    four", "trailing space ",
    "\nnewline first\n\nthen two\n\n\nthen three\n", " \n \t\t tabs and\r\nCRLF", "\t",
    "12345 3.14 1,000,000 007 2024-05-01 33333333", "Hello, world!?... (x) [y] {z} 'quote' \"dq\" ``` ---=== $5 & 50%",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "naïve café Ünïcödé Ærøskøbing ß", "日本語のテキスト 我想在apple工作1314151天～ нещо на Български",
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙", "x", " ", "",
]
# variant -> (family, expected tokenizer.ggml.pre, whether transformers adds BOS / EOS)
VARIANTS = {
    "gpt2-bytelevel": ("gpt2", "gpt-2", False, False),
    "gpt2-llama3-split": ("gpt2", "llama-bpe", True, False),
    "llama-legacy-prepend": ("llama", "default", True, False),
    "llama-metaspace-never": ("llama", "default", False, False),
    "llama-metaspace-first": ("llama", "default", True, True),
}
TRAIN_CHARS = 300_000
VOCAB = 1500


@pytest.fixture(scope="module")
def training_lines() -> list[str]:
    if not CALIBRATION_TEXT.is_file():
        pytest.skip(f"{CALIBRATION_TEXT} is absent")
    return CALIBRATION_TEXT.read_text(encoding="utf-8")[:TRAIN_CHARS].splitlines()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is absent")
    wikitext = WIKITEXT.read_text(encoding="utf-8")
    # The second slice starts with no space (texts that do are the Metaspace-first variant's one difference).
    return [wikitext[:20_000], wikitext[20_000:40_000].lstrip(" "), *EDGE_CASES]


def _byte_level(lines: list[str], variant: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    if variant == "gpt2-bytelevel":
        specials = ["<|endoftext|>"]
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:   # Llama 3: its Split regex, then a ByteLevel without its own
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert len(json.loads(tokenizer.to_str())["model"]["merges"]) > VOCAB // 2
    if variant == "gpt2-bytelevel":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        return tokenizer, dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)])
    return tokenizer, dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def _sentencepiece_style(lines: list[str], variant: str):
    """Llama 2's layout: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then the trained pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    # A small alphabet, so most of the vocabulary is merges; other characters take the byte fallback.
    trained.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=VOCAB - 259, limit_alphabet=150,
                                                           show_progress=False))
    model = json.loads(trained.to_str())["model"]
    assert len(model["merges"]) > VOCAB // 2
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for text, _ in sorted(model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(text, len(vocab))
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if variant == "llama-legacy-prepend":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    else:
        scheme = "never" if variant == "llama-metaspace-never" else "first"
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([] if variant == "llama-metaspace-never"
                                                   else [decoders.Strip(" ", 1, 0)]))
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if variant == "llama-legacy-prepend":
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                                 special_tokens=[("<s>", 1)])
    elif variant == "llama-metaspace-first":   # BOS and EOS from tokenizer_config.json, no post-processor
        specials.update(add_bos_token=True, add_eos_token=True)
    return tokenizer, specials


@pytest.fixture(scope="module")
def convert(training_lines, tmp_path_factory):
    """variant -> (variant, transformers tokenizer, llama.cpp vocab-only model, GGUF metadata, qtool's
    warnings), each built once."""
    import llama_cpp
    from gguf import GGUFReader
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    built: dict[str, tuple] = {}

    def get(variant: str) -> tuple:
        if variant in built:
            return built[variant]
        folder = tmp_path_factory.mktemp(variant)
        build = _byte_level if VARIANTS[variant][0] == "gpt2" else _sentencepiece_style
        tokenizer, specials = build(training_lines, variant)
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials).save_pretrained(folder / "tokenizer")
        size = len(AutoTokenizer.from_pretrained(folder / "tokenizer"))
        checkpoint = build_checkpoint("llama", folder / "model", tokenizer_from=folder / "tokenizer", vocab_size=size)
        assert not (checkpoint / "tokenizer.model").exists()
        warnings: list[str] = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ui, "warn", warnings.append)
            path = write_gguf(checkpoint, "F16", folder / "model.gguf")
        skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
        metadata = {name: field.contents() for name, field in GGUFReader(path).fields.items()
                    if name.startswith("tokenizer.") and name not in skip}
        runtime = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        built[variant] = (variant, AutoTokenizer.from_pretrained(checkpoint), runtime, metadata, warnings)
        return built[variant]

    yield get
    for entry in built.values():
        entry[2].close()


@pytest.fixture(params=list(VARIANTS))
def converted(request, convert):
    return convert(request.param)


def test_metadata_names_the_family_and_pre_tokenizer(converted):
    variant, hf, runtime, metadata, warnings = converted
    family, pre, _, _ = VARIANTS[variant]
    assert metadata["tokenizer.ggml.model"] == family and runtime.metadata["tokenizer.ggml.model"] == family
    assert metadata["tokenizer.ggml.pre"] == pre
    assert runtime.n_vocab() == len(hf)
    if family == "llama":
        assert metadata["tokenizer.ggml.add_space_prefix"] is (variant != "llama-metaspace-never")
    if variant == "llama-metaspace-first":   # the one difference (see the test below) is reported
        assert len(warnings) == 1 and "starts with a space" in warnings[0]
    else:
        assert warnings == []


def test_llamacpp_tokenizes_like_transformers(converted, texts):
    variant, hf, runtime, _, _ = converted
    compared = 0
    for text in texts:
        if variant == "llama-metaspace-first" and text.startswith(" "):
            continue   # see test_metaspace_first_leading_space_difference
        expected = hf(text, add_special_tokens=False).input_ids
        got = runtime.tokenize(text.encode(), add_bos=False, special=False)
        assert got == expected, (variant, text[:60], _first_difference(hf, expected, got))
        compared += len(expected)
    assert compared > 3000


def test_bos_and_eos_are_added_like_transformers(converted, texts):
    variant, hf, runtime, metadata, _ = converted
    _, _, adds_bos, adds_eos = VARIANTS[variant]
    plain = hf("some text", add_special_tokens=False).input_ids
    full = hf("some text").input_ids
    assert (full[:1] == [hf.bos_token_id]) is adds_bos and (full[-1:] == [hf.eos_token_id]) is adds_eos
    assert len(full) == len(plain) + adds_bos + adds_eos
    assert metadata["tokenizer.ggml.add_bos_token"] is adds_bos and runtime._model.add_bos_token() is adds_bos
    assert metadata["tokenizer.ggml.add_eos_token"] is adds_eos and runtime._model.add_eos_token() is adds_eos
    assert metadata["tokenizer.ggml.bos_token_id"] == hf.bos_token_id
    assert metadata["tokenizer.ggml.eos_token_id"] == hf.eos_token_id
    for text in texts:
        if variant == "llama-metaspace-first" and text.startswith(" "):
            continue
        # llama-cpp-python's add_bos=True is llama.cpp's add_special: BOS/EOS as the GGUF says.
        assert runtime.tokenize(text.encode(), add_bos=True, special=False) == hf(text).input_ids, (variant, text[:60])


def test_metaspace_first_leading_space_difference(convert, texts):
    """transformers' Metaspace prepends no "▁" to text that starts with a space, llama.cpp always does:
    llama.cpp's ids for such a text are transformers' for the text with one more leading space."""
    _, hf, runtime, _, _ = convert("llama-metaspace-first")
    leading = [text for text in texts if text.startswith(" ")]
    assert len(leading) >= 3
    for text in leading:
        got = runtime.tokenize(text.encode(), add_bos=False, special=False)
        assert got != hf(text, add_special_tokens=False).input_ids
        assert got == hf(" " + text, add_special_tokens=False).input_ids, text[:60]


def _first_difference(hf, expected: list[int], got: list[int]) -> str:
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return (f"first difference at token {index}: transformers {hf.convert_ids_to_tokens(expected[index:index + 4])}, "
            f"llama.cpp {hf.convert_ids_to_tokens(got[index:index + 4])} ({len(expected)} vs {len(got)} tokens)")


# Tokenizer kinds llama.cpp has no faithful tokenizer for: refused before anything is written.

def _save(folder: Path, tokenizer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _unigram():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.Unigram([("<unk>", 0.0), (SPACE, -1.0), ("a", -2.0), ("b", -2.0), (SPACE + "ab", -3.0)],
                                         unk_id=0, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    return tokenizer


def _wordpiece():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def _bpe(byte_fallback: bool, byte_tokens: int, metaspace: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"<0x{byte:02X}>": 1 + byte for byte in range(byte_tokens)}}
    vocab.update({text: len(vocab) + i for i, text in enumerate([SPACE, "a", "b", SPACE + "a"])})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[(SPACE, "a")], unk_token="<unk>", byte_fallback=byte_fallback))
    tokenizer.pre_tokenizer = (pre_tokenizers.Metaspace() if metaspace else pre_tokenizers.Whitespace())
    return tokenizer


@pytest.mark.parametrize(("name", "make", "message"), [
    ("unigram", _unigram, "Unigram"),
    ("wordpiece", _wordpiece, "WordPiece"),
    ("no-byte-fallback", lambda: _bpe(False, 256), "byte-fallback"),
    ("missing-byte-tokens", lambda: _bpe(True, 200), "lacks 56 of the 256 byte tokens"),
    ("no-metaspace", lambda: _bpe(True, 256, metaspace=False), "▁"),
])
def test_tokenizers_llamacpp_cannot_reproduce_are_refused(name, make, message, tmp_path):
    folder = _save(tmp_path / name, make())
    with pytest.raises(Unsupported, match=message) as caught:
        tokenizer_metadata(folder, {})
    assert "\n" not in caught.value.message and str(folder / "tokenizer.json") in caught.value.message
