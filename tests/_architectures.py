"""The tiny random checkpoints every architecture test shares: one entry per dense architecture qtool
supports (and the Llama variants that take their own code paths), built with transformers' own config
classes. Build them through the session fixture ``arch_checkpoint`` (tests/conftest.py), which builds
each (variant, vocabulary) once per test run."""
from __future__ import annotations

import shutil
from pathlib import Path

# Shared by every variant: 2 blocks, 4 heads over 2 KV heads, hidden 64.
SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)

# variant -> (model_type, config fields beyond SIZES): values that make each architecture's own code paths count.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {"tie_word_embeddings": False}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    # Llama 3.x: llama3 rope scaling (llama.cpp takes it as the rope_freqs.weight factors).
    "llama3": ("llama", {"tie_word_embeddings": False, "max_position_embeddings": 8192,
                         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 1024}}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {"embedding_multiplier": 4.0, "residual_multiplier": 0.5, "attention_multiplier": 0.1,
                            "logits_scaling": 2.0}),
    "phi3": ("phi3", {}),
    # Phi-3 128k / Phi-4-mini: longrope (llama.cpp's rope_factors_long / _short tensors and attention factor).
    "phi3-longrope": ("phi3", {"max_position_embeddings": 8192, "original_max_position_embeddings": 1024,
                               "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 1024,
                                                   "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
                                                   "short_factor": [1.0, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 5.0]}}),
    # llama.cpp scales queries by 1/sqrt(head_dim): query_pre_attn_scalar = head_dim.
    "gemma2": ("gemma2", {"head_dim": 16, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 50.0,
                          "final_logit_softcapping": 30.0}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16}),
    "starcoder2": ("starcoder2", {}),
}
# Mixtures of experts (issue #18): 4 experts, 2 per token; Qwen2-MoE with its shared expert. Kept apart
# from VARIANTS, whose tests (calibration, bitsandbytes loads) do not cover experts yet; the GGUF tests
# take both (ALL_VARIANTS).
_DEEPSEEK = dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                 moe_intermediate_size=64, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
                 qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
MOE_VARIANTS: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                "shared_expert_intermediate_size": 128}),
    # Qwen3-MoE checkpoints renormalize the chosen experts' weights (norm_topk_prob, transformers' default
    # is off), which llama.cpp always does for qwen3moe.
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                "head_dim": 16, "norm_topk_prob": True}),
    # DeepSeek-V2 / V3: multi-head latent attention (llama.cpp needs q_lora_rank in a file this shallow), a
    # dense first layer, a shared expert; V3 routes with a sigmoid over expert groups and its correction
    # bias (made non-zero in build_checkpoint). Their config.json files name the scoring function.
    "deepseek_v2": ("deepseek_v2", {**_DEEPSEEK, "scoring_func": "softmax"}),
    "deepseek_v3": ("deepseek_v3", {**_DEEPSEEK, "n_group": 2, "topk_group": 1, "scoring_func": "sigmoid"}),
    # gpt-oss: experts stored fused with biases (intermediate 96: no fused shape is square), sinks, a
    # sliding window shorter than the prompts; YaRN with truncate on, as llama.cpp always computes it.
    "gpt_oss": ("gpt_oss", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 96,
                            "head_dim": 16, "sliding_window": 4, "max_position_embeddings": 4096,
                            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True,
                                                "original_max_position_embeddings": 4096}}),
}
ALL_VARIANTS: dict[str, tuple[str, dict]] = {**VARIANTS, **MOE_VARIANTS}
ARCH_VARIANTS = list(VARIANTS)
# One variant per model_type (the Llama variants beyond the first only where their own path matters).
# Variants whose rope scaling the tests must see: their queries and keys are scaled up, so attention
# is sharp enough that a rotary frequency left unscaled changes the logits (random weights attend
# almost uniformly otherwise, whatever the positions).
SHARP_ATTENTION = {"llama3": 8.0, "phi3-longrope": 8.0}
MODEL_TYPES = [name for name in VARIANTS if name not in ("llama-tied", "llama3", "phi3-longrope")]


def build_checkpoint(variant: str, folder: Path, *, tokenizer_from: Path | None, vocab_size: int,
                     overrides: dict | None = None) -> Path:
    """A random float32 ``variant`` model saved as transformers saves it, with the tokenizer of
    ``tokenizer_from`` copied beside it when given; ``overrides``: config fields changed from the variant's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = ALL_VARIANTS[variant]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SIZES, **extra, **(overrides or {})}, vocab_size=vocab_size)
    # eager attention: the one transformers implements Gemma 2's attention soft-capping with.
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(torch.float32).eval()
    with torch.no_grad():   # DeepSeek-V3's routing bias starts at zero: make it count
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
    if variant in SHARP_ATTENTION:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                    parameter.mul_(SHARP_ATTENTION[variant])
    model.save_pretrained(folder)
    if tokenizer_from is not None:
        for path in tokenizer_from.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(path, folder / path.name)
    return folder
