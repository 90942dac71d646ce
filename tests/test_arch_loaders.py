"""Every architecture's safetensors outputs load in the runtimes (transformers + bitsandbytes for NF4 and
int8, + compressed-tensors for int4 and W8A8) with the logits of a model carrying qtool's own dequantized
weights. Tiny random checkpoints of tests/_architectures.py; tests/test_loaders.py covers every scheme
option on the tiny Llama."""
from __future__ import annotations

import pytest
import torch

from qtool.plan import Recipe

from tests._architectures import MODEL_TYPES
from tests._safetensors_helpers import logits, reference_model, write_output

pytest.importorskip("bitsandbytes")
pytest.importorskip("compressed_tensors")

PROMPT_IDS = [[1, 50, 73, 120, 9, 201, 33, 250, 17, 88]]      # within the tiny checkpoints' 256 tokens
# bitsandbytes runs its CPU matmuls in bf16 with its own accumulation order: a few bf16 ulps of the
# largest logit; compressed-tensors decompresses to qtool's weights and runs the same forward.
RELATIVE_TOLERANCE = {"nf4": 0.03, "int8-sym": 0.03, "int4-sym": 1e-6}


def _block_linears(model) -> set[str]:
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name}


@pytest.mark.parametrize("scheme,params", [("nf4", {}), ("int8-sym", {}), ("int4-sym", {"group_size": 32})],
                         ids=["nf4", "int8-sym", "int4-sym"])
@pytest.mark.parametrize("variant", MODEL_TYPES)
def test_output_loads_with_qtools_weights(arch_checkpoint, variant, scheme, params, tmp_path):
    from transformers import AutoModelForCausalLM

    source = arch_checkpoint(variant)
    out, plans = write_output(source, tmp_path / "out", Recipe(scheme=scheme, params=params))
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    reference = reference_model(source, plans, dtype=model.dtype)
    # Every Linear of the decoder blocks is quantized, and nothing else.
    assert {plan.name for plan in plans if not plan.keep} == _block_linears(reference)
    got, expected = logits(model, PROMPT_IDS), logits(reference, PROMPT_IDS)
    assert torch.isfinite(got).all()
    assert float((got - expected).abs().max()) <= RELATIVE_TOLERANCE[scheme] * float(expected.abs().max())


@pytest.mark.parametrize("variant", MODEL_TYPES)
def test_w8a8_output_runs_as_qtool_evaluates_it(arch_checkpoint, variant, tmp_path):
    """W8A8 with per-token dynamic inputs (no calibration): compressed-tensors' runtime and qtool's
    evaluator (qtool's dequantized weights, inputs quantized as the file says) give the same logits."""
    from transformers import AutoModelForCausalLM

    from qtool.evaluation.model import load_causal_lm
    from qtool.pipeline import QuantizeOptions, quantize

    out = tmp_path / "w8a8"
    recipe = Recipe(scheme="w8a8", params={"act_strategy": "token"})
    # SmolLM2's tokenizer: the evaluator loads one.
    quantize(str(arch_checkpoint(variant, 49152)), out, recipe, QuantizeOptions(calib="/nonexistent"))   # never read
    runtime = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    ours = load_causal_lm(str(out), dtype="fp32", device="cpu").model     # the checkpoint's dtype, as the runtime's
    hooked = {f"{name}.weight" for name, module in ours.named_modules() if module._forward_pre_hooks}
    assert hooked == _block_linears(ours)
    got, expected = logits(runtime, PROMPT_IDS), logits(ours, PROMPT_IDS)
    assert torch.isfinite(got).all()
    assert float((got - expected).abs().max()) <= 1e-5 * max(1.0, float(expected.abs().max()))
