"""Llama-family GGUF <-> Hugging Face mapping, in both directions.

The GGUF source reads with it and the GGUF sink writes with it, so the two stay in step:
tensor names, the q/k row permutation llama.cpp applies, and config.json <-> ``{arch}.*``
metadata keys (the key names are those of llama.cpp's ``convert_hf_to_gguf.py`` / gguf-py
``constants.Keys``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the permutations only call tensor methods; inspect stays free of torch
    import torch

from qtool.errors import CorruptFile, Unsupported

# Hugging Face model_type -> (GGUF architecture, whether llama.cpp permutes q/k rows).
# llama.cpp converts Mistral checkpoints with its Llama converter (``general.architecture =
# llama``, q/k permuted); Qwen2 keeps the Hugging Face row order and has q/k/v biases.
_HF_TO_ARCH: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
}
# GGUF architecture -> (Hugging Face model_type, architectures entry, q/k permuted).
_ARCH_TO_HF: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "mistral": ("mistral", "MistralForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_HF_TO_ARCH)
SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(_ARCH_TO_HF)

# Tensors outside the decoder blocks.
_GLOBAL_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per-block tensor stems, GGUF ``blk.N.<stem>`` <-> HF ``model.layers.N.<stem>``.
_BLOCK_STEMS: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES_REV = {hf: gg for gg, hf in _GLOBAL_NAMES.items()}
_BLOCK_STEMS_REV = {hf: gg for gg, hf in _BLOCK_STEMS.items()}
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.([a-z_]+\.[a-z_]+|[a-z_]+)\.(weight|bias)$")

# GGUF tensors that have no Hugging Face counterpart (llama 3.1 rope frequency factors).
GGUF_ONLY_TENSORS: frozenset[str] = frozenset({"rope_freqs.weight"})


def hf_to_gguf_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``; Unsupported if unknown."""
    if name in _GLOBAL_NAMES_REV:
        return _GLOBAL_NAMES_REV[name]
    match = _HF_BLOCK_RE.match(name)
    if match and match.group(2) in _BLOCK_STEMS_REV:
        return f"blk.{match.group(1)}.{_BLOCK_STEMS_REV[match.group(2)]}.{match.group(3)}"
    raise Unsupported(f"tensor {name!r} has no GGUF name in the Llama layout; only Llama-family checkpoints "
                      f"({', '.join(SUPPORTED_ARCHITECTURES)}) can be written as GGUF")


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; Unsupported if unknown."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _GGUF_BLOCK_RE.match(name)
    if match and match.group(2) in _BLOCK_STEMS:
        return f"model.layers.{match.group(1)}.{_BLOCK_STEMS[match.group(2)]}.{match.group(3)}"
    raise Unsupported(f"GGUF tensor {name!r} is not part of the Llama layout qtool reads "
                      f"({', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face q/k rows -> llama.cpp order (pass n_head_kv for k).

    Hugging Face rotates the two halves of each head (rotate_half); llama.cpp's rope works on
    adjacent pairs, so its converter interleaves the halves of every head's rows.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise CorruptFile(f"q/k tensor with {rows} rows cannot be split into {n_head} heads of even size")
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def unpermute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk`: llama.cpp q/k rows -> Hugging Face order."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise CorruptFile(f"q/k tensor with {rows} rows cannot be split into {n_head} heads of even size")
    return (weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def qk_heads(hf_name: str, config: dict) -> int | None:
    """Heads to (un)permute this HF tensor with, or None when it is not a permuted q/k tensor."""
    model_type = config.get("model_type", "llama")
    permuted = _HF_TO_ARCH.get(model_type, ("", False))[1]
    if not permuted or not hf_name.endswith(".weight"):
        return None
    if ".self_attn.q_proj." in hf_name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def model_type_of(config: dict) -> str:
    model_type = config.get("model_type")
    if not model_type:
        architectures = config.get("architectures") or []
        model_type = str(architectures[0]) if architectures else "unknown"
    return str(model_type)


def check_supported(config: dict) -> None:
    """Raise Unsupported naming the architecture unless it is a Llama-family model qtool maps."""
    model_type = model_type_of(config)
    if model_type not in _HF_TO_ARCH:
        raise Unsupported(f"architecture {model_type!r} is not supported; qtool handles "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family) models")


def gguf_architecture(config: dict) -> str:
    """The ``general.architecture`` llama.cpp uses for this Hugging Face config."""
    check_supported(config)
    return _HF_TO_ARCH[model_type_of(config)][0]


def _rope_theta(config: dict) -> float:
    # transformers >= 5 nests it in rope_parameters; older config.json files have it top level.
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def _rope_scaling(config: dict) -> dict:
    scaling = config.get("rope_scaling") or {}
    params = config.get("rope_parameters") or {}
    if not scaling and isinstance(params, dict) and params.get("rope_type", "default") != "default":
        scaling = params
    return scaling if isinstance(scaling, dict) else {}


def gguf_metadata_from_hf(config: dict) -> dict[str, Any]:
    """The ``general.architecture`` and ``{arch}.*`` keys llama.cpp's converter writes.

    Python ints are UINT32 and floats FLOAT32 in GGUF (as llama.cpp writes them).
    """
    arch = gguf_architecture(config)
    hidden = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    metadata: dict[str, Any] = {
        "general.architecture": arch,
        f"{arch}.block_count": int(config["num_hidden_layers"]),
        f"{arch}.context_length": int(config.get("max_position_embeddings", 2048)),
        f"{arch}.embedding_length": hidden,
        f"{arch}.feed_forward_length": int(config["intermediate_size"]),
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": int(config.get("num_key_value_heads") or n_head),
        f"{arch}.rope.freq_base": _rope_theta(config),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        f"{arch}.vocab_size": int(config["vocab_size"]),
        f"{arch}.rope.dimension_count": head_dim,
    }
    if head_dim != hidden // n_head:
        metadata[f"{arch}.attention.key_length"] = head_dim
        metadata[f"{arch}.attention.value_length"] = head_dim
    scaling = _rope_scaling(config)
    rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type == "linear" and scaling.get("factor"):
        metadata[f"{arch}.rope.scaling.type"] = "linear"
        metadata[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    elif rope_type == "yarn" and scaling.get("factor"):
        metadata[f"{arch}.rope.scaling.type"] = "yarn"
        metadata[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
        if scaling.get("original_max_position_embeddings"):
            metadata[f"{arch}.rope.scaling.original_context_length"] = int(
                scaling["original_max_position_embeddings"])
    return metadata


def _require(metadata: dict, key: str) -> Any:
    if key not in metadata:
        raise CorruptFile(f"GGUF metadata lacks {key!r}; the file was not written by a Llama-family converter")
    return metadata[key]


def hf_config_from_gguf(metadata: dict, *, tensor_names: Iterable[str] | None = None) -> dict[str, Any]:
    """A Hugging Face config.json dict for a Llama-family GGUF's metadata.

    ``tensor_names`` (GGUF names) decide ``tie_word_embeddings``: tied when there is no
    ``output.weight`` (llama.cpp then uses ``token_embd.weight`` as the output matrix).
    """
    arch = metadata.get("general.architecture")
    if arch not in _ARCH_TO_HF:
        raise Unsupported(f"GGUF architecture {arch!r} is not supported; qtool reads "
                          f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (Llama-family) models")
    model_type, class_name, _ = _ARCH_TO_HF[arch]
    hidden = int(_require(metadata, f"{arch}.embedding_length"))
    n_head = int(_require(metadata, f"{arch}.attention.head_count"))
    n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head))
    if n_head <= 0 or n_head_kv <= 0 or hidden <= 0 or n_head % n_head_kv:
        raise CorruptFile(f"GGUF metadata has inconsistent sizes: {hidden=} {n_head=} {n_head_kv=}")
    head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden // n_head)
    vocab_size = metadata.get(f"{arch}.vocab_size")
    if vocab_size is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens is not None else None
    if vocab_size is None:
        raise CorruptFile("GGUF metadata gives no vocabulary size (no vocab_size key, no tokenizer tokens)")
    rope_theta = float(metadata.get(f"{arch}.rope.freq_base", 10000.0))
    names = set(tensor_names) if tensor_names is not None else None
    tied = names is not None and "output.weight" not in names
    config: dict[str, Any] = {
        "architectures": [class_name],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_require(metadata, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_require(metadata, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(metadata.get(f"{arch}.context_length", 2048)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": tied,
        "attention_bias": model_type == "qwen2",
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        # Dequantized GGUF tensors come out as float32 (see GGUFSource.load).
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    scaling_type = metadata.get(f"{arch}.rope.scaling.type")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if scaling_type in ("linear", "yarn") and factor:
        scaling = {"rope_type": scaling_type, "factor": float(factor), "rope_theta": rope_theta}
        original = metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        config["rope_scaling"] = dict(scaling, type=scaling_type)
        config["rope_parameters"] = scaling
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = int(value)
    name = metadata.get("general.name")
    if name:
        config["_name_or_path"] = str(name)
    return config
