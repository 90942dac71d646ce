"""One record per architecture: Hugging Face <-> GGUF in both directions, and the decoder block.

The GGUF source reads with it and the GGUF sink writes with it, so the two stay in step. A record
says what gguf-py does not: which Hugging Face ``model_type``\\ s map to which GGUF architecture,
the Hugging Face module paths of a decoder block, the tensor transforms llama.cpp's converter
applies (q/k row permutation, Gemma's ``1 + weight`` norms) and the architecture's own
config.json <-> ``{arch}.*`` metadata. GGUF tensor names come from gguf-py's ``TensorNameMap``
and metadata key names from gguf-py's ``Keys``, the tables llama.cpp's ``convert_hf_to_gguf.py``
uses. Adding a dense architecture that gguf-py knows is one :class:`Architecture` in
``ARCHITECTURES``.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gguf
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, Keys

if TYPE_CHECKING:  # the transforms only call tensor methods; inspect stays free of torch
    import torch

from qtool.errors import CorruptFile, Unsupported

# Tensors outside the decoder blocks, as Hugging Face names them (module paths).
_GLOBAL_MODULES = ("model.embed_tokens", "model.norm", "lm_head")
# Module paths under ``model.layers.N`` of a Llama-style block.
_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_LLAMA_BLOCK = (*_LLAMA_ATTENTION, *_GATED_MLP, "input_layernorm", "post_attention_layernorm")
_GEMMA_BLOCK = (*_LLAMA_ATTENTION, *_GATED_MLP, "input_layernorm", "post_attention_layernorm",
                "pre_feedforward_layernorm", "post_feedforward_layernorm")

Metadata = dict[str, Any]


@dataclass(frozen=True)
class ScaleSite:
    """Where a per-input-channel scale s can move between a producer and the Linears reading its
    output without changing what the float model computes (SmoothQuant, AWQ): the producer is divided
    by s, the Linears' weight columns multiplied by it. Names are relative to the decoder block."""

    producer: str               # a norm weight ("vector": the norm's output is linear in it) or a Linear's weight ("rows")
    how: str                    # "vector" or "rows"
    linears: tuple[str, ...]    # Linear modules reading the producer's output


_UP_TO_DOWN = ScaleSite("mlp.up_proj.weight", "rows", ("mlp.down_proj",))    # down reads act(gate) * up
# A plain RMSNorm (weight times the normalized input) before q/k/v and before gate/up.
_NORM_TO_QKV = ScaleSite("input_layernorm.weight", "vector", ("self_attn.q_proj", "self_attn.k_proj",
                                                               "self_attn.v_proj"))
_LLAMA_SMOOTHING = (_NORM_TO_QKV,
                    ScaleSite("post_attention_layernorm.weight", "vector", ("mlp.gate_proj", "mlp.up_proj")),
                    _UP_TO_DOWN)
# Attention is linear in v: v's output rows are o's input columns (AWQ checks they match one to one).
_V_TO_O = ScaleSite("self_attn.v_proj.weight", "rows", ("self_attn.o_proj",))


def _key(template: str, arch: str) -> str:
    return template.format(arch=arch)


@dataclass(frozen=True)
class GGUFSplit:
    """A Hugging Face matrix llama.cpp's converter stores as several GGUF tensors (DeepSeek's kv_b_proj:
    attn_k_b, transposed, and attn_v_b). ``split`` and ``join`` are inverse pure tensor functions of the
    config; ``parts`` are the module paths gguf-py names the pieces by, relative to the decoder block."""

    module: str
    parts: tuple[str, ...]
    split: Callable[[torch.Tensor, dict], tuple[torch.Tensor, ...]]
    join: Callable[[tuple[torch.Tensor, ...], dict], torch.Tensor]
    # The pieces that are a selection of the matrix's rows (``split`` of a packed matrix, one row of
    # bytes per row, gives their bytes): a calibrated matrix keeps them; the others (transposed) are
    # quantized from the float matrix, as llama-quantize does.
    row_parts: tuple[int, ...] = ()


@dataclass(frozen=True)
class FusedExperts:
    """Experts a checkpoint stores fused, seen by qtool as one matrix (and bias) per expert, the form every
    container and llama.cpp's merged ffn_*_exps take. ``unfuse``: a stored fused tensor's leaf name
    and value [E, ...] -> {per-expert leaf (``gate_proj.weight``): [E, ...] stacked}; ``fuse`` the
    inverse, from every per-expert leaf of one block's experts back to the stored tensors."""

    stored: tuple[str, ...]                                          # fused leaves under ``experts.``
    leaves: tuple[str, str, str]                                     # per-expert gate, up, down modules
    unfuse: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
    fuse: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Architecture:
    """What qtool needs to write one Hugging Face architecture as GGUF and read it back."""

    model_types: tuple[str, ...]     # Hugging Face model_type(s); the first is what a GGUF reads back as
    gguf_arch: MODEL_ARCH
    hf_class: str                    # config.json ``architectures`` entry for a GGUF read back
    block_modules: tuple[str, ...] = _LLAMA_BLOCK
    permute_qk: bool = False         # llama.cpp's NORM rope: q/k rows of each head interleaved
    norm_offset: float = 0.0         # llama.cpp stores ``offset + weight`` for every ``*norm.weight``
    hidden_act: str = "silu"
    writes_head_dim: bool = True     # key_length / value_length from config.json's head_dim
    # {arch}.rope.dimension_count: only Llama's converter class (and its subclasses) writes it;
    # llama.cpp defaults it to the head size, which is what qtool would write.
    writes_rope_dims: bool = False
    layer_norm: bool = False         # LayerNorm (config norm_epsilon) rather than RMSNorm (rms_norm_eps)
    # config.json -> extra ``{arch}.*`` keys, and GGUF metadata -> extra config.json fields.
    extra_metadata: Callable[[dict, str], Metadata] | None = None
    extra_config: Callable[[dict, str, dict], dict] | None = None
    # config.json fields whose value llama.cpp fixes for the architecture (a GGUF does not carry them): a
    # GGUF reads back with them, and a checkpoint with other values is warned about (see gguf_deviations).
    hf_fixed: dict = field(default_factory=dict, hash=False, compare=False)
    # The config field the model multiplies its embeddings by before the first block (Granite), which
    # calibration, running the blocks on its own, must apply too.
    embedding_multiplier: str | None = None
    # Scale sites of one block: SmoothQuant (W8A8) uses smoothing_sites, AWQ those and value_sites.
    smoothing_sites: tuple[ScaleSite, ...] = _LLAMA_SMOOTHING
    value_sites: tuple[ScaleSite, ...] = (_V_TO_O,)
    # Mixture of experts, module paths relative to the decoder block as checkpoints store them: the
    # routers (Linears scoring the experts for each token; kept unquantized by default, see
    # plan.ROUTER_GLOBS) and the list of experts (``experts.N.*``, which transformers 5 fuses into 3-D
    # parameters when it loads them).
    routers: tuple[str, ...] = ()
    experts: str | None = None
    expert_count_field: str = "num_experts"   # config.json's number of experts (Mixtral: num_local_experts)
    # Matrices the GGUF stores split (see GGUFSplit), and stored names gguf-py knows under another
    # spelling (DeepSeek-V3's ``mlp.gate.e_score_correction_bias``: ``mlp.gate.e_score_correction.bias``).
    splits: tuple[GGUFSplit, ...] = ()
    hf_aliases: tuple[tuple[str, str], ...] = ()
    # Records sharing a GGUF architecture name: the one whose test passes on a file's metadata reads it
    # (a record without a test reads the files no other one claims).
    reads_gguf: Callable[[dict, str], bool] | None = None
    # Experts stored fused by the checkpoint itself (gpt-oss), seen per expert (see FusedExperts).
    fused_experts: FusedExperts | None = None

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    @property
    def awq_sites(self) -> tuple[ScaleSite, ...]:
        return (*self.smoothing_sites, *self.value_sites)

    @property
    def name(self) -> str:
        """``general.architecture``."""
        return MODEL_ARCH_NAMES[self.gguf_arch]


# -- per-architecture metadata ---------------------------------------------------------------------
def _granite_metadata(config: dict, arch: str) -> Metadata:
    # llama.cpp names Granite's *_multiplier fields *_scale and writes each only when set.
    metadata: Metadata = {}
    for hf_key, template in (("attention_multiplier", Keys.Attention.SCALE),
                             ("embedding_multiplier", Keys.LLM.EMBEDDING_SCALE),
                             ("residual_multiplier", Keys.LLM.RESIDUAL_SCALE),
                             ("logits_scaling", Keys.LLM.LOGIT_SCALE)):
        if config.get(hf_key):
            metadata[_key(template, arch)] = float(config[hf_key])
    return metadata


def _granite_config(metadata: dict, arch: str, config: dict) -> dict:
    # llama.cpp's defaults for absent keys: attention scale 1/sqrt(head_dim), the others 1.
    return {"attention_multiplier": float(metadata.get(_key(Keys.Attention.SCALE, arch))
                                          or 1.0 / math.sqrt(config["head_dim"])),
            "embedding_multiplier": float(metadata.get(_key(Keys.LLM.EMBEDDING_SCALE, arch)) or 1.0),
            "residual_multiplier": float(metadata.get(_key(Keys.LLM.RESIDUAL_SCALE, arch)) or 1.0),
            "logits_scaling": float(metadata.get(_key(Keys.LLM.LOGIT_SCALE, arch)) or 1.0)}


def _phi3_metadata(config: dict, arch: str) -> Metadata:
    # Phi-3 may rotate part of each head; llama.cpp writes the sliding window, 0 when there is none.
    head_dim = _head_dim(config)
    factor = float(config.get("partial_rotary_factor") or 1.0)
    metadata: Metadata = {_key(Keys.Rope.DIMENSION_COUNT, arch): int(factor * head_dim),
                          _key(Keys.Attention.SLIDING_WINDOW, arch): int(config.get("sliding_window") or 0)}
    scaling = _rope_scaling(config)
    original = config.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
    if original:
        metadata[_key(Keys.Rope.SCALING_ORIG_CTX_LEN, arch)] = int(original)
    if scaling.get("long_factor") and original:
        # longrope's attention factor (the cos / sin multiplier), from how far the context was stretched.
        stretch = float(config["max_position_embeddings"]) / float(original)
        metadata[_key(Keys.Rope.SCALING_ATTN_FACTOR, arch)] = (
            math.sqrt(1 + math.log(stretch) / math.log(float(original))) if stretch > 1 else 1.0)
    return metadata


def _phi3_config(metadata: dict, arch: str, config: dict) -> dict:
    rope_dims = metadata.get(_key(Keys.Rope.DIMENSION_COUNT, arch)) or config["head_dim"]
    window = metadata.get(_key(Keys.Attention.SLIDING_WINDOW, arch)) or None
    extra = {"partial_rotary_factor": int(rope_dims) / config["head_dim"], "sliding_window": window}
    original = metadata.get(_key(Keys.Rope.SCALING_ORIG_CTX_LEN, arch))
    extra["original_max_position_embeddings"] = int(original) if original else config["max_position_embeddings"]
    return extra


def _gemma_metadata(config: dict, arch: str) -> Metadata:
    metadata: Metadata = {_key(Keys.Attention.SLIDING_WINDOW, arch): int(config.get("sliding_window") or 0)}
    for hf_key, template in (("attn_logit_softcapping", Keys.LLM.ATTN_LOGIT_SOFTCAPPING),
                             ("final_logit_softcapping", Keys.LLM.FINAL_LOGIT_SOFTCAPPING)):
        if config.get(hf_key):
            metadata[_key(template, arch)] = float(config[hf_key])
    return metadata


def _gemma_config(metadata: dict, arch: str, config: dict) -> dict:
    # llama.cpp scales queries by 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim).
    extra: dict[str, Any] = {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": config["head_dim"],
                             "sliding_window": int(metadata.get(_key(Keys.Attention.SLIDING_WINDOW, arch)) or 4096)}
    for hf_key, template in (("attn_logit_softcapping", Keys.LLM.ATTN_LOGIT_SOFTCAPPING),
                             ("final_logit_softcapping", Keys.LLM.FINAL_LOGIT_SOFTCAPPING)):
        value = metadata.get(_key(template, arch))
        extra[hf_key] = float(value) if value else None
    if arch == MODEL_ARCH_NAMES[MODEL_ARCH.GEMMA3]:
        # Gemma 3's sliding layers rotate with their own base (llama.cpp's default: 10000).
        local = float(metadata.get(_key(Keys.Rope.FREQ_BASE_SWA, arch)) or 10000.0)
        extra["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": config["rope_theta"]},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return extra


def _kv_b_heads(weight: torch.Tensor, config: dict) -> torch.Tensor:
    heads, nope, v = int(config["num_attention_heads"]), int(config["qk_nope_head_dim"]), int(config["v_head_dim"])
    if weight.shape[0] != heads * (nope + v):
        raise CorruptFile(f"kv_b_proj has {weight.shape[0]} rows where {heads} heads of {nope} + {v} need "
                          f"{heads * (nope + v)}; the config does not describe this checkpoint")
    return weight.reshape(heads, nope + v, *weight.shape[1:])


def _split_kv_b(weight: torch.Tensor, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    # Per head: nope key rows, then value rows. llama.cpp multiplies queries by k_b (absorbed into the
    # latent space), hence its transpose: k_b [heads, kv_lora, nope], v_b [heads, v, kv_lora].
    per_head = _kv_b_heads(weight, config)
    nope = int(config["qk_nope_head_dim"])
    return per_head[:, :nope].transpose(1, 2), per_head[:, nope:]


def _join_kv_b(parts: tuple[torch.Tensor, ...], config: dict) -> torch.Tensor:
    import torch

    k_b, v_b = parts
    if k_b.dim() != 3 or v_b.dim() != 3 or k_b.shape[0] != v_b.shape[0] or k_b.shape[1] != v_b.shape[2]:
        raise CorruptFile(f"attn_k_b {tuple(k_b.shape)} and attn_v_b {tuple(v_b.shape)} are not the two halves "
                          "of one kv_b_proj")
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])


_KV_B_SPLIT = GGUFSplit("self_attn.kv_b_proj", ("self_attn.k_b_proj", "self_attn.v_b_proj"), _split_kv_b,
                        _join_kv_b, row_parts=(1,))


def _deepseek_metadata(config: dict, arch: str, *, gating: str | None = None) -> Metadata:
    """Multi-head latent attention as llama.cpp runs it (one latent KV head of kv_lora + rope), the
    shared experts, the dense first layers and the router's scoring."""
    kv_lora, rope = int(config["kv_lora_rank"]), int(config["qk_rope_head_dim"])
    metadata: Metadata = {
        _key(Keys.Attention.HEAD_COUNT_KV, arch): 1,
        _key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, arch): int(config.get("first_k_dense_replace") or 0),
        _key(Keys.Attention.KV_LORA_RANK, arch): kv_lora,
        _key(Keys.Attention.KEY_LENGTH, arch): kv_lora + rope,
        _key(Keys.Attention.VALUE_LENGTH, arch): kv_lora,
        _key(Keys.Attention.KEY_LENGTH_MLA, arch): int(config["qk_nope_head_dim"]) + rope,
        _key(Keys.Attention.VALUE_LENGTH_MLA, arch): int(config["v_head_dim"]),
        _key(Keys.LLM.EXPERT_SHARED_COUNT, arch): int(config.get("n_shared_experts") or 0),
        _key(Keys.Rope.DIMENSION_COUNT, arch): rope,
    }
    if config.get("q_lora_rank") is not None:
        metadata[_key(Keys.Attention.Q_LORA_RANK, arch)] = int(config["q_lora_rank"])
    if config.get("routed_scaling_factor") is not None:
        metadata[_key(Keys.LLM.EXPERT_WEIGHTS_SCALE, arch)] = float(config["routed_scaling_factor"])
    if config.get("norm_topk_prob"):
        metadata[_key(Keys.LLM.EXPERT_WEIGHTS_NORM, arch)] = True
    for template, hf_key in _EXPERT_GROUP_KEYS:
        if config.get(hf_key) is not None:
            metadata[_key(template, arch)] = int(config[hf_key])
    # llama.cpp scores experts with a softmax unless told otherwise; transformers' DeepSeek-V3 always
    # uses a sigmoid, whether or not its config.json says so.
    scoring = config.get("scoring_func") or gating
    if scoring in _GATING_FUNCS:
        metadata[_key(Keys.LLM.EXPERT_GATING_FUNC, arch)] = _GATING_FUNCS[scoring]
    mscale_all_dim = _rope_scaling(config).get("mscale_all_dim")
    if mscale_all_dim is not None:   # llama.cpp divides it by 0.1 again (its converter's legacy scale)
        metadata[_key(Keys.Rope.SCALING_YARN_LOG_MUL, arch)] = 0.1 * float(mscale_all_dim)
    return metadata


_GATING_FUNCS = {"softmax": int(gguf.ExpertGatingFuncType.SOFTMAX), "sigmoid": int(gguf.ExpertGatingFuncType.SIGMOID)}
# Expert groups (DeepSeek-V3 routes within the best groups): GGUF key <-> config.json field.
_EXPERT_GROUP_KEYS = ((Keys.LLM.EXPERT_GROUP_COUNT, "n_group"), (Keys.LLM.EXPERT_GROUP_USED_COUNT, "topk_group"))


def _deepseek_config(metadata: dict, arch: str, config: dict) -> dict:
    rope = int(_require(metadata, _key(Keys.Rope.DIMENSION_COUNT, arch)))
    qk_head_dim = int(_require(metadata, _key(Keys.Attention.KEY_LENGTH_MLA, arch)))
    q_lora = metadata.get(_key(Keys.Attention.Q_LORA_RANK, arch))
    gating = {value: name for name, value in _GATING_FUNCS.items()}.get(
        metadata.get(_key(Keys.LLM.EXPERT_GATING_FUNC, arch)), "softmax")
    extra: dict[str, Any] = {
        # transformers' attention has one key/value head per query head (llama.cpp's single latent one
        # is what MLA compresses them to); head_dim is the rotary part.
        "num_key_value_heads": config["num_attention_heads"], "head_dim": rope,
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": int(_require(metadata, _key(Keys.Attention.KV_LORA_RANK, arch))),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": qk_head_dim - rope,
        "qk_head_dim": qk_head_dim,
        "v_head_dim": int(_require(metadata, _key(Keys.Attention.VALUE_LENGTH_MLA, arch))),
        "first_k_dense_replace": int(metadata.get(_key(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, arch)) or 0),
        "n_shared_experts": int(metadata.get(_key(Keys.LLM.EXPERT_SHARED_COUNT, arch)) or 0) or None,
        "routed_scaling_factor": float(metadata.get(_key(Keys.LLM.EXPERT_WEIGHTS_SCALE, arch)) or 1.0),
        "norm_topk_prob": bool(metadata.get(_key(Keys.LLM.EXPERT_WEIGHTS_NORM, arch), False)),
        "scoring_func": gating,
    }
    for template, hf_key in _EXPERT_GROUP_KEYS:
        if metadata.get(_key(template, arch)) is not None:
            extra[hf_key] = int(metadata[_key(template, arch)])
    log_mul = metadata.get(_key(Keys.Rope.SCALING_YARN_LOG_MUL, arch))
    if log_mul is not None and isinstance(config.get("rope_parameters"), dict):
        # DeepSeek's checkpoints give YaRN's mscale and mscale_all_dim the same value (the GGUF keeps one).
        mscale = float(log_mul) / 0.1
        extra["rope_parameters"] = {**config["rope_parameters"], "mscale": mscale, "mscale_all_dim": mscale}
    return extra


def _reads_sigmoid_routing(metadata: dict, arch: str) -> bool:
    return metadata.get(_key(Keys.LLM.EXPERT_GATING_FUNC, arch)) == _GATING_FUNCS["sigmoid"]


# DeepSeek-V2 / V3: multi-head latent attention (queries through a low-rank q_a / q_b pair when
# q_lora_rank is set, keys and values from one latent kv_a projection), dense first layers (mlp.*_proj),
# then routed experts beside shared ones. Norm sites: the input norm feeds q_a (or q) and kv_a, the two
# latent norms feed q_b and kv_b; the dense layers' and shared experts' MLPs as Llama's.
_DEEPSEEK_BLOCK = ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.q_a_layernorm", "self_attn.q_b_proj",
                   "self_attn.kv_a_proj_with_mqa", "self_attn.kv_a_layernorm", "self_attn.kv_b_proj",
                   "self_attn.k_b_proj", "self_attn.v_b_proj", "self_attn.o_proj", *_GATED_MLP, "mlp.gate",
                   "mlp.gate.e_score_correction", "mlp.experts.gate_proj", "mlp.experts.up_proj",
                   "mlp.experts.down_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
                   "mlp.shared_experts.down_proj", "input_layernorm", "post_attention_layernorm")
_DEEPSEEK_SMOOTHING = (
    ScaleSite("input_layernorm.weight", "vector", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")),
    ScaleSite("input_layernorm.weight", "vector", ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")),
    ScaleSite("self_attn.q_a_layernorm.weight", "vector", ("self_attn.q_b_proj",)),
    ScaleSite("self_attn.kv_a_layernorm.weight", "vector", ("self_attn.kv_b_proj",)),
    ScaleSite("post_attention_layernorm.weight", "vector", ("mlp.gate_proj", "mlp.up_proj")),
    _UP_TO_DOWN,
    ScaleSite("mlp.shared_experts.up_proj.weight", "rows", ("mlp.shared_experts.down_proj",)))
_DEEPSEEK = dict(block_modules=_DEEPSEEK_BLOCK, smoothing_sites=_DEEPSEEK_SMOOTHING, value_sites=(),
                 routers=("mlp.gate",), experts="mlp.experts", expert_count_field="n_routed_experts",
                 splits=(_KV_B_SPLIT,),
                 hf_aliases=(("mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction.bias"),),
                 extra_config=_deepseek_config)


def _gpt_oss_unfuse(leaf: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
    # gate_up_proj [E, H, 2I] is input-major with gate and up interleaved column by column.
    if leaf == "gate_up_proj":
        rows = fused.transpose(1, 2)
        return {"gate_proj.weight": rows[:, 0::2], "up_proj.weight": rows[:, 1::2]}
    if leaf == "gate_up_proj_bias":
        return {"gate_proj.bias": fused[:, 0::2], "up_proj.bias": fused[:, 1::2]}
    if leaf == "down_proj":
        return {"down_proj.weight": fused.transpose(1, 2)}
    return {"down_proj.bias": fused}


def _gpt_oss_fuse(per_expert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch

    gate, up = per_expert["gate_proj.weight"], per_expert["up_proj.weight"]
    gate_bias, up_bias = per_expert["gate_proj.bias"], per_expert["up_proj.bias"]
    return {"gate_up_proj": torch.stack((gate, up), dim=2).flatten(1, 2).transpose(1, 2),
            "gate_up_proj_bias": torch.stack((gate_bias, up_bias), dim=2).flatten(1, 2),
            "down_proj": per_expert["down_proj.weight"].transpose(1, 2),
            "down_proj_bias": per_expert["down_proj.bias"]}


_GPT_OSS_EXPERTS = FusedExperts(("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
                                ("gate_proj", "up_proj", "down_proj"), _gpt_oss_unfuse, _gpt_oss_fuse)


def _gpt_oss_metadata(config: dict, arch: str) -> Metadata:
    # llama.cpp alternates sliding and full attention (even blocks sliding) as transformers' default
    # layer_types do; every expert is intermediate_size wide.
    return {_key(Keys.Attention.SLIDING_WINDOW, arch): int(config.get("sliding_window") or 0),
            _key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, arch): int(config["intermediate_size"])}


def _gpt_oss_config(metadata: dict, arch: str, config: dict) -> dict:
    return {"sliding_window": int(_require(metadata, _key(Keys.Attention.SLIDING_WINDOW, arch))),
            "intermediate_size": int(_require(metadata, _key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, arch)))}


ARCHITECTURES: tuple[Architecture, ...] = (
    # llama.cpp converts Mistral checkpoints with its Llama converter (general.architecture = llama).
    Architecture(("llama", "mistral"), MODEL_ARCH.LLAMA, "LlamaForCausalLM", permute_qk=True, writes_rope_dims=True),
    Architecture(("qwen2",), MODEL_ARCH.QWEN2, "Qwen2ForCausalLM"),
    Architecture(("qwen3",), MODEL_ARCH.QWEN3, "Qwen3ForCausalLM", block_modules=(*_LLAMA_BLOCK, *_QK_NORMS)),
    Architecture(("olmo2",), MODEL_ARCH.OLMO2, "Olmo2ForCausalLM",
                 block_modules=(*_LLAMA_ATTENTION, *_QK_NORMS, *_GATED_MLP, "post_attention_layernorm",
                                "post_feedforward_layernorm"),
                 # Its norms follow attention and MLP (post-norm): no norm produces a Linear's input.
                 smoothing_sites=(_UP_TO_DOWN,)),
    # Granite's converter ignores head_dim (GraniteModel pops it) and keeps Llama's q/k permutation.
    Architecture(("granite",), MODEL_ARCH.GRANITE, "GraniteForCausalLM", permute_qk=True, writes_head_dim=False,
                 writes_rope_dims=True, embedding_multiplier="embedding_multiplier",
                 extra_metadata=_granite_metadata, extra_config=_granite_config),
    # Phi-3's fused projections stay fused in llama.cpp: attn_qkv and ffn_up (gate rows first).
    Architecture(("phi3",), MODEL_ARCH.PHI3, "Phi3ForCausalLM",
                 block_modules=("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj",
                                "input_layernorm", "post_attention_layernorm"),
                 writes_head_dim=False, extra_metadata=_phi3_metadata, extra_config=_phi3_config,
                 # v and up are row slices of the fused projections: only the norm sites apply.
                 smoothing_sites=(ScaleSite("input_layernorm.weight", "vector", ("self_attn.qkv_proj",)),
                                  ScaleSite("post_attention_layernorm.weight", "vector", ("mlp.gate_up_proj",))),
                 value_sites=()),
    # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's converter stores 1 + weight.
    # Its norms multiply by (1 + weight), which dividing the weight by s does not scale: no norm sites.
    Architecture(("gemma2",), MODEL_ARCH.GEMMA2, "Gemma2ForCausalLM", block_modules=_GEMMA_BLOCK, norm_offset=1.0,
                 hidden_act="gelu_pytorch_tanh", extra_metadata=_gemma_metadata, extra_config=_gemma_config,
                 smoothing_sites=(_UP_TO_DOWN,)),
    Architecture(("gemma3_text",), MODEL_ARCH.GEMMA3, "Gemma3ForCausalLM", block_modules=(*_GEMMA_BLOCK, *_QK_NORMS),
                 norm_offset=1.0, hidden_act="gelu_pytorch_tanh", extra_metadata=_gemma_metadata,
                 extra_config=_gemma_config, smoothing_sites=(_UP_TO_DOWN,)),
    # StarCoder2: LayerNorm with biases, biased projections, an ungated c_fc / c_proj MLP.
    Architecture(("starcoder2",), MODEL_ARCH.STARCODER2, "Starcoder2ForCausalLM",
                 block_modules=(*_LLAMA_ATTENTION, "mlp.c_fc", "mlp.c_proj", "input_layernorm",
                                "post_attention_layernorm"),
                 hidden_act="gelu_pytorch_tanh", layer_norm=True,
                 # LayerNorm biases would need the same division, and c_proj reads gelu(c_fc): no sites.
                 smoothing_sites=()),
    # Mixtures of experts (issue #18). block_modules name llama.cpp's merged expert tensors (ffn_*_exps)
    # as gguf-py maps them; checkpoints store one matrix per expert (see merged_expert_name).
    # Each expert's gate/up read the post-attention norm through the router's choice: only the
    # attention sites apply.
    # llama.cpp converts Mixtral with its Llama converter (general.architecture = llama).
    Architecture(("mixtral",), MODEL_ARCH.LLAMA, "MixtralForCausalLM", permute_qk=True, writes_rope_dims=True,
                 block_modules=(*_LLAMA_ATTENTION, "block_sparse_moe.gate", "block_sparse_moe.experts.w1",
                                "block_sparse_moe.experts.w3", "block_sparse_moe.experts.w2", "input_layernorm",
                                "post_attention_layernorm"),
                 smoothing_sites=(_NORM_TO_QKV,), routers=("block_sparse_moe.gate",),
                 experts="block_sparse_moe.experts", expert_count_field="num_local_experts"),
    # Qwen2-MoE: a shared expert beside the routed ones, scaled by its own one-row gate.
    Architecture(("qwen2_moe",), MODEL_ARCH.QWEN2MOE, "Qwen2MoeForCausalLM",
                 block_modules=(*_LLAMA_ATTENTION, "mlp.gate", "mlp.experts.gate_proj", "mlp.experts.up_proj",
                                "mlp.experts.down_proj", "mlp.shared_expert_gate", "mlp.shared_expert.gate_proj",
                                "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj", "input_layernorm",
                                "post_attention_layernorm"),
                 smoothing_sites=(_NORM_TO_QKV,), routers=("mlp.gate", "mlp.shared_expert_gate"), experts="mlp.experts",
                 hf_fixed={"norm_topk_prob": False}),
    Architecture(("qwen3_moe",), MODEL_ARCH.QWEN3MOE, "Qwen3MoeForCausalLM",
                 block_modules=(*_LLAMA_ATTENTION, *_QK_NORMS, "mlp.gate", "mlp.experts.gate_proj",
                                "mlp.experts.up_proj", "mlp.experts.down_proj", "input_layernorm",
                                "post_attention_layernorm"),
                 smoothing_sites=(_NORM_TO_QKV,), routers=("mlp.gate",), experts="mlp.experts",
                 hf_fixed={"norm_topk_prob": True}),
    # Both are llama.cpp's deepseek2; a file whose router scores with a sigmoid reads back as V3.
    Architecture(("deepseek_v2",), MODEL_ARCH.DEEPSEEK2, "DeepseekV2ForCausalLM", extra_metadata=_deepseek_metadata,
                 **_DEEPSEEK),
    Architecture(("deepseek_v3",), MODEL_ARCH.DEEPSEEK2, "DeepseekV3ForCausalLM",
                 extra_metadata=functools.partial(_deepseek_metadata, gating="sigmoid"),
                 reads_gguf=_reads_sigmoid_routing, **_DEEPSEEK),
    # gpt-oss: biased projections, attention sinks (one logit per head), alternating sliding / full
    # attention, a biased router, and experts stored fused with biases (MXFP4 in OpenAI's checkpoints).
    # llama.cpp hard-codes its clamped SwiGLU (alpha 1.702, limit 7) and truncates YaRN's ramp.
    Architecture(("gpt_oss",), MODEL_ARCH.GPT_OSS, "GptOssForCausalLM",
                 block_modules=(*_LLAMA_ATTENTION, "self_attn.sinks", "mlp.router", "mlp.experts.gate_proj",
                                "mlp.experts.up_proj", "mlp.experts.down_proj", "input_layernorm",
                                "post_attention_layernorm"),
                 hf_aliases=(("self_attn.sinks", "self_attn.sinks.weight"),),
                 smoothing_sites=(_NORM_TO_QKV,), routers=("mlp.router",), experts="mlp.experts",
                 expert_count_field="num_local_experts", fused_experts=_GPT_OSS_EXPERTS,
                 extra_metadata=_gpt_oss_metadata, extra_config=_gpt_oss_config,
                 hf_fixed={"swiglu_limit": 7.0, "swiglu_alpha": 1.702}),
)

_BY_MODEL_TYPE: dict[str, Architecture] = {t: record for record in ARCHITECTURES for t in record.model_types}
# GGUF architecture name -> the records written under it, in the order they claim a file: a record with
# a test (reads_gguf) first, then a mixture of experts (which claims files counting experts,
# {arch}.expert_count: Mixtral under llama), then the dense record. Mistral GGUFs written by older
# converters say general.architecture = mistral.
_BY_GGUF_NAME: dict[str, list[Architecture]] = {}
for _record in sorted(ARCHITECTURES, key=lambda r: (r.reads_gguf is None, not r.is_moe)):
    _BY_GGUF_NAME.setdefault(_record.name, []).append(_record)
del _record
_BY_GGUF_NAME["mistral"] = [_BY_MODEL_TYPE["mistral"]]
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)
SUPPORTED_GGUF_ARCHITECTURES: tuple[str, ...] = tuple(_BY_GGUF_NAME)

# -- vision-language models ------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionLanguage:
    """A vision-language model whose language model is a text architecture qtool has a record for.

    The language model is quantized under the module paths transformers 5 gives it; the vision tower
    and its projector are kept. Checkpoints on the Hub (and transformers' own ``save_pretrained``)
    store the older names, which transformers renames when it loads them: ``checkpoint_prefixes``
    is that renaming (checked against transformers' loader in tests/test_vlm.py), applied by the
    sources so that every stage sees the names the model's modules have.
    """

    model_types: tuple[str, ...]
    text_model_type: str                             # the record of the language model (config.text_config)
    checkpoint_prefixes: tuple[tuple[str, str], ...]  # stored name prefix -> transformers 5 module path prefix
    block_prefix: str = "model.language_model.layers"

    @property
    def text_record(self) -> Architecture:
        return _BY_MODEL_TYPE[self.text_model_type]

    def runtime_name(self, name: str) -> str:
        """A stored tensor (or module) name as transformers 5 names it; names already in that form pass."""
        for stored, runtime in self.checkpoint_prefixes:
            if name.startswith(stored):
                return runtime + name[len(stored):]
        return name


VISION_LANGUAGE: tuple[VisionLanguage, ...] = (
    # Qwen2-VL / Qwen2.5-VL: the language model is Qwen2's (with multimodal rotary sections).
    VisionLanguage(("qwen2_vl", "qwen2_5_vl"), "qwen2",
                   (("model.layers.", "model.language_model.layers."),
                    ("model.embed_tokens.", "model.language_model.embed_tokens."),
                    ("model.norm.", "model.language_model.norm."),
                    ("visual.", "model.visual."))),
    # Gemma 3 (4B and up) with its SigLIP vision tower: the language model is gemma3_text.
    VisionLanguage(("gemma3",), "gemma3_text",
                   (("language_model.model.", "model.language_model."),
                    ("language_model.lm_head.", "lm_head."),
                    ("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."))),
)
_VISION_LANGUAGE_BY_TYPE: dict[str, VisionLanguage] = {t: record for record in VISION_LANGUAGE
                                                       for t in record.model_types}
SUPPORTED_VISION_LANGUAGE: tuple[str, ...] = tuple(_VISION_LANGUAGE_BY_TYPE)


def vision_language(config: dict) -> VisionLanguage | None:
    """The record of a vision-language config (None for any other)."""
    return _VISION_LANGUAGE_BY_TYPE.get(model_type_of(config)) if isinstance(config, dict) else None


def text_config(config: dict) -> dict:
    """The language model's config: ``text_config`` of a vision-language config, else the config itself."""
    inner = config.get("text_config") if vision_language(config) is not None else None
    return inner if isinstance(inner, dict) else config


# GGUF tensors that have no Hugging Face counterpart (llama 3.1 rope frequency factors, Phi-3's
# long/short rope factors).
GGUF_ONLY_TENSORS: frozenset[str] = frozenset({"rope_freqs.weight", "rope_factors_long.weight",
                                               "rope_factors_short.weight"})


def _unsupported_architecture(found: str, *, gguf_file: bool = False) -> Unsupported:
    known = ", ".join(SUPPORTED_GGUF_ARCHITECTURES if gguf_file else SUPPORTED_ARCHITECTURES)
    what = "GGUF architecture" if gguf_file else "architecture"
    return Unsupported(f"{what} {found!r} is not supported; qtool handles {known}")


def model_type_of(config: dict) -> str:
    model_type = config.get("model_type")
    if not model_type:
        architectures = config.get("architectures") or []
        model_type = str(architectures[0]) if architectures else "unknown"
    return str(model_type)


def architecture(config: dict) -> Architecture:
    """The record for a Hugging Face config, for writing and reading GGUF; the one place that refuses
    unknown architectures (and vision-language models, which qtool does not write as GGUF)."""
    model_type = model_type_of(config)
    if model_type in _VISION_LANGUAGE_BY_TYPE:
        raise Unsupported(f"{model_type} is a vision-language model: qtool quantizes its language model as "
                          "safetensors (--format safetensors: NF4, int8, int4, W8A8) and keeps the vision tower; "
                          "it does not write it as GGUF (llama.cpp's converter splits such a model into a text GGUF "
                          "and an --mmproj file)")
    if model_type not in _BY_MODEL_TYPE:
        raise _unsupported_architecture(model_type)
    return _BY_MODEL_TYPE[model_type]


def block_record(config: dict) -> Architecture | None:
    """The record of the decoder blocks of ``config`` (a vision-language model's language model), or None
    for an architecture qtool has no record of (blocks taken in by --include get no record's extras)."""
    record = vision_language(config)
    if record is not None:
        return record.text_record
    return _BY_MODEL_TYPE.get(model_type_of(config)) if isinstance(config, dict) else None


def gguf_record(arch: Any, metadata: dict | None = None) -> Architecture:
    """The record for a GGUF ``general.architecture`` (the mixture of experts of that name when
    ``metadata`` counts experts); Unsupported for any other."""
    if not isinstance(arch, str) or arch not in _BY_GGUF_NAME:
        raise _unsupported_architecture(str(arch), gguf_file=True)
    metadata = metadata or {}
    counts_experts = bool(metadata.get(_key(Keys.LLM.EXPERT_COUNT, arch)))
    candidates = _BY_GGUF_NAME[arch]
    for record in candidates:
        if record.reads_gguf is not None and not record.reads_gguf(metadata, arch):
            continue
        if record.is_moe and not counts_experts and any(not other.is_moe for other in candidates):
            continue
        return record
    return candidates[-1]


def check_supported(config: dict) -> None:
    """Raise Unsupported naming the architecture unless qtool has a record for it."""
    architecture(config)


def gguf_architecture(config: dict) -> str:
    """The ``general.architecture`` llama.cpp uses for this Hugging Face config."""
    return architecture(config).name


# -- tensor names ----------------------------------------------------------------------------------
_HF_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


@functools.cache
def _name_tables(record: Architecture) -> tuple[dict[str, str], dict[str, str]]:
    """HF -> GGUF and GGUF -> HF names with block number 0, from gguf-py's TensorNameMap."""
    name_map = gguf.get_tensor_name_map(record.gguf_arch, 1)
    forward: dict[str, str] = {}
    for module in (*_GLOBAL_MODULES, *(f"model.layers.0.{m}" for m in record.block_modules)):
        gguf_name = name_map.get_name(module)
        if gguf_name is None and module == "lm_head":
            continue   # always tied in llama.cpp (Gemma 2): an lm_head tensor then has no GGUF name
        if gguf_name is None:   # a record naming a module gguf-py does not have for the architecture
            raise AssertionError(f"gguf-py has no {record.name} tensor for {module}")
        for suffix in (".weight", ".bias"):
            forward[module + suffix] = gguf_name + suffix
    for stored, known in record.hf_aliases:
        forward[f"model.layers.0.{stored}"] = forward.pop(f"model.layers.0.{known}")
    return forward, {gguf_name: hf for hf, gguf_name in forward.items()}


def _renamed(name: str, table: dict[str, str], block_re: re.Pattern, block_prefix: str) -> str | None:
    if name in table:
        return table[name]
    match = block_re.match(name)
    if match is None:
        return None
    mapped = table.get(f"{block_prefix}0.{match.group(2)}")
    if mapped is None:
        return None
    prefix, _, rest = mapped.partition(".0.")
    return f"{prefix}.{match.group(1)}.{rest}"


# One expert's matrix of a mixture of experts, as checkpoints store it: ``...experts.3.w1.weight``.
_EXPERT_RE = re.compile(r"^(.+\.experts)\.(\d+)\.([^.]+\.(?:weight|bias))$")


def merged_expert_name(name: str) -> tuple[str, int] | None:
    """``model.layers.0.mlp.experts.3.gate_proj.weight`` -> (``model.layers.0.mlp.experts.gate_proj.weight``,
    3): the merged tensor llama.cpp stores every expert of that matrix in (ffn_*_exps, experts first)
    and this expert's index in it; None for a tensor that is not one expert's."""
    match = _EXPERT_RE.match(name)
    return (f"{match.group(1)}.{match.group(3)}", int(match.group(2))) if match else None


def expert_parts(name: str) -> tuple[str, int, str] | None:
    """``model.layers.0.mlp.experts.3.gate_proj.weight`` -> (``model.layers.0.mlp.experts``, 3,
    ``gate_proj.weight``); None for a tensor that is not one expert's."""
    match = _EXPERT_RE.match(name)
    return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def expert_name(merged: str, index: int) -> str:
    """Inverse of :func:`merged_expert_name`: expert ``index``'s tensor of a merged name."""
    head, _, tail = merged.rpartition(".experts.")
    return f"{head}.experts.{index}.{tail}"


def gguf_split(name: str, config: dict) -> GGUFSplit | None:
    """The split llama.cpp stores this Hugging Face tensor as (see GGUFSplit), or None."""
    match = _HF_BLOCK_RE.match(name)
    record = block_record(config)
    if match is None or record is None:
        return None
    return next((split for split in record.splits if match.group(2) == f"{split.module}.weight"), None)


def split_names(name: str, config: dict) -> tuple[str, ...]:
    """The Hugging Face-style names of the pieces of a split tensor (``...self_attn.k_b_proj.weight``),
    in ``split.parts`` order; their GGUF names come from :func:`hf_to_gguf_name`."""
    split = gguf_split(name, config)
    if split is None:
        return ()
    layer = _HF_BLOCK_RE.match(name).group(1)
    return tuple(f"model.layers.{layer}.{part}.weight" for part in split.parts)


def joined_name(name: str, config: dict) -> tuple[str, int] | None:
    """Inverse of :func:`split_names`: (the split tensor's name, this piece's index), or None for a
    tensor that is not a piece of one."""
    match = _HF_BLOCK_RE.match(name)
    record = block_record(config)
    if match is None or record is None:
        return None
    for split in record.splits:
        for index, part in enumerate(split.parts):
            if match.group(2) == f"{part}.weight":
                return f"model.layers.{match.group(1)}.{split.module}.weight", index
    return None


def hf_to_gguf_name(name: str, model_type: str = "llama") -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (one expert's matrix -> the
    merged ``blk.3.ffn_gate_exps.weight``); Unsupported if unknown."""
    record = architecture({"model_type": model_type})
    merged = merged_expert_name(name) if record.is_moe else None
    gguf_name = _renamed(merged[0] if merged else name, _name_tables(record)[0], _HF_BLOCK_RE, "model.layers.")
    if gguf_name is None:
        raise Unsupported(f"tensor {name!r} has no GGUF name in the {model_type} layout qtool writes")
    return gguf_name


def gguf_to_hf_name(name: str, arch: str = "llama", metadata: dict | None = None) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (merged experts: the merged
    name, see :func:`merged_expert_name`); Unsupported if unknown. ``metadata``: the file's, which tells
    a mixture of experts from the dense architecture of the same name."""
    record = gguf_record(arch, metadata)
    hf_name = _renamed(name, _name_tables(record)[1], _GGUF_BLOCK_RE, "blk.")
    if hf_name is None:
        raise Unsupported(f"GGUF tensor {name!r} is not part of the {arch} layout qtool reads")
    return hf_name


# -- tensor transforms -----------------------------------------------------------------------------
def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face q/k rows -> llama.cpp order (pass n_head_kv for k).

    Hugging Face rotates the two halves of each head (rotate_half); llama.cpp's NORM rope works on
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
    if not architecture(config).permute_qk or not hf_name.endswith(".weight"):
        return None
    if ".self_attn.q_proj." in hf_name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in hf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def norm_offset(hf_name: str, config: dict) -> float:
    """What llama.cpp adds to this tensor (Gemma's norms are stored as ``1 + weight``), else 0."""
    offset = architecture(config).norm_offset
    return offset if offset and hf_name.endswith("norm.weight") else 0.0


def to_gguf(hf_name: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    """A Hugging Face tensor as llama.cpp's converter stores it (before quantization)."""
    heads = qk_heads(hf_name, config)
    if heads is not None:
        tensor = permute_qk(tensor, heads)
    offset = norm_offset(hf_name, config)
    return tensor + offset if offset else tensor


def from_gguf(hf_name: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    """Inverse of :func:`to_gguf`: a (dequantized) GGUF tensor in Hugging Face layout."""
    heads = qk_heads(hf_name, config)
    if heads is not None:
        tensor = unpermute_qk(tensor, heads)
    offset = norm_offset(hf_name, config)
    return tensor - offset if offset else tensor


# -- metadata --------------------------------------------------------------------------------------
def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


def _rope_theta(config: dict) -> float:
    # transformers >= 5 nests it in rope_parameters; older config.json files have it top level.
    params = config.get("rope_parameters") or {}
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]   # per layer type (Gemma 3): the full-attention layers' base
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def _rope_theta_swa(config: dict) -> float | None:
    # The sliding-window layers' base (Gemma 3): nested in transformers >= 5, rope_local_base_freq before.
    params = config.get("rope_parameters") or {}
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if isinstance(local, dict) and "rope_theta" in local:
        return float(local["rope_theta"])
    return float(config["rope_local_base_freq"]) if config.get("rope_local_base_freq") else None


def _rope_scaling(config: dict) -> dict:
    scaling = config.get("rope_scaling") or {}
    params = config.get("rope_parameters") or {}
    if not scaling and isinstance(params, dict) and params.get("rope_type", "default") != "default":
        scaling = params
    return scaling if isinstance(scaling, dict) else {}


def _llama3_rope_factors(config: dict, scaling: dict) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: per rotary frequency, the divisor Llama 3's rope scaling applies
    (1 for short wavelengths, ``factor`` for long ones, a smooth blend between), in float32."""
    import torch

    dim = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
    base = float(scaling.get("rope_theta", _rope_theta(config)))
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    context = float(scaling.get("original_max_position_embeddings", 8192))
    frequencies = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelengths = 2 * math.pi / frequencies
    smooth = (context / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelengths < context / high, torch.ones_like(blended),
                       torch.where(wavelengths > context / low, torch.full_like(blended, factor), blended))


def gguf_extra_tensors(config: dict) -> dict[str, torch.Tensor]:
    """Tensors llama.cpp reads that no checkpoint weight holds, computed from the config as its converter
    does: Llama 3's rope factors, Phi-3's long / short rope factors (longrope). GGUF name -> float32."""
    import torch

    scaling = _rope_scaling(config)
    scaling = scaling.get("full_attention", scaling) if isinstance(scaling.get("full_attention"), dict) else scaling
    rope_type = str(scaling.get("rope_type") or scaling.get("type") or "").lower()
    if rope_type == "llama3":
        return {"rope_freqs.weight": _llama3_rope_factors(config, scaling)}
    if rope_type in ("longrope", "su") and scaling.get("long_factor") and scaling.get("short_factor"):
        return {"rope_factors_long.weight": torch.tensor(scaling["long_factor"], dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(scaling["short_factor"], dtype=torch.float32)}
    return {}


def gguf_metadata_from_hf(config: dict) -> Metadata:
    """The ``general.architecture`` and ``{arch}.*`` keys llama.cpp's converter writes.

    Python ints are UINT32 and floats FLOAT32 in GGUF (as llama.cpp writes them).
    """
    record = architecture(config)
    arch = record.name
    hidden = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    head_dim = _head_dim(config)
    metadata: Metadata = {
        Keys.General.ARCHITECTURE: arch,
        _key(Keys.LLM.BLOCK_COUNT, arch): int(config["num_hidden_layers"]),
        _key(Keys.LLM.CONTEXT_LENGTH, arch): int(config.get("max_position_embeddings", 2048)),
        _key(Keys.LLM.EMBEDDING_LENGTH, arch): hidden,
        _key(Keys.LLM.FEED_FORWARD_LENGTH, arch): int(config["intermediate_size"]),
        _key(Keys.Attention.HEAD_COUNT, arch): n_head,
        _key(Keys.Attention.HEAD_COUNT_KV, arch): int(config.get("num_key_value_heads") or n_head),
        _key(Keys.Rope.FREQ_BASE, arch): _rope_theta(config),
        **({_key(Keys.Attention.LAYERNORM_EPS, arch): float(config.get("norm_epsilon", 1e-5))} if record.layer_norm
           else {_key(Keys.Attention.LAYERNORM_RMS_EPS, arch): float(config.get("rms_norm_eps", 1e-6))}),
        _key(Keys.LLM.VOCAB_SIZE, arch): int(config["vocab_size"]),
    }
    if record.writes_rope_dims:
        metadata[_key(Keys.Rope.DIMENSION_COUNT, arch)] = head_dim
    if (rope_theta_swa := _rope_theta_swa(config)) is not None:
        metadata[_key(Keys.Rope.FREQ_BASE_SWA, arch)] = rope_theta_swa
    # The converter writes these whenever config.json names head_dim; llama.cpp needs them when it
    # differs from hidden / heads.
    if (record.writes_head_dim and config.get("head_dim")) or head_dim != hidden // n_head:
        metadata[_key(Keys.Attention.KEY_LENGTH, arch)] = head_dim
        metadata[_key(Keys.Attention.VALUE_LENGTH, arch)] = head_dim
    scaling = _rope_scaling(config)
    rope_type = scaling.get("rope_type") or scaling.get("type")
    if rope_type in ("linear", "yarn") and scaling.get("factor"):
        metadata[_key(Keys.Rope.SCALING_TYPE, arch)] = rope_type
        metadata[_key(Keys.Rope.SCALING_FACTOR, arch)] = float(scaling["factor"])
        if rope_type == "yarn" and scaling.get("original_max_position_embeddings"):
            metadata[_key(Keys.Rope.SCALING_ORIG_CTX_LEN, arch)] = int(scaling["original_max_position_embeddings"])
        if rope_type == "yarn":   # the converter passes YaRN's own parameters on where the config sets them
            for template, fields in _YARN_KEYS:
                value = next((scaling[f] for f in fields if scaling.get(f) is not None), None)
                if value is not None:
                    metadata[_key(template, arch)] = float(value)
    if record.is_moe:
        metadata.update(_moe_metadata(config, arch))
    if record.extra_metadata is not None:
        metadata.update(record.extra_metadata(config, arch))
    return metadata


_YARN_KEYS = ((Keys.Rope.SCALING_YARN_EXT_FACTOR, ("extrapolation_factor",)),
              (Keys.Rope.SCALING_YARN_ATTN_FACTOR, ("attention_factor", "attn_factor")),
              (Keys.Rope.SCALING_YARN_BETA_FAST, ("beta_fast",)),
              (Keys.Rope.SCALING_YARN_BETA_SLOW, ("beta_slow",)))


# config.json -> GGUF keys of a mixture of experts, each from the first field a config has (the names the
# converter looks for); the expert sizes only where the config gives them (Qwen-MoE, not Mixtral).
_MOE_KEYS = ((Keys.LLM.EXPERT_COUNT, ("num_local_experts", "num_experts", "n_routed_experts")),
             (Keys.LLM.EXPERT_USED_COUNT, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")),
             (Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, ("moe_intermediate_size",)),
             (Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, ("shared_expert_intermediate_size",)))


def _moe_metadata(config: dict, arch: str) -> Metadata:
    metadata: Metadata = {}
    for template, fields in _MOE_KEYS:
        value = next((config[f] for f in fields if config.get(f) is not None), None)
        if value is not None:
            metadata[_key(template, arch)] = int(value)
    return metadata


def _moe_config(metadata: dict, arch: str, record: Architecture) -> dict:
    config: dict[str, Any] = {record.expert_count_field: int(_require(metadata, _key(Keys.LLM.EXPERT_COUNT, arch))),
                              "num_experts_per_tok": int(_require(metadata, _key(Keys.LLM.EXPERT_USED_COUNT, arch)))}
    for template, (field_name,) in _MOE_KEYS[2:]:   # the expert sizes, back into their one config field
        if metadata.get(_key(template, arch)):
            config[field_name] = int(metadata[_key(template, arch)])
    return config


def gguf_deviations(config: dict) -> list[str]:
    """The config.json fields of ``config`` that differ from what llama.cpp computes for its architecture
    (``field=value (llama.cpp: value)``): such a GGUF runs, but not as the checkpoint does in transformers."""
    record = architecture(config)
    found = [f"{name}={config[name]!r} (llama.cpp: {value!r})" for name, value in record.hf_fixed.items()
             if name in config and config[name] != value]
    scaling = _rope_scaling(config)
    if (scaling.get("rope_type") or scaling.get("type")) == "yarn" and scaling.get("truncate") is False:
        found.append("rope_parameters.truncate=False (llama.cpp: True, it rounds YaRN's ramp to whole dimensions)")
    return found


def _require(metadata: dict, key: str) -> Any:
    if key not in metadata:
        raise CorruptFile(f"GGUF metadata lacks {key!r}; the file was not written by a llama.cpp-style converter")
    return metadata[key]


# Llama 3.x rope scaling as its checkpoints set it (factor aside): (low_freq_factor, high_freq_factor,
# original_max_position_embeddings) tried, in order, to recognise a GGUF's rope_freqs.
_LLAMA3_ROPE_CANDIDATES = tuple((low, high, context) for context in (8192, 4096, 16384, 2048, 1024)
                                for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)))


def _rope_from_computed(computed: dict[str, Any], config: dict) -> tuple[dict | None, list[str]]:
    """The ``rope_parameters`` the GGUF-only rope tensors (``gguf_extra_tensors``) were computed from,
    and the names of those that say nothing qtool can put in a config."""
    theta = float(config["rope_theta"])
    if "rope_factors_long.weight" in computed and "rope_factors_short.weight" in computed:
        original = int(config.get("original_max_position_embeddings") or config["max_position_embeddings"])
        return ({"rope_type": "longrope", "rope_theta": theta, "original_max_position_embeddings": original,
                 "long_factor": [float(v) for v in computed["rope_factors_long.weight"].flatten().tolist()],
                 "short_factor": [float(v) for v in computed["rope_factors_short.weight"].flatten().tolist()]},
                [name for name in computed if name not in ("rope_factors_long.weight", "rope_factors_short.weight")])
    if "rope_freqs.weight" in computed:
        import torch

        stored = computed["rope_freqs.weight"].flatten().to(torch.float32)
        for low, high, context in _LLAMA3_ROPE_CANDIDATES:
            scaling = {"rope_type": "llama3", "rope_theta": theta, "factor": float(stored.max()),
                       "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": context}
            candidate = _llama3_rope_factors(config, scaling)
            if candidate.shape == stored.shape and torch.allclose(candidate, stored, rtol=1e-6, atol=0):
                return scaling, [name for name in computed if name != "rope_freqs.weight"]
    return None, list(computed)


def hf_config_from_gguf(metadata: dict, *, tensor_names: Iterable[str] | None = None,
                        computed: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Hugging Face config.json dict for a GGUF's metadata.

    ``tensor_names`` (GGUF names) decide ``tie_word_embeddings`` (tied when there is no
    ``output.weight``: llama.cpp then uses ``token_embd.weight`` as the output matrix) and the
    attention biases. ``computed``: the file's GGUF-only rope tensors (name -> values), from which
    Llama 3's and longrope's scaling go back into ``rope_parameters``; the names it could not use are
    in the config's ``_unused_gguf_tensors``.
    """
    record = gguf_record(metadata.get(Keys.General.ARCHITECTURE), metadata)
    arch = record.name if metadata.get(Keys.General.ARCHITECTURE) != "mistral" else "mistral"
    model_type = record.model_types[0] if arch != "mistral" else "mistral"
    class_name = record.hf_class if arch != "mistral" else "MistralForCausalLM"

    def key(template: str) -> str:
        return _key(template, arch)

    hidden = int(_require(metadata, key(Keys.LLM.EMBEDDING_LENGTH)))
    n_head = int(_require(metadata, key(Keys.Attention.HEAD_COUNT)))
    n_head_kv = int(metadata.get(key(Keys.Attention.HEAD_COUNT_KV), n_head))
    if n_head <= 0 or n_head_kv <= 0 or hidden <= 0 or n_head % n_head_kv:
        raise CorruptFile(f"GGUF metadata has inconsistent sizes: {hidden=} {n_head=} {n_head_kv=}")
    head_dim = int(metadata.get(key(Keys.Attention.KEY_LENGTH)) or hidden // n_head)
    vocab_size = metadata.get(key(Keys.LLM.VOCAB_SIZE))
    if vocab_size is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        vocab_size = len(tokens) if tokens is not None else None
    if vocab_size is None:
        raise CorruptFile("GGUF metadata gives no vocabulary size (no vocab_size key, no tokenizer tokens)")
    rope_theta = float(metadata.get(key(Keys.Rope.FREQ_BASE), 10000.0))
    names = set(tensor_names) if tensor_names is not None else set()
    config: dict[str, Any] = {
        "architectures": [class_name],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_require(metadata, key(Keys.LLM.FEED_FORWARD_LENGTH))),
        "num_hidden_layers": int(_require(metadata, key(Keys.LLM.BLOCK_COUNT))),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": record.hidden_act,
        "rms_norm_eps": float(metadata.get(key(Keys.Attention.LAYERNORM_RMS_EPS), 1e-6)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(metadata.get(key(Keys.LLM.CONTEXT_LENGTH), 2048)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": tensor_names is not None and "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        # Dequantized GGUF tensors come out as float32 (see GGUFSource.load).
        "torch_dtype": "float32",
        "dtype": "float32",
        **record.hf_fixed,
    }
    scaling_type = metadata.get(key(Keys.Rope.SCALING_TYPE))
    factor = metadata.get(key(Keys.Rope.SCALING_FACTOR))
    if scaling_type in ("linear", "yarn") and factor:
        scaling = {"rope_type": scaling_type, "factor": float(factor), "rope_theta": rope_theta}
        original = metadata.get(key(Keys.Rope.SCALING_ORIG_CTX_LEN))
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        if scaling_type == "yarn":
            for template, fields in _YARN_KEYS:
                if metadata.get(key(template)) is not None:
                    scaling[fields[0]] = float(metadata[key(template)])
        config["rope_scaling"] = dict(scaling, type=scaling_type)
        config["rope_parameters"] = scaling
    if record.layer_norm:
        config["norm_epsilon"] = float(metadata.get(key(Keys.Attention.LAYERNORM_EPS), 1e-5))
        config["use_bias"] = config["attention_bias"]
    if record.is_moe:
        config.update(_moe_config(metadata, arch, record))
    if record.extra_config is not None:
        config.update(record.extra_config(metadata, arch, config))
    for gguf_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
        value = metadata.get(f"tokenizer.ggml.{gguf_key}")
        if value is not None:
            config[hf_key] = int(value)
    name = metadata.get(Keys.General.NAME)
    if name:
        config["_name_or_path"] = str(name)
    if computed:
        rope, unused = _rope_from_computed(computed, config)
        if rope is not None:
            config["rope_parameters"] = rope
            config.pop("rope_scaling", None)
        if unused:
            config["_unused_gguf_tensors"] = unused
    return config


def size_label(shapes: Iterable[Iterable[int]], expert_shapes: Iterable[Iterable[int]] = ()) -> str:
    """``general.size_label`` as llama.cpp's converter writes it: ``135M`` for a dense model, ``4x1.2M``
    for a mixture of experts (``expert_shapes``: the merged expert tensors, experts first; a label
    counts one expert of each and everything else)."""
    shared = sum(math.prod(shape) for shape in shapes)
    merged = [tuple(shape) for shape in expert_shapes]
    per_expert = sum(math.prod(shape) // shape[0] for shape in merged)
    count = sum(shape[0] for shape in merged) // len(merged) if merged else 0
    return gguf.size_label(shared + sum(math.prod(s) for s in merged), shared, per_expert, count)
