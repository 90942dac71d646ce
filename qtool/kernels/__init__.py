"""Fused Triton kernels for the hot schemes: the bytes of :mod:`qtool.schemes`, at GPU speed.

Each kernel module reproduces its scheme's torch code operation by operation in float32
(correctly rounded division and square root, no fused multiply-add where it could change a value,
the same reciprocal-then-multiply wherever the torch code writes ``scalar / tensor``), so a weight
quantized on a CUDA device gives the bytes the CPU path gives. Sums that decide a result are taken
in an order both paths compute: the K-quants' fixed pairwise order (``qtool.schemes.ggml_kquants.pairwise_sum``), and
for NF4's double-quant offset torch's own CPU summation order, replayed (nf4.py), never a reduction
order left to a library.

``fused(scheme)`` is the only entry point the schemes need (a scheme's record names its kernel
module, ``triton_module``; this package imports nothing of the schemes)::

    if weight.is_cuda and (kernel := fused(self)) is not None:
        return kernel(weight, **params)

Without Triton or without CUDA it returns None and the scheme's own torch code runs (that is the
fallback, on any device). The kernel modules launch through ``launch``, which after a kernel's
first launch calls its compiled form directly (Triton's per-call Python work costs more host time
than these kernels take on the GPU), and ``read_flags`` reads back their inf/NaN flags.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

@functools.cache
def triton_available() -> bool:
    """Triton importable and a CUDA device present (QTOOL_FUSED=0 turns the kernels off)."""
    if os.environ.get("QTOOL_FUSED", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def kernel_for(scheme: Any) -> Callable[..., Any] | None:
    """The Triton-backed quantize function of ``scheme`` (a scheme record: its ``triton_module``
    names the kernel module of this package, whose FUSED holds the function under the scheme's
    name) whenever Triton imports (also under TRITON_INTERPRET=1 on CPU tensors, which is how the
    kernels are checked without a GPU)."""
    module_name = scheme.triton_module
    if module_name is None:
        return None
    try:
        module = importlib.import_module(f"qtool.kernels.{module_name}")
    except ImportError:
        return None
    return module.FUSED.get(scheme.name)


def fused(scheme: Any) -> Callable[..., Any] | None:
    """A function with the signature and return type of ``scheme.quantize`` that runs fused
    kernels on CUDA tensors, or None (no Triton, no CUDA, or no kernel for the scheme)."""
    if not triton_available():
        return None
    return kernel_for(scheme)


def read_flags(flags: torch.Tensor) -> int:
    """The flags a kernel left on the device, one int32 word per program, combined (one host sync).
    Bit 0 (the program saw inf or NaN) raises NonFiniteWeight, as the CPU paths do; the other
    bits are the kernel's own."""
    from qtool.schemes.errors import NonFiniteWeight

    # One copy of the words, OR-ed on the host: a reduction kernel first would cost the host a
    # torch launch (15-20 us on the device machine) for a few microseconds of GPU time.
    value = int(np.bitwise_or.reduce(flags.cpu().numpy().ravel()))
    if value & 1:
        raise NonFiniteWeight("the weight contains inf or nan values")
    return value


# Kernels are keyed by id(): a JITFunction hashes through its source-derived cache key, slow per
# launch; they are module-level objects, alive as long as the process.
# (id of the kernel, device index, options, argument classes) -> (compiled kernel, constexpr values in order)
_COMPILED: dict[tuple, tuple[Any, tuple]] = {}
_JIT_ONLY: set[int] = set()      # ids of kernels whose compiled form this Triton does not expose


def _argument_class(arg: Any) -> Any:
    """What Triton specializes a runtime argument on, or more: a tensor's dtype and 16-byte
    alignment; an integer's value 1, divisibility by 16 and type range (i32, i64, u64)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, -(1 << 31) <= arg < (1 << 31), arg >= (1 << 63)
    return type(arg)


@functools.cache
def _triton_runtime() -> tuple[Any, Any] | None:
    """(Triton's runtime knobs, its driver's current-stream query), or None for a Triton without
    them (< 3.4). Only called for CUDA tensors: the driver needs a GPU."""
    try:
        from triton import knobs
        from triton.runtime import driver
    except ImportError:
        return None
    return knobs.runtime, driver.active.get_current_stream


def _hooked(hook: Any) -> bool:
    """Whether a Triton launch hook is set: None or an empty HookChain (Triton 3.5+) is not."""
    return bool(getattr(hook, "calls", hook))


def launch(kernel: Any, grid: Sequence[int], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)`` (runtime arguments positional, constexprs and launch options
    by keyword) with the host work of a repeated launch cut to the compiled kernel's own launcher.

    Triton's JIT path re-derives the argument specialization, cache key, device and stream on every
    call: 15-30 us of Python on the device machine's host, as much as a kernel's GPU time here.
    The first launch of each argument class goes through it (compiling as needed); later ones call
    the compiled kernel it returned. The class is a refinement of Triton's own specialization key,
    so a cached kernel is only reused where Triton would pick the same one. Anything unusual (CPU
    tensors under the interpreter, a profiler's launch hooks, a Triton without these attributes)
    takes the JIT path."""
    device = args[0].device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        # Triton compiles for, and launches on, the current device: make it the tensor's.
        with torch.cuda.device(device):
            return launch(kernel, grid, *args, **meta)
    runtime = _triton_runtime() if device.type == "cuda" and id(kernel) not in _JIT_ONLY else None
    if runtime is None or _hooked(runtime[0].launch_enter_hook) or _hooked(runtime[0].launch_exit_hook):
        kernel[tuple(grid)](*args, **meta)
        return
    index = device.index
    key = (id(kernel), index, tuple(meta.items()), tuple(map(_argument_class, args)))
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[tuple(grid)](*args, **meta)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled
        try:
            constants = tuple(meta[name] for name in kernel.arg_names[len(args):])
            compiled.run, compiled.function, compiled.packed_metadata  # noqa: B018 - probe the API
        except (AttributeError, KeyError):
            _JIT_ONLY.add(id(kernel))
            return
        _COMPILED[key] = (compiled, constants)
        return
    compiled, constants = entry
    padded = tuple(grid) + (1, 1)
    try:
        compiled.run(padded[0], padded[1], padded[2], runtime[1](index), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *constants)
    except TypeError:
        # A launcher whose arguments differ from the ones above (another Triton): checked before
        # anything is enqueued, so the JIT path can take this launch and all later ones.
        _JIT_ONLY.add(id(kernel))
        kernel[tuple(grid)](*args, **meta)
