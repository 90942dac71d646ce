"""Reference quantization by llama.cpp itself: ggml_quantize_chunk from the libggml-base that
llama-cpp-python ships, through ctypes (what gguf-py's own tests do)."""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@lru_cache(maxsize=1)
def _libggml() -> ctypes.CDLL | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    candidates = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))
    if not candidates:
        return None
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def require_libggml() -> ctypes.CDLL:
    lib = _libggml()
    if lib is None:
        pytest.skip("llama-cpp-python (libggml-base) is not installed")
    return lib


def llamacpp_quantize(values: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantization of a 2-D float32 array: uint8 (rows, row_bytes); ``imatrix``: one
    importance per column (what llama-quantize --imatrix hands ggml_quantize_chunk)."""
    lib = require_libggml()
    qtype = GGMLQuantizationType[type_name]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, n_per_row = values.shape
    out = np.zeros((rows, n_per_row // block_size * type_size), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    assert weights is None or weights.shape == (n_per_row,)
    written = lib.ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, rows, n_per_row,
                                      None if weights is None else weights.ctypes.data)
    assert written == out.size
    return out
