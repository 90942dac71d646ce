"""C kernels for the CPU's hottest GGML types, built on first use with the system C compiler.

Why not torch.compile here: a compiled torch function costs every process seconds of tracing
and module imports before its first block, and its OpenMP loops stall when the cores are
shared; a GGUF conversion is short enough for both to dominate. These kernels (cpu_ggml.c)
compute the torch code's bytes (see the C file), take bf16 or f32 input as it lies in the
checkpoint, and run chunks of a tensor on several Python threads at once (ctypes releases the
GIL during the call).

The shared library is cached under $XDG_CACHE_HOME/qtool (default ~/.cache/qtool), keyed by a
hash of the source and the compiler command. Without a compiler, or with QTOOL_CPU_KERNELS=0,
``cpu_kernel`` returns None and the torch code runs: same bytes, slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_ggml.c")
# No -ffast-math, no contraction into fused multiply-adds: the bytes must equal torch's. Without
# trapping math the compiler may if-convert (and so vectorize) the clamps; no value changes.
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# Blocks per call: big enough that the call overhead is negligible, small enough that threads
# share a tensor evenly.
_CHUNK_ELEMENTS = 1 << 20


@functools.cache
def _candidates(scheme_name: str) -> np.ndarray | None:
    """The float32 search constants a K-quant kernel takes (ggml_kquants.SEARCH_CANDIDATES, imported
    here, not at module level: the schemes import this module)."""
    from qtool.schemes.ggml_kquants import SEARCH_CANDIDATES

    values = SEARCH_CANDIDATES.get(scheme_name)
    return None if values is None else np.array(values, dtype=np.float32)


# scheme name -> (C function, bytes per block, elements per block)
_FUNCTIONS = {"Q8_0": ("quantize_q8_0", 34, 32), "Q4_0": ("quantize_q4_0", 18, 32),
              "Q4_1": ("quantize_q4_1", 20, 32), "Q5_0": ("quantize_q5_0", 22, 32),
              "Q5_1": ("quantize_q5_1", 24, 32), "IQ4_NL": ("quantize_iq4_nl", 18, 32),
              "Q2_K": ("quantize_q2_k", 84, 256), "Q3_K": ("quantize_q3_k", 110, 256),
              "Q4_K": ("quantize_q4_k", 144, 256),
              "Q5_K": ("quantize_q5_k", 176, 256), "Q6_K": ("quantize_q6_k", 210, 256)}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qtool"


def build_library(directory: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile cpu_ggml.c into ``directory`` (once per source, compiler and flags) and load it.
    Raises OSError / subprocess errors when there is no working compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    flags = [*_FLAGS, *extra_flags]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = directory / f"cpu_ggml-{key}.so"
    if not target.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent processes never load a partial file.
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"], check=True,
                           capture_output=True, timeout=120)
            os.replace(built, target)
    library = ctypes.CDLL(str(target))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for name, _, _ in _FUNCTIONS.values():
        function = getattr(library, name)
        function.restype = ctypes.c_int     # 1: the blocks held inf or NaN
        with_candidates = name.endswith("_k")
        function.argtypes = [pointer, ctypes.c_int, size, *([pointer] if with_candidates else []), pointer]
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("QTOOL_CPU_KERNELS", "1") == "0" or not SOURCE.is_file():
        return None
    try:
        return build_library(_cache_dir())
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_kernel(scheme_name: str, library: ctypes.CDLL | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a GGML type with a C kernel: a function (n_blocks, block) float tensor on the CPU ->
    (n_blocks, type_size) uint8, the bytes of the scheme's ``quantize_blocks``; else None.
    ``library``: another build (tests compare builds); default: the cached one."""
    entry = _FUNCTIONS.get(scheme_name)
    if entry is None:
        return None
    library = library or _library()
    if library is None:
        return None
    function_name, type_size, block = entry
    function = getattr(library, function_name)
    candidates = _candidates(scheme_name)
    extra = () if candidates is None else (candidates.ctypes.data,)

    def quantize_blocks(blocks: torch.Tensor) -> torch.Tensor:
        from qtool.schemes._parallel import run_chunks

        if blocks.dtype not in _DTYPES:
            blocks = blocks.to(torch.float32)
        blocks = blocks.contiguous()
        n_blocks = blocks.shape[0]
        out = torch.empty((n_blocks, type_size), dtype=torch.uint8)
        step = max(1, _CHUNK_ELEMENTS // block)
        dtype_code = _DTYPES[blocks.dtype]
        base_in, base_out = blocks.data_ptr(), out.data_ptr()
        in_stride = block * blocks.element_size()

        nonfinite_chunks = []

        def work(starts):
            for start in starts:
                count = min(step, n_blocks - start)
                if function(base_in + start * in_stride, dtype_code, count, *extra, base_out + start * type_size):
                    nonfinite_chunks.append(start)

        run_chunks(range(0, n_blocks, step), work)
        if nonfinite_chunks:
            from qtool.schemes.int4 import NonFiniteWeight

            raise NonFiniteWeight("the weight contains inf or nan values")
        return out

    return quantize_blocks
