"""qtool's CPU quantizers against libggml's, one core each, on the same rows and importance matrix.

What a GGUF conversion's time is mostly made of: the block searches. For each GGML type that takes an
importance matrix, SmolLM2-135M's ffn_down rows (the packaged GGUF, dequantized: real weights whose
rows of 1536 divide into 256-blocks) with a random positive importance per column are quantized by
``qtool`` (``GGMLType.quantize``: its C kernels, one worker thread) and by llama.cpp's
``ggml_quantize_chunk`` from the libggml-base that llama-cpp-python ships (one thread). Reports the
time of each per million weights, the ratio qtool / libggml, and whether the bytes are equal (they
must be: a row with False is a bug, and the script exits non-zero).

    python benchmarks/bench_ggml_kernels.py [TYPE ...]      # default: the i-quants and K-quants

Environment: QTOOL_BENCH_JSON (where run_all.py wants the JSON). Needs llama-cpp-python.
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_TYPES = ("IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
                 "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
LAYERS = (3, 11, 19, 27)        # ffn_down of these blocks: 4 x 576 x 1536 = 3.5M weights


@dataclass
class Row:
    type: str
    weights: int
    qtool_ms_per_million: float
    libggml_ms_per_million: float
    ratio: float
    bytes_equal: bool


def _libggml() -> ctypes.CDLL:
    import llama_cpp

    library = ctypes.CDLL(str(sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))[0]))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return library


def _best_of(runs: int, call) -> tuple[float, object]:
    """The fastest of a few runs (this machine is shared: the minimum is the least disturbed)."""
    best, result = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from rich.console import Console
    from rich.table import Table

    import qtool.schemes._parallel as parallel
    from qtool.schemes.base import get_scheme
    from qtool.sources.resolve import resolve, smollm2_path

    parallel.WORKERS = 1            # one core for both: per-core speed, not the machine's
    torch.set_num_threads(1)
    types = tuple(sys.argv[1:]) or DEFAULT_TYPES
    with resolve(str(smollm2_path())) as source:
        weight = torch.cat([source.load(f"model.layers.{layer}.mlp.down_proj.weight").float() for layer in LAYERS])
    importance = torch.rand(weight.shape[1], generator=torch.Generator().manual_seed(0)) * 3 + 0.1
    values, weights_np = weight.numpy(), importance.numpy()
    library = _libggml()
    rows = []
    for name in types:
        scheme = get_scheme(name)
        scheme.quantize(weight[:8], importance)                       # builds / loads the C kernels
        ours_seconds, ours = _best_of(2, lambda: scheme.quantize(weight, importance).data.numpy())
        qtype = GGMLQuantizationType[name]
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        out = np.zeros((weight.shape[0], weight.shape[1] // block_size * type_size), dtype=np.uint8)

        def theirs(out=out, qtype=qtype):
            library.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, weight.shape[0],
                                        weight.shape[1], weights_np.ctypes.data)
            return out

        theirs_seconds, reference = _best_of(2, theirs)
        million = weight.numel() / 1e6
        rows.append(Row(type=name, weights=weight.numel(), qtool_ms_per_million=1e3 * ours_seconds / million,
                        libggml_ms_per_million=1e3 * theirs_seconds / million, ratio=ours_seconds / theirs_seconds,
                        bytes_equal=bool(np.array_equal(ours.reshape(reference.shape), reference))))

    table = Table(title=f"GGML quantizers on one core, SmolLM2-135M ffn_down rows ({weight.numel() / 1e6:.1f}M "
                        "weights), with an importance matrix")
    for column in ("type", "qtool ms / M", "libggml ms / M", "ratio", "same bytes"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row.type, f"{row.qtool_ms_per_million:.0f}", f"{row.libggml_ms_per_million:.0f}",
                      f"{row.ratio:.2f}x", str(row.bytes_equal))
    Console(stderr=True).print(table)
    result = {"rows": [asdict(row) for row in rows]}
    text = json.dumps(result, indent=2)
    if os.environ.get("QTOOL_BENCH_JSON"):
        Path(os.environ["QTOOL_BENCH_JSON"]).write_text(text)
    print(text)
    return 0 if all(row.bytes_equal for row in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
