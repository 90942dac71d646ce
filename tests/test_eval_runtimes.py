"""The same weights give the same perplexity whichever way they arrive: qtool's NF4 safetensors
output against bitsandbytes' own NF4 of the same model (both through the real bitsandbytes
modules, and qtool's also through its dequantized weights when the source wrapper is there)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from qtool.evaluation import evaluate
from tests._eval_helpers import write_hf_folder

pytestmark = pytest.mark.slow
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def hf_float32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hf_folder("smollm2-135m", tmp_path_factory.mktemp("smollm2-hf") / "fp32", dtype="float32")


def test_qtool_nf4_output_scores_like_bitsandbytes_nf4(hf_float32: Path, shared_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qtool.pipeline import QuantizeOptions, quantize
    from qtool.recipes import recipe_from_options

    recipe = recipe_from_options(fmt="safetensors", bits=None, scheme="nf4", gguf_type=None, config=None,
                                 block_size=None, group_size=None, double_quant=None, include=[], skip=[])
    ours = tmp_path / "qtool-nf4"
    quantize(str(hf_float32), ours, recipe, QuantizeOptions(format="safetensors"))

    theirs = tmp_path / "bnb-nf4"
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(hf_float32), quantization_config=config, device_map="cpu")
    model.save_pretrained(str(theirs))
    del model
    for path in hf_float32.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(path, theirs / path.name)

    text = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    native = evaluate([str(ours), str(theirs)], text_file=text, ctx=256, chunks=2, device="cpu", batch_size=2,
                      runtime="native")
    ours_native, theirs_native = native.models
    assert ours_native.runtime == "native"
    assert ours_native.ppl == pytest.approx(theirs_native.ppl, rel=0.005)

    full = evaluate([str(hf_float32)], text_file=text, ctx=256, chunks=2, device="cpu").models[0]
    assert ours_native.ppl != pytest.approx(full.ppl, rel=1e-4)    # NF4 did change the model

    if importlib.util.find_spec("qtool.sources.quantized") is not None:
        dequantized = evaluate([str(ours)], text_file=text, ctx=256, chunks=2, device="cpu", batch_size=2)
        assert dequantized.models[0].ppl == pytest.approx(theirs_native.ppl, rel=0.005)
