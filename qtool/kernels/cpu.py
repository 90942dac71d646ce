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
from typing import Any

import numpy as np
import torch

SOURCE = Path(__file__).with_name("cpu_ggml.c")
# No -ffast-math, no contraction into fused multiply-adds: the bytes must equal torch's. Without
# trapping math the compiler may if-convert (and so vectorize) the clamps; no value changes.
_FLAGS = ["-O3", "-fPIC", "-shared", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
# cpu_ggml.c's bound on a lattice type's candidate scales (MAX_CANDIDATES).
_MAX_CANDIDATES = 32


@functools.cache
def _candidates_array(values: tuple[float, ...]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


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
    return ctypes.CDLL(str(target))


def _c_function(library: ctypes.CDLL, name: str, with_candidates: bool, with_importance: bool) -> Any:
    """The library's function ``name``, its signature declared on first use (ctypes keeps it)."""
    function = getattr(library, name)
    if function.argtypes is None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        function.restype = ctypes.c_int     # 1: the blocks held inf or NaN
        extra = [pointer] if with_candidates else []
        if with_importance:   # importance (NULL: none), blocks per row, index of the first block
            extra += [pointer, size, size]
        function.argtypes = [pointer, ctypes.c_int, size, *extra, pointer]
    return function


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("QTOOL_CPU_KERNELS", "1") == "0" or not SOURCE.is_file():
        return None
    try:
        return build_library(_cache_dir())
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_kernel(scheme: Any, library: ctypes.CDLL | None = None) -> Callable[..., torch.Tensor] | None:
    """For a GGML type whose record names a C kernel (``scheme.c_kernel``, a function of
    cpu_ggml.c; its geometry ``block_size`` / ``type_size``; the K-quants' float32 search
    constants ``search_candidates``): a function (n_blocks, block) float tensor on the CPU ->
    (n_blocks, type_size) uint8, the bytes of the scheme's ``quantize_blocks``; else None. Types
    that ``takes_importance`` also take ``importance``: one float per column of the tensor's rows.
    ``library``: another build (tests compare builds); default: the cached one."""
    function_name = scheme.c_kernel
    if function_name is None:
        return None
    library = library or _library()
    if library is None:
        return None
    type_size, block = scheme.type_size, scheme.block_size
    candidates = getattr(scheme, "search_candidates", None)
    with_importance = bool(getattr(scheme, "takes_importance", False))
    function = _c_function(library, function_name, candidates is not None, with_importance)
    extra = () if candidates is None else (_candidates_array(candidates).ctypes.data,)

    def quantize_blocks(blocks: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
        from qtool.schemes._parallel import CPU_CHUNK_ELEMENTS, run_chunks

        if blocks.dtype not in _DTYPES:
            blocks = blocks.to(torch.float32)
        blocks = blocks.contiguous()
        n_blocks = blocks.shape[0]
        out = torch.empty((n_blocks, type_size), dtype=torch.uint8)
        step = max(1, CPU_CHUNK_ELEMENTS // block)
        dtype_code = _DTYPES[blocks.dtype]
        base_in, base_out = blocks.data_ptr(), out.data_ptr()
        in_stride = block * blocks.element_size()

        if importance is not None:
            importance = importance.to(torch.float32).contiguous()
        period = 1 if importance is None else importance.numel() // block

        def weights(start: int) -> tuple:
            if not with_importance:
                return ()
            return (None if importance is None else importance.data_ptr(), period, start)

        nonfinite_chunks = []

        def work(starts):
            for start in starts:
                count = min(step, n_blocks - start)
                if function(base_in + start * in_stride, dtype_code, count, *extra, *weights(start),
                            base_out + start * type_size):
                    nonfinite_chunks.append(start)

        run_chunks(range(0, n_blocks, step), work)
        if nonfinite_chunks:
            from qtool.schemes.errors import NonFiniteWeight

            raise NonFiniteWeight("the weight contains inf or nan values")
        return out

    return quantize_blocks


def lattice_fit(blocks: torch.Tensor, importance: torch.Tensor | None, config: tuple[int, ...],
                fconfig: tuple[float, ...], tables: tuple[torch.Tensor, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The lattice i-quants' search in C (cpu_ggml.c's lattice_fit: ggml_iquants.py's _Lattice._fit, the
    same numbers): (grid indices (rows, groups), sign bits (n_blocks * 32,), scales (rows, 1), empty
    (rows, 1)) for float blocks (n_blocks, 256) on the CPU, ``importance`` (n_blocks, 256) or None; None
    without a compiler. ``tables``: ggml_iquants.lattice_packed's."""
    library = _library()
    if library is None:
        return None
    function = library.lattice_fit
    if function.argtypes is None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        function.restype = ctypes.c_int
        function.argtypes = [pointer, ctypes.c_int, size, pointer, pointer, pointer, pointer, pointer, pointer,
                             pointer, ctypes.c_int32, pointer, pointer, pointer, pointer]
    if blocks.dtype not in _DTYPES:
        blocks = blocks.to(torch.float32)
    blocks = blocks.contiguous()
    n_blocks = blocks.shape[0]
    sub, group = config[0], config[1]
    rows, groups = n_blocks * (256 // sub), sub // group
    grid_map, code_rows, counts, packed = tables
    if 2 * config[3] + 1 > _MAX_CANDIDATES:
        raise ValueError(f"{2 * config[3] + 1} candidate scales: past cpu_ggml.c's MAX_CANDIDATES")
    weights = None if importance is None else importance.to(torch.float32).contiguous()
    config_array = np.array(config, dtype=np.int32)
    fconfig_array = np.array(fconfig, dtype=np.float32)
    index = torch.empty((rows, groups), dtype=torch.int32)
    signs = torch.empty((n_blocks * 32,), dtype=torch.int32)
    scale = torch.empty((rows, 1), dtype=torch.float32)
    empty = torch.empty((rows, 1), dtype=torch.uint8)
    if function(blocks.data_ptr(), _DTYPES[blocks.dtype], n_blocks, None if weights is None else weights.data_ptr(),
                config_array.ctypes.data, fconfig_array.ctypes.data, grid_map.data_ptr(), code_rows.data_ptr(),
                counts.data_ptr(), packed.data_ptr(), packed.shape[1], index.data_ptr(), signs.data_ptr(),
                scale.data_ptr(), empty.data_ptr()):
        from qtool.schemes.errors import NonFiniteWeight

        raise NonFiniteWeight("the weight contains inf or nan values")
    return index.long(), signs.long(), scale, empty.bool()


def ternary_quantize(blocks: torch.Tensor, importance: torch.Tensor | None, type_size: int, medium: int,
                     tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    """IQ1_S (``medium`` 0) / IQ1_M (1) blocks in C (cpu_ggml.c's quantize_iq1: ggml_iq1.py's
    quantize_blocks, the same bytes): float blocks (n_blocks, 256) on the CPU, ``importance`` (n_blocks,
    256) or None -> uint8 (n_blocks, type_size); None without a compiler. ``tables``: the IQ1 grid's
    levels, map and neighbour lists, contiguous int32."""
    library = _library()
    if library is None:
        return None
    function = library.quantize_iq1
    if function.argtypes is None:
        pointer = ctypes.c_void_p
        function.restype = ctypes.c_int
        function.argtypes = [pointer, ctypes.c_int, ctypes.c_int64, pointer, ctypes.c_int, pointer, pointer, pointer,
                             ctypes.c_int32, pointer]
    if blocks.dtype not in _DTYPES:
        blocks = blocks.to(torch.float32)
    blocks = blocks.contiguous()
    weights = None if importance is None else importance.to(torch.float32).contiguous()
    levels, grid_map, neighbours = tables
    out = torch.empty((blocks.shape[0], type_size), dtype=torch.uint8)
    if function(blocks.data_ptr(), _DTYPES[blocks.dtype], blocks.shape[0], None if weights is None else weights.data_ptr(),
                medium, levels.data_ptr(), grid_map.data_ptr(), neighbours.data_ptr(), neighbours.shape[1],
                out.data_ptr()):
        from qtool.schemes.errors import NonFiniteWeight

        raise NonFiniteWeight("the weight contains inf or nan values")
    return out


def gptq_columns(block: torch.Tensor, hinv_block: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                 sub_of_column: torch.Tensor, codebook: torch.Tensor | None, qmax: int, levels: torch.Tensor,
                 values: torch.Tensor, errors: torch.Tensor, first: int, last: int) -> None:
    """GPTQ's column loop in C on CPU tensors (cpu_ggml.c's gptq_columns: the torch loop's bits), with
    qtool.kernels.gptq.quantize_columns's arguments; rows split over the worker threads."""
    from qtool.schemes._parallel import run_chunks

    library = _library()
    function = library.gptq_columns
    if function.argtypes is None:
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        function.restype = None
        function.argtypes = [pointer, size, pointer, size, pointer, pointer, size, pointer, pointer, ctypes.c_int32,
                             pointer, pointer, size, pointer, size, size, size, size]
    rows, count = block.shape
    book = None if codebook is None else codebook.data_ptr()
    step = max(64, -(-rows // 8))

    def work(starts):
        for start in starts:
            function(block.data_ptr(), block.stride(0), hinv_block.data_ptr(), count, scale.data_ptr(),
                     offset.data_ptr(), scale.shape[1], sub_of_column.data_ptr(), book, qmax, levels.data_ptr(),
                     values.data_ptr(), levels.stride(0), errors.data_ptr(), start, min(start + step, rows),
                     first, last)

    run_chunks(range(0, rows, step), work)


def gptq_columns_available(block: torch.Tensor, codebook: torch.Tensor | None) -> bool:
    """Whether gptq_columns takes this block: float32 CPU tensors laid out as the torch loop keeps them,
    a codebook of at most 257 values, and the C library built."""
    return (block.device.type == "cpu" and block.dtype == torch.float32 and block.stride(1) == 1
            and (codebook is None or codebook.numel() <= 257) and _library() is not None)
