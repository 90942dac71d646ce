"""Helpers for the safetensors sink and loader tests: drive a sink over a source, and build the
reference model from qtool's own dequantized weights."""
from __future__ import annotations

from pathlib import Path

import torch

from qtool.plan import Recipe, TensorPlan, build_plan
from qtool.schemes.base import get_scheme
from qtool.sinks.bnb import BnbSink
from qtool.sinks.compressed import CompressedSink
from qtool.sources.resolve import resolve

PROMPT_IDS = [[1, 504, 3458, 282, 5248, 314, 2209, 30, 378, 1345]]


def sink_for_scheme(scheme: str) -> type:
    return BnbSink if get_scheme(scheme).family == "bnb" else CompressedSink


def write_output(source_dir: Path, out: Path, recipe: Recipe, *, force: bool = False,
                 max_shard_size: int | None = None) -> tuple[Path, list[TensorPlan]]:
    """Quantize ``source_dir`` into ``out`` by driving the sink directly, one tensor at a time."""
    with resolve(str(source_dir)) as source:
        plans = build_plan(source.tensors(), recipe, int(source.config.get("num_hidden_layers") or 0))
        options = {"max_shard_size": max_shard_size} if max_shard_size else {}
        sink = sink_for_scheme(recipe.scheme)(out, source, plans, force=force, options=options)
        try:
            for plan in plans:
                sink.add(plan, source.load(plan.name))
            final = sink.finish("# test model card\n")
        except BaseException:
            sink.abort()
            raise
    return final, plans


def dequantized_state(source_dir: Path, plans: list[TensorPlan]) -> dict[str, torch.Tensor]:
    """The source's tensors with every planned weight replaced by qtool's quantize -> dequantize."""
    state = {}
    with resolve(str(source_dir)) as source:
        for plan in plans:
            tensor = source.load(plan.name)
            if not plan.keep:
                scheme = get_scheme(plan.scheme)
                tensor = scheme.dequantize(scheme.quantize(tensor, **plan.params))
            state[plan.name] = tensor
    return state


def reference_model(source_dir: Path, plans: list[TensorPlan], dtype: torch.dtype = torch.bfloat16):
    """transformers model of ``source_dir`` carrying qtool's dequantized weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=dtype)
    missing, unexpected = model.load_state_dict(dequantized_state(source_dir, plans), strict=False)
    assert not unexpected, unexpected
    assert all("lm_head" in name or "rotary" in name for name in missing), missing
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def logits(model, ids=PROMPT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float()
