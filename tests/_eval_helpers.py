"""Helpers for the evaluation tests: GGUF variants of the packaged SmolLM2 written with gguf-py,
an HF folder of it, and llama.cpp's perplexity computed through llama-cpp-python."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

WIKITEXT_RELATIVE = Path("wikitext-2-raw") / "wiki.test.raw"

# general.file_type values llama.cpp writes (llama_ftype).
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2}


def write_gguf_variant(source: Path, out: Path, qtype_name: str) -> Path:
    """Copy ``source`` (a GGUF) with every 2-D weight re-encoded as ``qtype_name`` (F16, Q8_0, Q4_0)
    from its dequantized values; 1-D tensors (norms) stay F32 as llama.cpp keeps them."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        value = FILE_TYPES[qtype_name] if key == "general.file_type" else field.contents()
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    qtype = GGMLQuantizationType[qtype_name]
    for tensor in reader.tensors:
        shape = [int(n) for n in reversed(tensor.shape)]       # numpy order: rows first
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if len(shape) == 1:
            writer.add_tensor(tensor.name, values)
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_hf_folder(spec: str, out: Path, dtype: str = "float16") -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer) holding the source's weights."""
    import torch
    from safetensors.torch import save_file

    from qtool.sources.resolve import resolve

    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    with resolve(spec) as source:
        tensors = {info.name: source.load(info.name).to(torch_dtype).contiguous() for info in source.tensors()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = dict(source.config)
        config["torch_dtype"] = config["dtype"] = dtype
        (out / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer_dir = source.tokenizer_dir()
        for path in tokenizer_dir.iterdir():
            shutil.copy(path, out / path.name)
    return out


def llama_cpp_tokens(model_path: Path, text: str) -> tuple[list[int], bool, int]:
    """(tokens, add_bos, bos id) exactly as llama-perplexity tokenizes the whole text."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    try:
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llm._model.vocab))
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False), add_bos, llm.token_bos()
    finally:
        llm.close()


def llama_cpp_perplexity(model_path: Path, tokens: list[int], *, ctx: int, chunks: int, add_bos: bool,
                         bos_id: int, threads: int = 2) -> tuple[float, np.ndarray]:
    """llama-perplexity's number, computed with llama.cpp's own forward pass: windows of ``ctx``
    tokens, BOS in front when the vocab adds it, NLL of the second half. Returns (ppl, NLLs)."""
    from tests._gguf_helpers import llama_runtime

    llm = llama_runtime(model_path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                        n_threads=threads, n_threads_batch=threads, verbose=False)
    first = ctx // 2
    nll = []
    try:
        for chunk in range(chunks):
            window = list(tokens[chunk * ctx:(chunk + 1) * ctx])
            targets = np.array(window[first + 1:])
            if add_bos:
                window[0] = bos_id
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[first:ctx - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            nll.append(log_norm - logits[np.arange(len(targets)), targets])
    finally:
        llm.close()
    values = np.concatenate(nll)
    return math.exp(values.mean()), values
