"""A ``.gguf`` file as a Source: tensors dequantized on demand, in Hugging Face layout.

Names, the config and tensor transforms are mapped back with :mod:`qtool.architectures` (one record per
architecture), and a Hugging Face tokenizer is rebuilt from the ``tokenizer.*`` metadata when asked for.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qtool import architectures, ui
from qtool.errors import CorruptFile, NotFound, Unsupported
from qtool.sources.base import Source, TensorInfo
from qtool.sources.gguf_file import GGUFFile, GGUFTensor

_FLOAT_TYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
_TORCH_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
# general.file_type values that say the model's float type (LlamaFileType ALL_F32, MOSTLY_F16, MOSTLY_BF16).
_FILE_TYPE_DTYPES = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}


def model_dtype(gguf_file: GGUFFile) -> torch.dtype:
    """The float dtype of the model a GGUF was made from: the type of its F16/BF16 tensors (the one
    with more elements), float32 for a file of F32 tensors alone, else what general.file_type says,
    else float16 (llama.cpp's converter's default; a quantized file's F32 tensors are its norms, which
    llama.cpp always writes as F32)."""
    elements: dict[torch.dtype, int] = {}
    for tensor in gguf_file.tensors:
        dtype = _FLOAT_TYPES.get(GGMLQuantizationType(tensor.type_id))
        if dtype in (torch.float16, torch.bfloat16):
            elements[dtype] = elements.get(dtype, 0) + tensor.n_elements
    if elements:
        return max(elements, key=elements.__getitem__)
    if all(GGMLQuantizationType(tensor.type_id) == GGMLQuantizationType.F32 for tensor in gguf_file.tensors):
        return torch.float32    # a float32 model: nothing narrower was ever in it
    file_type = gguf_file.metadata.get("general.file_type")
    if isinstance(file_type, int) and not isinstance(file_type, bool):
        return _FILE_TYPE_DTYPES.get(file_type, torch.float16)
    return torch.float16


def dequantize_raw(raw: np.ndarray, tensor: GGUFTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One GGUF tensor's bytes -> a torch tensor in GGUF/numpy shape (rows first), not yet HF layout.

    F16 and BF16 tensors keep their dtype; F32 and block-quantized tensors come out as ``dtype``
    (the model's, see model_dtype: a kept tensor is never written wider than the model was),
    or as float32 where a value would overflow ``dtype``.
    """
    type_id = GGMLQuantizationType(tensor.type_id)
    if type_id in _FLOAT_TYPES:
        stored = _FLOAT_TYPES[type_id]
        values = torch.from_numpy(raw.view(_TORCH_VIEW[stored]).copy())
        if stored == torch.bfloat16:
            values = values.view(torch.bfloat16)
        values = values.reshape(tensor.shape)
        return _narrowed(values, dtype) if stored == torch.float32 else values
    from gguf import quants

    if tensor.n_elements == 0:
        return torch.empty(tensor.shape, dtype=dtype)
    block_size, type_size = GGML_QUANT_SIZES[type_id]
    rows = raw.reshape(tensor.n_elements // tensor.dims[0], tensor.dims[0] // block_size * type_size)
    try:
        values = quants.dequantize(rows, type_id)
    except NotImplementedError:
        raise Unsupported(f"GGUF tensor {tensor.name!r} has type {tensor.type_name}, which qtool cannot "
                          "dequantize yet") from None
    values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(tensor.shape)
    return _narrowed(values, dtype)


def _narrowed(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``values`` as ``dtype``, unless that turns a finite value into inf (a scale times a
    level can pass float16's 65504): then float32, rather than a weight that is not the file's."""
    if dtype == values.dtype:
        return values
    narrowed = values.to(dtype)
    if bool((torch.isinf(narrowed) & torch.isfinite(values)).any()):
        return values
    return narrowed


class GGUFSource(Source):
    """Reads a Llama-family GGUF lazily; ``gguf`` exposes the parsed file (metadata, raw tensors)."""

    def __init__(self, path: str | Path, spec: str | None = None) -> None:
        path = Path(path)
        self.gguf = GGUFFile(path)
        try:
            # Rope factors the converter computed from the config: they go back into the config.
            computed = {tensor.name: dequantize_raw(self.gguf.raw(tensor), tensor, torch.float32)
                        for tensor in self.gguf.tensors if tensor.name in architectures.GGUF_ONLY_TENSORS}
            config = architectures.hf_config_from_gguf(self.gguf.metadata,
                                                       tensor_names=[t.name for t in self.gguf.tensors],
                                                       computed=computed)
            skipped = config.pop("_unused_gguf_tensors", [])
            if skipped:
                ui.warn(f"{path}: ignoring {', '.join(skipped)} (rope factors that match no scaling transformers "
                        "knows; the model is read without them)")
            self._hf_to_gguf: dict[str, GGUFTensor] = {}
            # Matrices llama.cpp stores split (DeepSeek's kv_b_proj as attn_k_b + attn_v_b): name -> pieces.
            self._pieces: dict[str, dict[int, GGUFTensor]] = {}
            for tensor in self.gguf.tensors:
                if tensor.name in architectures.GGUF_ONLY_TENSORS:
                    continue
                hf_name = architectures.gguf_to_hf_name(tensor.name, self.gguf.architecture, self.gguf.metadata)
                joined = architectures.joined_name(hf_name, config)
                if joined is not None:
                    self._pieces.setdefault(joined[0], {})[joined[1]] = tensor
                elif ".experts." in hf_name and len(tensor.dims) == (3 if hf_name.endswith(".weight") else 2):
                    # llama.cpp's merged experts (ffn_*_exps): one matrix per expert, as checkpoints store them.
                    for index, part in enumerate(_expert_slices(tensor)):
                        self._hf_to_gguf[architectures.expert_name(hf_name, index)] = part
                else:
                    self._hf_to_gguf[hf_name] = tensor
            self._joined_shapes = {name: self._joined_shape(name, pieces, config) for name, pieces in self._pieces.items()}
            self._check_shapes(config)
        except BaseException:
            self.gguf.close()
            raise
        super().__init__(spec=spec or str(path), description=str(path), config=config,
                         is_quantized=any(GGMLQuantizationType(t.type_id) not in _FLOAT_TYPES
                                          for t in self.gguf.tensors))
        self.path = path
        self.dtype = model_dtype(self.gguf)   # what dequantized and F32 tensors are handed out as
        self._tokenizer_tmp: Path | None = None

    @property
    def metadata(self) -> dict:
        """The raw GGUF metadata (key -> value), e.g. for inspect."""
        return self.gguf.metadata

    def _check_shapes(self, config: dict) -> None:
        # A header that parses can still disagree with its own metadata; catch it before a forward pass.
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        heads, kv_heads, head_dim = (config["num_attention_heads"], config["num_key_value_heads"],
                                     config["head_dim"])
        expected = {
            "model.embed_tokens.weight": (vocab, hidden),
            "lm_head.weight": (vocab, hidden),
            "model.norm.weight": (hidden,),
        }
        for hf_name, tensor in self._hf_to_gguf.items():
            want = expected.get(hf_name)
            if hf_name.endswith(".q_proj.weight"):   # DeepSeek's queries: nope + rope wide (qk_head_dim)
                want = (heads * int(config.get("qk_head_dim") or head_dim), hidden)
            elif hf_name.endswith((".k_proj.weight", ".v_proj.weight")):
                want = (kv_heads * head_dim, hidden)
            elif hf_name.endswith(".qkv_proj.weight"):   # Phi-3's fused q, k and v rows
                want = ((heads + 2 * kv_heads) * head_dim, hidden)
            if want is not None and tuple(tensor.shape) != want:
                raise CorruptFile(f"{self.gguf.path}: tensor {tensor.name!r} has shape {tuple(tensor.shape)} but the "
                                  f"metadata implies {want}; the file is inconsistent")
        if "model.embed_tokens.weight" not in self._hf_to_gguf:
            raise CorruptFile(f"{self.gguf.path}: no token_embd.weight tensor; not a complete Llama-family model")

    def _joined_shape(self, name: str, pieces: dict[int, GGUFTensor], config: dict) -> tuple[int, ...]:
        split = architectures.gguf_split(name, config)
        if split is None or sorted(pieces) != list(range(len(split.parts))):
            raise CorruptFile(f"{self.gguf.path}: {name} is stored split in {len(split.parts) if split else '?'} "
                              f"tensors, but the file has {len(pieces)} of them")
        meta = tuple(torch.empty(pieces[i].shape, device="meta") for i in range(len(pieces)))
        return tuple(split.join(meta, config).shape)

    def tensors(self) -> list[TensorInfo]:
        singles = [TensorInfo(hf_name, tuple(tensor.shape), tensor.type_name, tensor.n_bytes)
                   for hf_name, tensor in self._hf_to_gguf.items()]
        joined = [TensorInfo(name, self._joined_shapes[name], pieces[0].type_name,
                             sum(piece.n_bytes for piece in pieces.values()))
                  for name, pieces in self._pieces.items()]
        return singles + joined

    def gguf_tensor(self, name: str) -> GGUFTensor:
        """The GGUF tensor behind a Hugging Face name."""
        try:
            return self._hf_to_gguf[name]
        except KeyError:
            raise NotFound(f"{self.gguf.path} has no tensor {name!r} (GGUF name "
                           f"{_safe_gguf_name(name, self.config)!r})") from None

    def load(self, name: str) -> torch.Tensor:
        if name in self._pieces:
            pieces = self._pieces[name]
            values = tuple(dequantize_raw(self.gguf.raw(pieces[i]), pieces[i], self.dtype) for i in range(len(pieces)))
            widest = functools.reduce(torch.promote_types, (v.dtype for v in values))
            return architectures.gguf_split(name, self.config).join(tuple(v.to(widest) for v in values), self.config)
        tensor = self.gguf_tensor(name)
        values = dequantize_raw(self.gguf.raw(tensor), tensor, self.dtype)
        return architectures.from_gguf(name, values, self.config)

    def tokenizer_dir(self) -> Path | None:
        if self._tokenizer_tmp is None:
            if "tokenizer.ggml.tokens" not in self.gguf.metadata:
                return None
            folder = Path(tempfile.mkdtemp(prefix="qtool-gguf-tokenizer-"))
            try:
                write_tokenizer(self.gguf, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            self._tokenizer_tmp = folder
        return self._tokenizer_tmp

    def extra_files(self) -> dict[str, Path]:
        return {}

    def local_paths(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self.gguf.close()
        if self._tokenizer_tmp is not None:
            shutil.rmtree(self._tokenizer_tmp, ignore_errors=True)
            self._tokenizer_tmp = None


def _expert_slices(tensor: GGUFTensor) -> list[GGUFTensor]:
    """A merged experts tensor (3-D matrices, 2-D biases; experts last in GGML order) as one tensor per
    expert: each expert's rows are a contiguous run of the tensor's bytes (GGML quantizes along rows)."""
    experts = tensor.dims[-1]
    if experts <= 0 or tensor.n_bytes % experts:
        raise CorruptFile(f"GGUF tensor {tensor.name!r}: {tensor.n_bytes} bytes do not split into {experts} experts")
    size = tensor.n_bytes // experts
    return [dataclasses.replace(tensor, name=f"{tensor.name}[{index}]", dims=tensor.dims[:-1],
                                offset=tensor.offset + index * size, n_bytes=size) for index in range(experts)]


def _safe_gguf_name(name: str, config: dict) -> str:
    try:
        return architectures.hf_to_gguf_name(name, architectures.model_type_of(config))
    except Unsupported:
        return "?"


def _set_pre_tokenizer(tokenizer: Any, pre: Any) -> None:
    """transformers' GGUF conversion uses plain GPT-2 splitting; llama.cpp's `smollm` pre-tokenizer
    also splits numbers into single digits (as SmolLM's own tokenizer.json does)."""
    if pre != "smollm":
        return
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])


def write_tokenizer(gguf_file: GGUFFile, folder: Path) -> None:
    """Rebuild a Hugging Face tokenizer from GGUF metadata into ``folder`` (save_pretrained layout).

    transformers converts the ``tokenizer.ggml.*`` arrays; we then set the special tokens and
    BOS/EOS insertion exactly as the GGUF says, since llama.cpp follows those keys when it tokenizes.
    """
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    metadata = gguf_file.metadata
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.path.parent), gguf_file=gguf_file.path.name)
    except Exception as exc:  # noqa: BLE001 - transformers raises bare ValueErrors for vocabularies it cannot convert
        raise Unsupported(f"{gguf_file.path}: cannot rebuild a tokenizer from this GGUF "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _set_pre_tokenizer(tokenizer, metadata.get("tokenizer.ggml.pre"))
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            return tokens[token_id]
        return None

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    for attribute, value in special.items():
        if value is not None:
            setattr(tokenizer, attribute, value)
    chat_template = metadata.get("tokenizer.chat_template")
    if isinstance(chat_template, str):
        tokenizer.chat_template = chat_template
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and special["bos_token"] is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    if hasattr(type(tokenizer), "update_post_processor"):
        tokenizer.add_bos_token = add_bos
        tokenizer.add_eos_token = add_eos
    tokenizer.save_pretrained(str(folder))
    # Record the BOS/EOS choice in tokenizer_config.json too, for loaders that read it from there.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = add_bos
    config["add_eos_token"] = add_eos
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
