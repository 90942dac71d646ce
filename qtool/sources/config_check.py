"""A model's config checked against the tensors in its checkpoint, before any model is built.

transformers builds whatever a config describes: ``num_hidden_layers: 1000000000`` is a billion
module objects (memory without bound, even on the meta device), a ``hidden_size`` of 10^12 reaches
the allocator (rotary tables stay real while the weights are on meta), and a string where an int
belongs or zero heads raises deep inside it. Every place that builds a model from a config
(evaluation, calibration, and the tokenizer, which may read config.json) calls
:func:`check_source_config` first. It costs a walk over the config and the tensor headers, and
after it every size the model is built with is bounded by the checkpoint's own tensors: the layer
count equals the layers present, and no size exceeds the largest tensor dimension.

Exit codes, one rule for all fields:

- CorruptFile (5): the config is malformed or contradicts the checkpoint: an integer field that is
  not a JSON integer (``"2"``, ``true``, ``2.0``), a zero or negative size or layer count, a
  non-finite or out-of-range float (NaN ``rms_norm_eps``, ``rope_theta`` 0), heads that do not
  divide the hidden size, key/value heads that do not divide the heads, a layer count or a size the
  tensors do not have. The message names the config (``FOLDER/config.json``, or a GGUF's metadata)
  and the field.
- Unsupported (4): a well-formed value naming something qtool cannot use: a ``model_type``
  transformers does not know, a ``torch_dtype`` that is no torch floating-point dtype
  (``"float128"``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from qtool.errors import CorruptFile, Unsupported
from qtool.sources.base import Source, TensorInfo
from qtool.sources.jsonfile import clip

# Sizes a model is built with (transformers' canonical names; a config class's attribute_map gives
# an architecture's own key, e.g. GPT-2's n_embd). None means "the architecture's default".
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "moe_intermediate_size")
_POSITIVE_INT_FIELDS = ("num_hidden_layers", "max_position_embeddings") + _SIZE_FIELDS
# Counts that may be 0 (dense models, no multi-token-prediction layers).
_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok",
                 "num_nextn_predict_layers")
# Floats a forward pass divides by, takes a root or a power of: NaN or 0 there gives NaN logits.
_POSITIVE_FLOAT_FIELDS = ("rope_theta", "factor")
_NON_NEGATIVE_FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon",
                              "initializer_range", "partial_rotary_factor")
_DTYPE_FIELDS = ("torch_dtype", "dtype")
# The first numeric path component of a tensor name is its decoder block (model.layers.3.*, transformer.h.3.*).
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")
_DIGITS_SHOWN = 24
_INT_LIMIT = 2**32 - 1


def config_origin(source: Source) -> str:
    """Where the source's config came from, for messages: ``FOLDER/config.json`` or a GGUF's metadata."""
    inner = source
    for _ in range(8):   # wrappers (quantized, smoothed) hold the source they read
        nested = getattr(inner, "inner", None) or getattr(inner, "base", None)
        if not isinstance(nested, Source):
            break
        inner = nested
    folder = getattr(inner, "folder", None)
    if isinstance(folder, Path):
        return str(folder / "config.json")
    if getattr(inner, "gguf", None) is not None:
        return f"{getattr(inner, 'path', inner.description)} (GGUF metadata)"
    return f"{source.description} (model config)"


def _shown(value: Any) -> str:
    """A config value quoted in a message: huge integers cut, strings and containers via clip()."""
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) < 10 ** _DIGITS_SHOWN:
            return str(value)
        # str() of an integer past Python's int-string limit raises: count the digits from the bits.
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return clip(value, 40)


class ConfigCheck:
    """One config against one list of tensors; :meth:`run` raises on the first problem."""

    def __init__(self, config: dict, tensors: list[TensorInfo], origin: str, *,
                 require_architecture: bool = True) -> None:
        self.config = config
        self.tensors = tensors
        self.origin = origin
        self.require_architecture = require_architecture
        self.attribute_map: dict[str, str] = {}
        self.text_record: str | None = None   # a vision-language model's text_config: its language model's record

    def corrupt(self, field: str, problem: str) -> CorruptFile:
        return CorruptFile(f"{self.origin}: {field} {problem}; fix the config or re-download the model")

    def key(self, field: str) -> str:
        """The config key holding transformers' ``field`` for this architecture."""
        return self.attribute_map.get(field, field)

    def get(self, field: str) -> Any:
        key = self.key(field)
        return self.config.get(key, self.config.get(field)) if key != field else self.config.get(field)

    def run(self) -> None:
        self.check_fields()
        # transformers is imported last (seconds of CPU): a config refused on its numbers never pays for it.
        mapped = self.check_model_type()
        if mapped:
            self.check_fields()   # again, under this architecture's own key names (GPT-2's n_layer, ...)
        self.check_language_model()

    def check_language_model(self) -> None:
        """A vision-language config holds the language model's sizes in ``text_config``: the same checks,
        against the language model's tensors (the vision tower's have sizes of their own)."""
        from qtool.architectures import vision_language

        record = vision_language(self.config)
        if record is None:
            return
        text = self.config.get("text_config")
        if not isinstance(text, dict):
            raise self.corrupt("text_config", f"is {_shown(text)}; a {record.model_types[0]} config holds the "
                               "language model's sizes there")
        language_model = record.block_prefix.rpartition(".")[0] + "."
        tensors = [info for info in self.tensors
                   if record.runtime_name(info.name).startswith((language_model, "lm_head."))]
        inner = ConfigCheck(text, tensors, f"{self.origin} text_config", require_architecture=self.require_architecture)
        inner.text_record = record.text_record.model_types[0]
        inner.run()

    def check_fields(self) -> None:
        self.check_numbers()
        self.check_dtype()
        self.check_heads()
        self.check_layers()
        self.check_sizes()

    def check_model_type(self) -> bool:
        """Refuse a model_type that is not a name or (``require_architecture``) not one transformers
        knows; True when the architecture names some fields with keys of its own."""
        model_type = self.config.get("model_type")
        if model_type is None:
            return False   # hf_config() says a model_type is needed; tokenizers do without one
        if not isinstance(model_type, str) or not model_type:
            raise self.corrupt("model_type", f"is {_shown(model_type)}, not an architecture name")
        if not self.require_architecture:
            return False   # quantizing needs no transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            raise Unsupported(f"{self.origin}: model_type {clip(model_type, 60)} is not an architecture "
                              "transformers knows; qtool runs no code from a checkpoint")
        attribute_map = getattr(CONFIG_MAPPING[model_type], "attribute_map", None) or {}
        self.attribute_map = {k: v for k, v in attribute_map.items()
                              if isinstance(k, str) and isinstance(v, str) and k != v and v in self.config}
        return bool(self.attribute_map)

    def int_field(self, field: str, minimum: int) -> int | None:
        value = self.get(field)
        if value is None:
            return None
        name = self.key(field)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.corrupt(name, f"is {_shown(value)} ({type(value).__name__}); it must be a JSON integer")
        if value < minimum:
            raise self.corrupt(name, f"is {_shown(value)}; it must be at least {minimum}")
        if value > _INT_LIMIT:
            raise self.corrupt(name, f"is {_shown(value)}; no model has a size or count above {_INT_LIMIT} "
                                     "(GGUF stores them as 32-bit integers)")
        return value

    def check_numbers(self) -> None:
        for field in _POSITIVE_INT_FIELDS:
            self.int_field(field, 1)
        for field in _COUNT_FIELDS:
            self.int_field(field, 0)
        # Floats anywhere (rope_parameters / rope_scaling nest theirs): finite, and in range where named.
        pending: list[tuple[str, Any]] = [("", self.config)]
        while pending:
            path, value = pending.pop()
            if isinstance(value, dict):
                pending.extend((f"{path}.{key}" if path else str(key), inner) for key, inner in value.items())
                continue
            if isinstance(value, list):
                pending.extend((f"{path}[{index}]", inner) for index, inner in enumerate(value))
                continue
            leaf = path.rsplit(".", 1)[-1]
            if isinstance(value, float) and not math.isfinite(value):
                raise self.corrupt(path, f"is {value}; a config holds finite numbers (strict JSON)")
            if leaf in _POSITIVE_FLOAT_FIELDS + _NON_NEGATIVE_FLOAT_FIELDS and value is not None:
                self.check_float(path, value, positive=leaf in _POSITIVE_FLOAT_FIELDS)

    def check_float(self, path: str, value: Any, *, positive: bool) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.corrupt(path, f"is {_shown(value)} ({type(value).__name__}); it must be a number")
        try:
            number = float(value)
        except OverflowError:
            raise self.corrupt(path, f"is {_shown(value)}, too large for a float") from None
        if not math.isfinite(number) or number < 0 or (positive and number == 0):
            raise self.corrupt(path, f"is {_shown(value)}; it must be {'positive' if positive else 'at least 0'}")

    def check_dtype(self) -> None:
        import torch

        for field in _DTYPE_FIELDS:
            value = self.config.get(field)
            if value is None:
                continue
            if not isinstance(value, str):
                raise self.corrupt(field, f"is {_shown(value)}; it must name a dtype such as \"bfloat16\"")
            dtype = getattr(torch, value.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise Unsupported(f"{self.origin}: {field} {clip(value, 40)} is not a floating-point dtype "
                                  "torch knows (float32, float16, bfloat16, ...)")

    def check_heads(self) -> None:
        hidden, heads = self.get("hidden_size"), self.get("num_attention_heads")
        kv_heads, head_dim = self.get("num_key_value_heads"), self.get("head_dim")
        if hidden is not None and heads is not None and head_dim is None and hidden % heads:
            raise self.corrupt(self.key("num_attention_heads"),
                               f"({heads}) does not divide {self.key('hidden_size')} ({hidden})")
        if heads is not None and kv_heads is not None and heads % kv_heads:
            raise self.corrupt(self.key("num_key_value_heads"),
                               f"({kv_heads}) does not divide {self.key('num_attention_heads')} ({heads})")

    def check_layers(self) -> None:
        layers = self.get("num_hidden_layers")
        if layers is None:
            return
        # Block indices by the path before them (model.layers, a vision tower's encoder.layers, ...):
        # the decoder is the group whose blocks are 0 .. layers-1 (plus DeepSeek-style MTP blocks after).
        groups: dict[str, set[int]] = {}
        for info in self.tensors:
            match = _BLOCK_INDEX.search(info.name)
            if match is not None and len(match.group(1)) < 10:
                groups.setdefault(info.name[:match.start(1)], set()).add(int(match.group(1)))
        extra = self.get("num_nextn_predict_layers") or 0
        for indices in groups.values():
            if len(indices) >= layers and all(index in indices for index in range(layers)) \
                    and max(indices) < layers + extra:
                return
        prefix, indices = max(groups.items(), key=lambda item: len(item[1]), default=("", set()))
        found = f"{len(indices)} block(s) under {clip(prefix.rstrip('.'), 60)}" if indices else "no decoder blocks"
        raise self.corrupt(self.key("num_hidden_layers"), f"is {_shown(layers)} but the checkpoint has {found}")

    def check_sizes(self) -> None:
        largest = max((dim for info in self.tensors for dim in info.shape), default=0)
        for field in _SIZE_FIELDS:
            value = self.get(field)
            if value is not None and value > largest:
                raise self.corrupt(self.key(field), f"is {_shown(value)}, larger than every tensor dimension "
                                   f"in the checkpoint (largest: {largest})")
        heads, head_dim = self.get("num_attention_heads"), self.get("head_dim")
        if heads is not None and head_dim is not None and heads * head_dim > largest:
            raise self.corrupt("num_attention_heads x head_dim", f"is {_shown(heads * head_dim)}, larger than "
                               f"every tensor dimension in the checkpoint (largest: {largest})")
        from qtool.architectures import SUPPORTED_ARCHITECTURES

        if (self.text_record or self.config.get("model_type")) in SUPPORTED_ARCHITECTURES:
            self.check_llama_shapes()

    def check_llama_shapes(self) -> None:
        """Llama-layout tensors (the architectures qtool writes as GGUF) against each size field."""
        hidden, vocab = self.get("hidden_size"), self.get("vocab_size")
        intermediate, heads = self.get("intermediate_size"), self.get("num_attention_heads")
        kv_heads, head_dim = self.get("num_key_value_heads"), self.get("head_dim")
        if head_dim is None and hidden is not None and heads is not None:
            head_dim = hidden // heads
        kv_heads = kv_heads if kv_heads is not None else heads
        # (tensor name suffix, axis) -> (field, value the config implies)
        implied: dict[tuple[str, int], tuple[str, int | None]] = {
            ("embed_tokens.weight", 0): ("vocab_size", vocab),
            ("embed_tokens.weight", 1): ("hidden_size", hidden),
            ("lm_head.weight", 0): ("vocab_size", vocab),
            ("model.norm.weight", 0): ("hidden_size", hidden),
            ("self_attn.q_proj.weight", 0): ("num_attention_heads", None if heads is None or head_dim is None
                                             else heads * head_dim),
            ("self_attn.k_proj.weight", 0): ("num_key_value_heads", None if kv_heads is None or head_dim is None
                                             else kv_heads * head_dim),
            ("self_attn.q_proj.weight", 1): ("hidden_size", hidden),
            ("mlp.gate_proj.weight", 0): ("intermediate_size", intermediate),
            ("mlp.down_proj.weight", 1): ("intermediate_size", intermediate),
        }
        for info in self.tensors:
            for (suffix, axis), (field, value) in implied.items():
                if value is None or not info.name.endswith(suffix) or len(info.shape) <= axis:
                    continue
                if info.shape[axis] != value:
                    raise self.corrupt(self.key(field), f"implies {value} for dimension {axis} of tensor "
                                       f"{clip(info.name, 60)}, which has shape {tuple(info.shape)}")


def check_config(config: dict, tensors: list[TensorInfo], origin: str, *, require_architecture: bool = True) -> None:
    """Raise CorruptFile / Unsupported (see module doc) unless ``config`` fits ``tensors``.

    ``require_architecture=False`` (quantizing, which builds no model): a model_type transformers
    does not know is accepted, and its fields are checked under their transformers names."""
    ConfigCheck(config, tensors, origin, require_architecture=require_architecture).run()


def check_source_config(source: Source, *, require_architecture: bool = True) -> None:
    """:func:`check_config` for a source's own config and tensors."""
    check_config(source.config, source.tensors(), config_origin(source), require_architecture=require_architecture)


def hf_config(config: dict, origin: str = "the model's config") -> Any:
    """A transformers config object from a config.json dict (no remote code).

    Call it on a config :func:`check_config` passed (see :func:`checked_hf_config`): transformers'
    own validation errors are then what is left, and are reported as a corrupt config (exit 5)
    naming ``origin``."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not model_type:
        raise Unsupported(f"{origin} has no model_type; qtool cannot pick a transformers architecture")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise Unsupported(f"{origin}: architecture {clip(model_type, 60)} is not known to transformers "
                          f"{_transformers_version()}; qtool runs no code from a checkpoint")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config", "transformers_version")}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as exc:
        # transformers' strict config classes (huggingface_hub's strict dataclasses) reject field types
        # and combinations it cannot build.
        raise CorruptFile(f"{origin}: transformers rejects this {model_type} config "
                          f"({type(exc).__name__}: {first_line(exc)}); fix the config or re-download the model") \
            from None


def checked_hf_config(source: Source) -> Any:
    """The transformers config object for ``source``, after the config was checked against its
    tensors (bounded work: no layer count or size beyond what the checkpoint holds)."""
    check_source_config(source)
    return hf_config(source.config, config_origin(source))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def first_line(exc: BaseException) -> str:
    """An exception's first line, cut and with control characters escaped, for a one-line message."""
    text = str(exc).strip()
    return repr(text.splitlines()[0][:160])[1:-1] if text else ""
