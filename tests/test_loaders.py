"""The real runtimes load qtool's safetensors outputs as they are.

transformers + bitsandbytes (CPU) for nf4 / fp4 / int8-sym, transformers + compressed-tensors
(decompressed on CPU) for int8-asym / int4-sym / int4-asym. The loaded weights must be exactly
qtool's dequantized weights, and the logits on a prompt must match a plain model built from
those weights.
"""
from __future__ import annotations

import pytest
import torch

from qtool.plan import Recipe

from tests._safetensors_helpers import logits, reference_model, write_output

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytest.importorskip("compressed_tensors")

PROMPT = "The capital of France is Paris. The capital of Italy is"
# bitsandbytes runs its CPU matmuls in bf16 with its own accumulation order, so logits (about
# +-1 on this model) differ from the reference's bf16 forward by a few bf16 ulps, never more.
BNB_MAX_ABS_DIFF = 0.03
# compressed-tensors decompresses to exactly qtool's dequantized weights: same forward, same logits.
CT_MAX_ABS_DIFF = 0.0


def load(out, scheme):
    from transformers import AutoModelForCausalLM

    if scheme == "int4-asym":
        # compressed-tensors 0.20 + transformers cannot load *packed* zero points into the empty
        # model (it allocates them unpacked, a known upstream bug, llm-compressor#1618); its
        # dequantize-on-load path reads them.
        from transformers import CompressedTensorsConfig

        return AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    return AutoModelForCausalLM.from_pretrained(out, device_map="cpu")


@pytest.mark.parametrize("scheme,params", [
    ("nf4", {}), ("nf4", {"double_quant": False, "block_size": 32}), ("fp4", {}), ("int8-sym", {}),
    ("int8-asym", {}), ("int4-sym", {"group_size": 32}), ("int4-asym", {"group_size": 64}),
])
def test_transformers_loads_output(tiny_llama_dir, tmp_path, scheme, params):
    from transformers import AutoTokenizer

    out, plans = write_output(tiny_llama_dir, tmp_path / "out", Recipe(scheme=scheme, params=params))
    model = load(out, scheme).eval()
    reference = reference_model(tiny_llama_dir, plans)
    quantized = [plan for plan in plans if not plan.keep]
    assert len(quantized) == 14
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT)["input_ids"]
    bnb_scheme = scheme in ("nf4", "fp4", "int8-sym")
    if bnb_scheme:
        # bitsandbytes repacks CPU weights on the first forward pass: compare before it.
        assert_loaded_weights(model, reference, quantized, scheme)
    got, expected = logits(model, [ids]), logits(reference, [ids])
    if not bnb_scheme:
        # compressed-tensors decompresses on the first forward pass: compare after it.
        assert_loaded_weights(model, reference, quantized, scheme)
    assert torch.isfinite(got).all()
    limit = BNB_MAX_ABS_DIFF if bnb_scheme else CT_MAX_ABS_DIFF
    assert float((got - expected).abs().max()) <= limit


def assert_loaded_weights(model, reference, quantized, scheme):
    import bitsandbytes as bnb

    reference_state = reference.state_dict()
    for plan in quantized:
        module = model.get_submodule(plan.name[: -len(".weight")])
        if scheme in ("nf4", "fp4"):
            assert isinstance(module, bnb.nn.Linear4bit)
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif scheme == "int8-sym":
            assert isinstance(module, bnb.nn.Linear8bitLt)
            weight = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB).to(torch.bfloat16)
        else:
            weight = module.weight.data
        assert torch.equal(weight.reshape(plan.shape).to(torch.bfloat16), reference_state[plan.name]), plan.name


def test_kept_linear_layers_stay_dense(tiny_llama_dir, tmp_path):
    """A skip rule keeps a decoder Linear in bf16; both runtimes must load it as a plain Linear."""
    from transformers import AutoModelForCausalLM

    for scheme in ("nf4", "int4-sym"):
        recipe = Recipe(scheme=scheme, params={"group_size": 32}, skip=["*.mlp.down_proj.weight"])
        out, plans = write_output(tiny_llama_dir, tmp_path / scheme, recipe)
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
        assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
        assert type(model.model.layers[0].mlp.up_proj) is not torch.nn.Linear or scheme == "int4-sym"
        reference = reference_model(tiny_llama_dir, plans)
        assert torch.equal(model.model.layers[1].mlp.down_proj.weight, reference.model.layers[1].mlp.down_proj.weight)
        diff = float((logits(model) - logits(reference)).abs().max())
        assert diff <= (BNB_MAX_ABS_DIFF if scheme == "nf4" else CT_MAX_ABS_DIFF)


@pytest.mark.slow
def test_smollm2_nf4_end_to_end(tmp_path):
    """The packaged SmolLM2 through the whole pipeline to NF4; transformers + bitsandbytes load it,
    its logits match qtool's dequantized model and it still predicts sensible English."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtool.pipeline import QuantizeOptions, quantize
    from qtool.sources.resolve import resolve

    report = quantize("smollm2-135m", tmp_path / "nf4", Recipe(scheme="nf4"), QuantizeOptions())
    out = tmp_path / "nf4"
    assert 4.0 < report.bits_per_weight_quantized < 4.3   # NF4 + double quant: 4.127 bits
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is")["input_ids"]
    import bitsandbytes as bnb

    down = model.model.layers[5].mlp.down_proj
    loaded_down = bnb.functional.dequantize_4bit(down.weight.data, down.weight.quant_state)
    got = logits(model, [ids])
    # Reference: the GGUF's float weights with qtool's NF4 round trip, in a plain model.
    from qtool.schemes.base import get_scheme

    with resolve("smollm2-135m") as source:
        config = transformers.AutoConfig.from_pretrained(out)
        config.quantization_config = None
        del config.quantization_config
        reference = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
        state = {}
        for info in source.tensors():
            tensor = source.load(info.name)
            if info.name.startswith("model.layers.") and tensor.dim() == 2:
                tensor = get_scheme("nf4").dequantize(get_scheme("nf4").quantize(tensor.to(model.dtype)))
            state[info.name] = tensor.to(model.dtype)
        reference.load_state_dict(state, strict=False)
        reference.tie_weights()
    assert torch.equal(loaded_down, reference.model.layers[5].mlp.down_proj.weight.data)
    expected = logits(reference.eval(), [ids])
    # The weights bitsandbytes holds are exactly ours (checked before its first forward, below the
    # fast tests do the same for every layer); the logits (about +-20) differ because its CPU 4-bit
    # matmul rounds through bf16, 30 layers deep.
    assert float((got - expected).abs().max()) <= 0.6
    assert int(got[0, -1].argmax()) == int(expected[0, -1].argmax())
    assert "Paris" in tokenizer.decode([int(got[0, -1].argmax())])
