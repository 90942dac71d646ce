"""Random Llama (and Mixtral: a Llama whose MLPs are mixtures of experts) checkpoints in Hugging Face
layout, for tests and benchmarks.

Tensors are generated and written one at a time straight into the safetensors files (the
header is computed up front from the shapes), so a 1.1B model needs about one embedding
matrix of memory, not the whole model.
"""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from qtool.errors import BadArgument

SHAPES: dict[str, dict[str, int]] = {
    # Small enough for unit tests; the vocabulary fits the SmolLM2 tokenizer (49152 tokens).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 vocab_size=49152),
    # TinyLlama-1.1B's shape.
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                 vocab_size=32000),
    # Llama-3-8B's shape (benchmarks/bench_gpu_e2e.py).
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
               vocab_size=128256),
    # A Mixtral of about 1B parameters: 8 blocks of 16 experts, 2 per token (benchmarks/bench_gguf_moe.py).
    "moe-1b": dict(hidden_size=1024, intermediate_size=2304, num_layers=8, num_heads=16, num_kv_heads=4,
                   vocab_size=32000, num_experts=16, experts_per_token=2),
}

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
# Weight scale of the random Linear/embedding matrices (the usual initializer_range).
_INIT_STD = 0.02


def _tensor_specs(*, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                  num_kv_heads: int, vocab_size: int, tie_word_embeddings: bool = False,
                  num_experts: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = hidden_size // num_heads
    # A mixture of experts stores one matrix per expert, as Mixtral checkpoints do, and the router.
    mlps = ["mlp"] if not num_experts else [f"block_sparse_moe.experts.{e}" for e in range(num_experts)]
    gate_up_down = ("gate_proj", "up_proj", "down_proj") if not num_experts else ("w1", "w3", "w2")
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab_size, hidden_size))]
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}"
        specs += [
            (f"{prefix}.input_layernorm.weight", (hidden_size,)),
            (f"{prefix}.self_attn.q_proj.weight", (num_heads * head_dim, hidden_size)),
            (f"{prefix}.self_attn.k_proj.weight", (num_kv_heads * head_dim, hidden_size)),
            (f"{prefix}.self_attn.v_proj.weight", (num_kv_heads * head_dim, hidden_size)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden_size, num_heads * head_dim)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden_size,)),
        ]
        if num_experts:
            specs.append((f"{prefix}.block_sparse_moe.gate.weight", (num_experts, hidden_size)))
        gate, up, down = gate_up_down
        for mlp in mlps:
            specs += [
                (f"{prefix}.{mlp}.{gate}.weight", (intermediate_size, hidden_size)),
                (f"{prefix}.{mlp}.{up}.weight", (intermediate_size, hidden_size)),
                (f"{prefix}.{mlp}.{down}.weight", (hidden_size, intermediate_size)),
            ]
    specs.append(("model.norm.weight", (hidden_size,)))
    if not tie_word_embeddings:
        specs.append(("lm_head.weight", (vocab_size, hidden_size)))
    return specs


def _make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if len(shape) == 1:
        # RMSNorm weights near 1, so activations keep their scale through the layers.
        values = 1.0 + 0.1 * torch.randn(shape, generator=generator)
    else:
        values = _INIT_STD * torch.randn(shape, generator=generator)
    return values.to(dtype)


def _split_shards(sizes: list[int], shards: int) -> list[list[int]]:
    """Contiguous runs of tensor indices, one per shard, of roughly equal bytes, none empty."""
    if shards > len(sizes):
        raise BadArgument(f"shards={shards} is more than the {len(sizes)} tensors can fill")
    target = sum(sizes) / shards
    groups: list[list[int]] = [[]]
    running = 0
    for index, size in enumerate(sizes):
        shards_left = shards - len(groups)
        if groups[-1] and shards_left > 0 and (running >= target * len(groups)
                                               or len(sizes) - index <= shards_left):
            groups.append([])
        groups[-1].append(index)
        running += size
    return groups


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _write_safetensors(path: Path, names: list[str], shapes: list[tuple[int, ...]], dtype: torch.dtype,
                       make: Callable[[str, tuple[int, ...]], torch.Tensor]) -> int:
    """Write one safetensors file, generating tensors one by one; returns the data bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in zip(names, shapes):
        size = itemsize * _numel(shape)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # safetensors pads the header with spaces so the data starts 8-byte aligned.
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape in zip(names, shapes):
            tensor = make(name, shape).contiguous()
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset


def synthetic_parameters(*, tie_word_embeddings: bool = False, experts_per_token: int = 0, **shape: int) -> int:
    """The parameter count of :func:`write_synthetic_llama`'s checkpoint of that shape."""
    return sum(_numel(dims) for _, dims in _tensor_specs(**shape, tie_word_embeddings=tie_word_embeddings))


def write_synthetic_llama(out_dir: Path, *, hidden_size: int, intermediate_size: int, num_layers: int,
                          num_heads: int, num_kv_heads: int, vocab_size: int, dtype: torch.dtype = torch.bfloat16,
                          shards: int = 1, seed: int = 0, tie_word_embeddings: bool = False,
                          tokenizer_from: Path | None = None, num_experts: int = 0,
                          experts_per_token: int = 2) -> Path:
    """Write a random Llama checkpoint (config, safetensors, index, generation config, tokenizer) to out_dir;
    with ``num_experts``, a Mixtral (that many experts per block, ``experts_per_token`` routed).

    ``shards == 1`` writes ``model.safetensors``; more writes ``model-0000X-of-0000N.safetensors``
    plus ``model.safetensors.index.json``, as transformers does.
    """
    if dtype not in _SAFETENSORS_DTYPES:
        raise BadArgument(f"dtype {dtype} is not one of {', '.join(str(d) for d in _SAFETENSORS_DTYPES)}")
    if hidden_size % num_heads or num_heads % num_kv_heads or (hidden_size // num_heads) % 2:
        raise BadArgument(f"hidden_size {hidden_size} / num_heads {num_heads} / num_kv_heads {num_kv_heads} "
                          "do not give an even head size shared by the kv heads")
    if shards < 1:
        raise BadArgument(f"shards must be at least 1, got {shards}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = _tensor_specs(hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=vocab_size,
                          tie_word_embeddings=tie_word_embeddings, num_experts=num_experts)
    seeds = {name: seed * 1_000_003 + index for index, (name, _) in enumerate(specs)}

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return _make_tensor(name, shape, dtype, seeds[name])

    itemsize = torch.empty((), dtype=dtype).element_size()
    groups = _split_shards([itemsize * _numel(shape) for _, shape in specs], shards)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for shard_index, group in enumerate(groups):
        file_name = ("model.safetensors" if shards == 1
                     else f"model-{shard_index + 1:05d}-of-{shards:05d}.safetensors")
        names = [specs[i][0] for i in group]
        total_bytes += _write_safetensors(out_dir / file_name, names, [specs[i][1] for i in group], dtype, make)
        weight_map.update({name: file_name for name in names})
    if shards > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    dtype_name = str(dtype).removeprefix("torch.")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": hidden_size // num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": _INIT_STD,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": dtype_name,
    }
    if num_experts:
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=num_experts,
                      num_experts_per_tok=experts_per_token)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_from is not None:
        copied = 0
        for name in _TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copyfile(Path(tokenizer_from) / name, out_dir / name)
                copied += 1
        if not copied:
            raise BadArgument(f"tokenizer_from {tokenizer_from} has no tokenizer files")
    return out_dir
