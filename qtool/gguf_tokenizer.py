"""Hugging Face tokenizer files -> the ``tokenizer.*`` metadata llama.cpp reads from a GGUF.

Two families, as llama.cpp's converter writes them:

- ``gpt2``: byte-level BPE (tokenizer.json with a ByteLevel pre-tokenizer): tokens by id, token
  types, merges, and ``tokenizer.ggml.pre``, the name llama.cpp uses to pick its pre-tokenizer
  regex, recognised (as the converter does) from the token ids of a fixed probe text, else from the
  pre-tokenizer itself where it is one llama.cpp implements (GPT-2's, SmolLM's, Llama 3's, Qwen2's);
- ``llama``: SentencePiece, from tokenizer.model (pieces, scores and piece types), or from a
  tokenizer.json BPE with byte fallback and "▁" for spaces (transformers' Llama / Gemma layout).
  llama.cpp merges the adjacent pair whose result scores highest, so there each token's score is
  minus the rank of the merge that makes it: the order transformers applies the merges in.

Special token ids and the chat template come from gguf-py's ``SpecialVocab``, the same reader the
converter uses. With a tokenizer.json, add_bos/add_eos are always written, as transformers decides
them (tokenizer_config.json's add_bos_token/add_eos_token, else the post-processor): llama.cpp's
defaults for a missing key differ by tokenizer (true for ``llama`` and ``llama-bpe``).

Other tokenizer.json models (Unigram, WordPiece, BPE without byte-level or byte fallback) are
Unsupported: llama.cpp's tokenizers for them would not split text as transformers does.
"""
from __future__ import annotations

import re
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
# from the converter; a tokenizer not listed is recognised from its pre-tokenizer, else gets
# "default" and a warning).
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
# The Split regexes of Llama 3's and Qwen2's tokenizer.json, whose llama.cpp pre-tokenizers
# (llama-bpe, qwen2) implement them (src/llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPACE = "\u2581"   # SentencePiece's "▁", which stands for a space in its pieces
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


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
            metadata.update(_special_tokens(tokenizer_dir, len(metadata["tokenizer.ggml.tokens"]),
                                            load_merges=False))
        elif (tokenizer_dir / "tokenizer.json").is_file():
            spec = _load_json(tokenizer_dir / "tokenizer.json")
            # The tokenizers library reads tokenizer.json directly; transformers would cost seconds of imports.
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
            if _is_byte_level(spec):
                metadata = _bpe_vocab(tokenizer_dir, spec, tokenizer, vocab_size)
            else:
                metadata = _llama_hf_vocab(tokenizer_dir, spec, tokenizer, vocab_size)
            metadata.update(_special_tokens(tokenizer_dir, len(metadata["tokenizer.ggml.tokens"]),
                                            load_merges=metadata["tokenizer.ggml.model"] == "gpt2"))
            metadata.update(_added_bos_eos(tokenizer_dir, tokenizer, metadata))
        else:
            return {}
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


def _steps(node: Any) -> list[dict]:
    """A normalizer or pre-tokenizer of tokenizer.json as the list of its steps (Sequences flattened)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [step for child in node.get("normalizers") or node.get("pretokenizers") or []
                for step in _steps(child)]
    return [node]


def _hf_tokens(tokenizer_dir: Path, spec: dict, tokenizer: Any, size: int, *,
               byte_level: bool) -> tuple[list[str], list[int]]:
    """Token texts and types by id, ``size`` of them (ids the tokenizer lacks become unused padding)."""
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    by_id = {index: text for text, index in vocab.items()}
    added = {token["content"]: token for token in spec.get("added_tokens") or []}
    config_path = tokenizer_dir / "tokenizer_config.json"
    if config_path.is_file():   # tokenizer_config.json's view of the added tokens wins, as in transformers
        for token in (_load_json(config_path).get("added_tokens_decoder") or {}).values():
            if isinstance(token, dict) and "content" in token:
                added[token["content"]] = {**added.get(token["content"], {}), **token}
    unk = (spec.get("model") or {}).get("unk_token")
    tokens: list[str] = []
    types: list[int] = []
    for index in range(size):
        text = by_id.get(index)
        if text is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif text in added:
            token = added[text]
            if byte_level and not token.get("normalized", True):
                # llama.cpp expects control/user-defined tokens pre-normalized, as the converter does.
                ids = tokenizer.encode(text, add_special_tokens=False).ids
                text = tokenizer.decode(ids, skip_special_tokens=False)
            if token.get("special") or _looks_special(text):
                types.append(CONTROL)
            else:
                text = text.replace(_SPACE, " ")
                types.append(USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            if not byte_level and _BYTE_TOKEN.fullmatch(text):
                types.append(BYTE)
            elif not byte_level and text == unk:
                types.append(UNKNOWN)
            else:
                types.append(NORMAL)
    return tokens, types


def _vocab_size(tokenizer: Any, vocab_size: int | None) -> int:
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    return max(vocab_size or 0, max(vocab.values()) + 1)


def _bpe_vocab(tokenizer_dir: Path, spec: dict, tokenizer: Any, vocab_size: int | None) -> dict[str, Any]:
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise Unsupported(f"{tokenizer_dir / 'tokenizer.json'}: a byte-level {clip(model.get('type'), 40)} "
                          "tokenizer cannot be written to GGUF; qtool writes byte-level BPE (gpt2-style) and "
                          "SentencePiece-style tokenizers")
    tokens, types = _hf_tokens(tokenizer_dir, spec, tokenizer, _vocab_size(tokenizer, vocab_size), byte_level=True)
    probe = sha256(str(tokenizer.encode(_PROBE_TEXT).ids).encode()).hexdigest()
    pre = _PRE_TOKENIZERS.get(probe) or _pre_tokenizer_by_structure(spec)
    if pre is None:
        ui.warn(f"{tokenizer_dir}: BPE pre-tokenizer not recognised (probe hash {probe[:12]}...); "
                "writing tokenizer.ggml.pre = default, which may tokenize differently in llama.cpp")
        pre = "default"
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


def _pre_tokenizer_by_structure(spec: dict) -> str | None:
    """The llama.cpp pre-tokenizer that splits text exactly as this tokenizer.json does, if there is one.

    GPT-2's ByteLevel regex is llama.cpp's gpt-2; with single digits split first, smollm; Llama 3's and
    Qwen2's Split regexes before a ByteLevel without its own regex, llama-bpe and qwen2. A ByteLevel
    that adds a prefix space matches none: llama.cpp never adds one to a BPE tokenizer's text.
    """
    steps = _steps(spec.get("pre_tokenizer"))
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space", True):
        return None
    own_regex = steps[-1].get("use_regex", True)
    before = steps[:-1]
    normalizer = spec.get("normalizer")
    if own_regex and normalizer is None:
        if not before:
            return "gpt-2"
        if (len(before) == 1 and before[0].get("type") == "Digits"
                and before[0].get("individual_digits") is True):
            return "smollm"
        return None
    if (own_regex or len(before) != 1 or before[0].get("type") != "Split"
            or before[0].get("behavior") != "Isolated" or before[0].get("invert")):
        return None
    pattern = (before[0].get("pattern") or {}).get("Regex")
    if pattern == _LLAMA3_SPLIT and normalizer is None:
        return "llama-bpe"
    if pattern == _QWEN2_SPLIT and (normalizer is None or normalizer.get("type") == "NFC"):
        return "qwen2"
    return None


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


def _llama_hf_vocab(tokenizer_dir: Path, spec: dict, tokenizer: Any, vocab_size: int | None) -> dict[str, Any]:
    """A SentencePiece-style tokenizer.json (BPE, byte fallback, "▁" for spaces) as llama.cpp's ``llama``.

    llama.cpp's SentencePiece tokenizer merges, over and over, the adjacent pair whose concatenation is
    the best-scoring token (leftmost first on ties); transformers' BPE applies the lowest-ranked merge
    (leftmost first). Scoring each token by minus the rank of the first merge that makes it gives the
    same order; tokens no merge makes score below all of them.
    """
    path = tokenizer_dir / "tokenizer.json"
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise Unsupported(f"{path}: a {clip(kind, 40)} tokenizer cannot be written to GGUF (llama.cpp would split "
                          "text differently from transformers); qtool writes byte-level BPE (gpt2-style) and "
                          "SentencePiece-style BPE tokenizers")
    if not model.get("byte_fallback"):
        raise Unsupported(f"{path}: a BPE tokenizer that is neither byte-level nor byte-fallback cannot be "
                          "written to GGUF (llama.cpp needs byte tokens for text the vocabulary lacks)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise Unsupported(f"{path}: a BPE tokenizer with a subword prefix or word suffix cannot be written "
                          "to GGUF (llama.cpp's tokenizers have neither)")
    tokens, types = _hf_tokens(tokenizer_dir, spec, tokenizer, _vocab_size(tokenizer, vocab_size), byte_level=False)
    missing = 256 - sum(1 for token_type in types if token_type == BYTE)
    if missing:
        raise Unsupported(f"{path}: this byte-fallback tokenizer lacks {missing} of the 256 byte tokens "
                          "<0x00>..<0xFF>; llama.cpp cannot tokenize text that needs them")
    add_space_prefix, differences = _space_handling(path, spec, tokens)
    if differences:
        ui.warn(f"{tokenizer_dir}: llama.cpp will tokenize some text differently from transformers: "
                + "; ".join(differences))
    ranks: dict[str, int] = {}
    merges = model.get("merges") or []
    for rank, merge in enumerate(merges):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        ranks.setdefault(left + right, rank)
    unmerged = -float(len(merges) + 1)
    scores = [-float(ranks[text]) if types[index] in (NORMAL, USER_DEFINED) and text in ranks else unmerged
              for index, text in enumerate(tokens)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.add_space_prefix": add_space_prefix}


def _space_handling(path: Path, spec: dict, tokens: list[str]) -> tuple[bool, list[str]]:
    """(whether a "▁" is prepended to the text, the steps llama.cpp does not do) for a SentencePiece-style
    tokenizer.json. llama.cpp replaces spaces by "▁" and, with add_space_prefix, prepends one."""
    escapes = prepends = False
    differences: list[str] = []
    for step in _steps(spec.get("normalizer")):
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == _SPACE:
            prepends = True
        elif kind == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == _SPACE:
            escapes = True
        else:
            differences.append(f"it has no {clip(kind, 40)} normalizer")
    for step in _steps(spec.get("pre_tokenizer")):
        kind = step.get("type")
        if kind == "Metaspace" and step.get("replacement", _SPACE) == _SPACE:
            escapes = True
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            if scheme != "never" and not prepends:
                prepends = True
                # Metaspace prepends its "▁" only to text that does not start with one; llama.cpp's
                # add_space_prefix (SentencePiece's add_dummy_prefix) always prepends.
                differences.append("text that starts with a space gets one more \"▁\" (Metaspace adds none there)")
            # Splitting at each "▁" changes nothing unless a token has one after its start.
            if step.get("split", True) and any(_SPACE in token[1:] for token in tokens):
                differences.append("it does not split the text at each \"▁\" (Metaspace split)")
        else:
            differences.append(f"it has no {clip(kind, 40)} pre-tokenizer")
    if not escapes:
        raise Unsupported(f"{path}: a BPE tokenizer that neither is byte-level nor writes spaces as \"▁\" "
                          "(Metaspace) cannot be written to GGUF; llama.cpp has no tokenizer for it")
    return prepends, differences


def _added_bos_eos(tokenizer_dir: Path, tokenizer: Any, metadata: dict[str, Any]) -> dict[str, bool]:
    """add_bos/add_eos as transformers does: tokenizer_config.json's add_bos_token/add_eos_token where it
    sets them, else what tokenizer.json's post-processor adds."""
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = _load_json(config_path) if config_path.is_file() else {}
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    added = len(full) > len(plain)
    result = {}
    for kind, position in (("bos", 0), ("eos", -1)):
        token_id = metadata.get(f"tokenizer.ggml.{kind}_token_id")
        explicit = config.get(f"add_{kind}_token")
        if isinstance(explicit, bool):
            value = explicit and token_id is not None
        else:
            value = added and token_id is not None and full[position] == token_id
        result[f"tokenizer.ggml.add_{kind}_token"] = value
    return result


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
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}
    # llama.cpp prepends a space (add_space_prefix, true when absent) as SentencePiece's add_dummy_prefix
    # does: a model without it (Gemma's) says so, as the converter's Gemma classes write.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    if not proto.normalizer_spec.add_dummy_prefix:
        metadata["tokenizer.ggml.add_space_prefix"] = False
    return metadata


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
