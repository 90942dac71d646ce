"""Hugging Face tokenizer files -> the ``tokenizer.*`` metadata llama.cpp reads from a GGUF.

Two families, as llama.cpp's converter writes them:

- ``gpt2``: byte-level BPE (tokenizer.json with a ByteLevel pre-tokenizer): tokens by id, token
  types, merges, and ``tokenizer.ggml.pre``, the name llama.cpp uses to pick its pre-tokenizer
  regex, recognised (as the converter does) from the token ids of a fixed probe text;
- ``llama``: SentencePiece (tokenizer.model): pieces, scores and piece types.

Special token ids, add_bos/add_eos and the chat template come from gguf-py's ``SpecialVocab``,
the same reader the converter uses.
"""
from __future__ import annotations

from hashlib import sha256
from pathlib import Path
from typing import Any

from qtool import ui
from qtool.errors import CorruptFile, QtoolError, Unsupported
from qtool.sources.jsonfile import clip, load_json

# llama.cpp's token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The probe text of llama.cpp's convert_hf_to_gguf.py get_vocab_base_pre(): the sha256 of the
# str() of its token ids names the pre-tokenizer. A few common entries of its table (facts copied
# from the converter; a tokenizer not listed gets "default" and a warning).
_PROBE_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis '
               'concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 '
               'កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
               '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? '
               '\'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
}


def tokenizer_metadata(tokenizer_dir: Path | None, config: dict) -> dict[str, Any]:
    """GGUF key -> value for the tokenizer in ``tokenizer_dir`` (empty when there is none).

    Lists of str/int/float become STRING/INT32/FLOAT32 arrays, ints UINT32, as the converter writes.
    """
    if tokenizer_dir is None:
        return {}
    tokenizer_dir = Path(tokenizer_dir)
    vocab_size = config.get("vocab_size")
    vocab_size = vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else None
    try:
        if (tokenizer_dir / "tokenizer.model").is_file():
            metadata = _sentencepiece_vocab(tokenizer_dir, vocab_size)
        elif (tokenizer_dir / "tokenizer.json").is_file():
            metadata = _bpe_vocab(tokenizer_dir, vocab_size)
        else:
            return {}
        metadata.update(_special_tokens(tokenizer_dir, len(metadata["tokenizer.ggml.tokens"]),
                                        load_merges=metadata["tokenizer.ggml.model"] == "gpt2"))
    except QtoolError:
        raise
    except Exception as exc:   # noqa: BLE001 - any file anyone wrote: a value of the wrong shape or type
        raise CorruptFile(f"{tokenizer_dir}: the tokenizer files do not make sense "
                          f"({type(exc).__name__}: {clip(str(exc))}); re-download them") from None
    return metadata


def _load_json(path: Path) -> dict:
    return load_json(path, "tokenizer file")


def _looks_special(text: str) -> bool:
    # The converter's does_token_look_special: added tokens that ought to be control tokens.
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _bpe_vocab(tokenizer_dir: Path, vocab_size: int | None) -> dict[str, Any]:
    spec = _load_json(tokenizer_dir / "tokenizer.json")
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(spec):
        raise Unsupported(f"{tokenizer_dir / 'tokenizer.json'}: only byte-level BPE (gpt2-style) tokenizer.json "
                          "files or SentencePiece tokenizer.model files can be written to GGUF")
    # The tokenizers library reads tokenizer.json directly; transformers would cost seconds of imports.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    size = max(vocab_size or 0, max(vocab.values()) + 1)
    by_id = {index: text for text, index in vocab.items()}
    added = {token["content"]: token for token in spec.get("added_tokens") or []}
    config_path = tokenizer_dir / "tokenizer_config.json"
    if config_path.is_file():   # tokenizer_config.json's view of the added tokens wins, as in transformers
        for token in (_load_json(config_path).get("added_tokens_decoder") or {}).values():
            if isinstance(token, dict) and "content" in token:
                added[token["content"]] = {**added.get(token["content"], {}), **token}
    tokens: list[str] = []
    types: list[int] = []
    for index in range(size):
        text = by_id.get(index)
        if text is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif text in added:
            token = added[text]
            if not token.get("normalized", True):
                # llama.cpp expects control/user-defined tokens pre-normalized, as the converter does.
                ids = tokenizer.encode(text, add_special_tokens=False).ids
                text = tokenizer.decode(ids, skip_special_tokens=False)
            if token.get("special") or _looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(NORMAL)
    probe = sha256(str(tokenizer.encode(_PROBE_TEXT).ids).encode()).hexdigest()
    pre = _PRE_TOKENIZERS.get(probe)
    if pre is None:
        ui.warn(f"{tokenizer_dir}: BPE pre-tokenizer not recognised (probe hash {probe[:12]}...); "
                "writing tokenizer.ggml.pre = default, which may tokenize differently in llama.cpp")
        pre = "default"
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


def _is_byte_level(spec: dict) -> bool:
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            return any(walk(value) for value in node.values())
        if isinstance(node, list):
            return any(walk(value) for value in node)
        return False

    return walk(spec.get("pre_tokenizer")) or walk(spec.get("decoder"))


def _sentencepiece_vocab(tokenizer_dir: Path, vocab_size: int | None) -> dict[str, Any]:
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    try:
        processor.LoadFromFile(str(tokenizer_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as exc:
        raise CorruptFile(f"{tokenizer_dir / 'tokenizer.model'} is not a SentencePiece model ({exc})") from None
    size = vocab_size or processor.vocab_size()
    tokens = [f"[PAD{i}]" for i in range(size)]
    scores = [-10000.0] * size
    types = [UNUSED] * size
    for index in range(min(size, processor.vocab_size())):
        tokens[index] = processor.IdToPiece(index)
        scores[index] = float(processor.GetScore(index))
        if processor.IsUnknown(index):
            types[index] = UNKNOWN
        elif processor.IsControl(index):
            types[index] = CONTROL
        elif processor.IsUnused(index):
            types[index] = UNUSED
        elif processor.IsByte(index):
            types[index] = BYTE
        else:
            types[index] = NORMAL
    if (tokenizer_dir / "added_tokens.json").is_file():
        for text, index in _load_json(tokenizer_dir / "added_tokens.json").items():
            if int(index) < size:
                tokens[int(index)], scores[int(index)], types[int(index)] = text, -1000.0, USER_DEFINED
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        decoder = _load_json(tokenizer_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
        for key, data in decoder.items():
            index = int(key)
            if index >= size:
                continue
            text = data["content"]
            if data.get("special") or _looks_special(text):
                types[index] = CONTROL
            else:
                text = text.replace("\u2581", " ")
                types[index] = USER_DEFINED
            tokens[index], scores[index] = text, -1000.0
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}


def _special_tokens(tokenizer_dir: Path, n_vocab: int, *, load_merges: bool) -> dict[str, Any]:
    from gguf import SpecialVocab

    special = SpecialVocab(tokenizer_dir, load_merges=load_merges, n_vocab=n_vocab)
    metadata: dict[str, Any] = {}
    if special.merges:
        metadata["tokenizer.ggml.merges"] = list(special.merges)
    for kind, token_id in special.special_token_ids.items():
        if kind == "cls":   # llama.cpp has no key for it
            continue
        key = "padding" if kind == "pad" else "unknown" if kind == "unk" else "seperator" if kind == "sep" else kind
        metadata[f"tokenizer.ggml.{key}_token_id"] = int(token_id)
    for kind, value in special.add_special_token.items():
        metadata[f"tokenizer.ggml.add_{kind}_token"] = bool(value)
    template = special.chat_template
    if template is None and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, str):
        metadata["tokenizer.chat_template"] = template
    elif template:
        # A list of named templates: the default one is the plain key, the others get their name.
        for entry in template:
            name = entry.get("name")
            key = "tokenizer.chat_template" if name in (None, "default") else f"tokenizer.chat_template.{name}"
            metadata[key] = entry.get("template", "")
    return metadata
