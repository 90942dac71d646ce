"""CPU vs CUDA byte identity for every registered scheme.

Each case quantizes the same weight with the scheme on the CPU and on CUDA, then compares every
field of the packed result: tensors bit for bit (dtype, shape, bytes), the rest by value. Schemes
with a fused kernel (qtool.kernels) are checked through the kernel and through the scheme's own
``quantize`` (the dispatch); the others (Q2_K, Q3_K, Q6_K, IQ4_NL, the float types) run their torch
code on the CUDA tensor. Skipped without CUDA (the fused-kernel cases also without Triton).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from qtool.kernels import fused, kernel_for
from qtool.schemes.base import all_schemes, get_scheme


def fused_names() -> list[str]:
    """The schemes whose record names a Triton kernel module."""
    return [name for name, scheme in all_schemes().items() if scheme.triton_module]


pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device: the CPU/CUDA byte-identity tests run on a GPU machine only"),
]

# (scheme, params) pairs: every fused scheme with its defaults, plus non-default parameters.
CASES = [(name, {}) for name in fused_names()] + [
    ("nf4", {"double_quant": False}), ("nf4", {"block_size": 128}), ("nf4", {"block_size": 32}),
    ("fp4", {"block_size": 256, "double_quant": False}),
    ("int4-sym", {"group_size": 32}), ("int4-asym", {"group_size": 96}),
]


def _weights(block: int) -> list[torch.Tensor]:
    """Random weights of several dtypes and shapes (rows a multiple of ``block``), with the awkward
    values planted: an all-zero row, signed zeros, subnormals, a constant run, one-signed runs."""
    generator = torch.Generator().manual_seed(7)
    cases = []
    for rows, cols, dtype in ((64, 4 * block, torch.bfloat16), (33, 2 * block, torch.float32),
                              (17, 3 * block, torch.float16)):
        cols = max(cols, 256)
        cols -= cols % max(block, 1)
        scale = torch.rand(rows, 1, generator=generator) * 0.1 + 1e-3
        weight = torch.randn(rows, cols, generator=generator) * scale
        weight[1] = 0
        weight[2, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40, 3.0, -3.0])
        weight[3, :64] = 0.5
        weight[4] = weight[4].abs()
        weight[5] = -weight[5].abs()
        cases.append(weight.to(dtype))
    return cases


def _block_of(name: str) -> int:
    scheme = get_scheme(name)
    return getattr(scheme, "block_size", None) or 64


def _assert_identical(gpu, cpu, where: str) -> None:
    assert type(gpu) is type(cpu), where
    for field in dataclasses.fields(cpu):
        a, b = getattr(gpu, field.name), getattr(cpu, field.name)
        label = f"{where}: field {field.name}"
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and a.is_cuda, label
            a = a.cpu()
            assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), label
            raw_a = a.contiguous().reshape(-1).view(torch.uint8)
            raw_b = b.contiguous().reshape(-1).view(torch.uint8)
            mismatched = (raw_a != raw_b).nonzero().flatten()
            assert mismatched.numel() == 0, (f"{label}: {mismatched.numel()} of {raw_b.numel()} bytes differ, "
                                             f"first at byte {mismatched[:5].tolist()}")
        else:
            assert a == b, f"{label}: {a!r} != {b!r}"


def _require_kernel(name: str):
    kernel = kernel_for(get_scheme(name))
    if kernel is None or fused(get_scheme(name)) is None:
        pytest.skip(f"no fused kernel for {name} here (Triton missing?)")
    return kernel


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p}" if p else n for n, p in CASES])
def test_fused_kernel_bytes_equal_cpu(name: str, params: dict) -> None:
    kernel = _require_kernel(name)
    scheme = get_scheme(name)
    for weight in _weights(_block_of(name)):
        cpu = scheme.quantize(weight, **params)
        gpu = kernel(weight.cuda(), **params)
        _assert_identical(gpu, cpu, f"{name} {params} {tuple(weight.shape)} {weight.dtype}")


@pytest.mark.parametrize("name", sorted(all_schemes()))
def test_scheme_on_cuda_tensor_bytes_equal_cpu(name: str) -> None:
    """Every registered scheme's own quantize on a CUDA tensor (the fused kernel where there is one,
    else the torch code on the GPU) gives the CPU bytes."""
    scheme = get_scheme(name)
    for weight in _weights(_block_of(name)):
        if not scheme.requires_importance:
            _assert_identical(scheme.quantize(weight.cuda()), scheme.quantize(weight),
                              f"{name} via the scheme {tuple(weight.shape)} {weight.dtype}")
        if scheme.takes_importance:   # llama.cpp's importance-weighted quantizers (IQ4_XS, IQ3_S, IQ2_XXS, ...)
            importance = torch.rand(weight.shape[-1], generator=torch.Generator().manual_seed(3)) ** 4
            _assert_identical(scheme.quantize(weight.cuda(), importance=importance.cuda()),
                              scheme.quantize(weight, importance=importance),
                              f"{name} with an importance matrix {tuple(weight.shape)} {weight.dtype}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nf4", "int8-sym", "Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "int4-sym"])
def test_large_matrix_bytes_equal_cpu(name: str) -> None:
    """A 1024 x 4096 bf16 matrix: many blocks, so rare rounding cases get their chance."""
    scheme = get_scheme(name)
    generator = torch.Generator().manual_seed(11)
    weight = (torch.randn(1024, 4096, generator=generator) * 0.02).to(torch.bfloat16)
    _assert_identical(scheme.quantize(weight.cuda()), scheme.quantize(weight), f"{name} 1024x4096")


@pytest.mark.parametrize("name", ["int8-sym", "int8-asym", "w8a8"])
def test_rows_longer_than_one_tile_bytes_equal_cpu(name: str) -> None:
    """Whole-row scales over rows longer than the kernel's one-tile limit (its two-pass path),
    and, for bitsandbytes' int8, a value beyond float16's range (the float32 relaunch)."""
    kernel = _require_kernel(name)
    scheme = get_scheme(name)
    generator = torch.Generator().manual_seed(5)
    for cols in (11008, 20000):
        weight = (torch.randn(6, cols, generator=generator) * 0.02).to(torch.bfloat16)
        weight[1] = 0
        _assert_identical(kernel(weight.cuda()), scheme.quantize(weight), f"{name} 6x{cols}")
        weight[3, 17] = 70000.0
        _assert_identical(kernel(weight.cuda()), scheme.quantize(weight), f"{name} 6x{cols} beyond float16")


@pytest.mark.parametrize("name", ["Q4_0", "nf4", "int4-sym"])
def test_repeated_launches_respecialize_for_alignment_and_size(name: str) -> None:
    """qtool.kernels.launch reuses a compiled kernel only for arguments of the same class: after an
    aligned, 16-divisible call, a view 2 bytes off alignment and a size not divisible by 16 must
    still give the CPU path's bytes (a kernel compiled for aligned pointers would read wrongly)."""
    kernel = _require_kernel(name)
    scheme = get_scheme(name)
    generator = torch.Generator().manual_seed(3)
    storage = (torch.randn(64 * 512 + 1, generator=generator) * 0.02).to(torch.bfloat16)
    on_gpu = storage.cuda()
    odd = 512 if name == "int4-sym" else 480    # 37 rows of these: block / group counts not divisible by 16
    for start, rows, cols in ((0, 64, 512), (1, 64, 512), (0, 64, 512), (1, 37, odd)):
        weight = on_gpu[start:start + rows * cols].reshape(rows, cols)
        assert (weight.data_ptr() % 16 == 0) == (start == 0)
        _assert_identical(kernel(weight), scheme.quantize(weight.cpu()), f"{name} offset {start}, {rows}x{cols}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: a tensor on a GPU that is not the current one")
@pytest.mark.parametrize("name", ["Q4_0", "nf4", "int8-sym"])
def test_kernels_run_on_the_tensors_gpu_not_the_current_one(name: str) -> None:
    """``--device cuda:1`` leaves GPU 0 current; Triton launches on the current GPU, so the kernels
    must switch to the tensor's (else they fail, or read GPU 1's memory from GPU 0)."""
    kernel = _require_kernel(name)
    weight = (torch.randn(64, 512, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    assert torch.cuda.current_device() == 0
    for _ in range(2):   # the JIT's launch, then the cached one
        _assert_identical(kernel(weight.to("cuda:1")), get_scheme(name).quantize(weight), f"{name} on cuda:1")


def test_fused_is_none_for_a_scheme_without_kernel() -> None:
    assert get_scheme("IQ4_NL").triton_module is None
    assert fused(get_scheme("IQ4_NL")) is None


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_values_on_code_midpoints_bytes_equal_cpu(quant_type: str) -> None:
    """Scaled values exactly on the code midpoints (and one float step either side) take the
    CPU path's codes: bucketize sends a value on a midpoint to the lower code."""
    kernel = _require_kernel(quant_type)
    from qtool.schemes.nf4 import _bounds_4bit

    bounds = _bounds_4bit(quant_type, "cpu")[0]
    values = torch.cat([bounds, torch.nextafter(bounds, torch.full_like(bounds, 2.0)),
                        torch.nextafter(bounds, torch.full_like(bounds, -2.0)),
                        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    blocks = -(-values.numel() // 63)
    padded = torch.zeros(blocks * 63)
    padded[:values.numel()] = values
    # Each block of 64 starts with 1.0, so its absmax is 1 and the scaled values are the values.
    weight = torch.cat([torch.ones(blocks, 1), padded.view(blocks, 63)], dim=1)
    for double_quant in (False, True):
        _assert_identical(kernel(weight.cuda(), double_quant=double_quant),
                          get_scheme(quant_type).quantize(weight, double_quant=double_quant), f"{quant_type} midpoints")


@pytest.mark.parametrize("threads", [1, 2, 3, 5, 8, 12, 16, 32])
def test_double_quant_offset_equals_cpu_for_any_thread_count(threads: int) -> None:
    """The offset is torch's float32 CPU mean, whose rounding depends on the thread count: the CUDA
    path replays it for the caller's count (here, sizes below and far above torch's split grain,
    and 7001 x 576, whose parts of 31505 blocks do not end on a 4-bit kernel program's blocks).
    Shapes run twice: nothing one call leaves on the device may change the next one's bytes."""
    kernel = _require_kernel("nf4")
    generator = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for rows, cols in ((3, 4096), (700, 4096), (2048, 4096), (7001, 576), (7001, 576), (2048, 4096)):
            weight = (torch.randn(rows, cols, generator=generator) * 0.02).to(torch.bfloat16)
            _assert_identical(kernel(weight.cuda()), get_scheme("nf4").quantize(weight),
                              f"nf4 {threads} threads {rows}x{cols}")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", [n for n in fused_names() if getattr(get_scheme(n), "checks_finite", False)])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weight_raises_on_cuda_as_on_cpu(name: str, bad_value: float) -> None:
    from qtool.schemes.int4 import NonFiniteWeight

    _require_kernel(name)
    weight = torch.randn(64, 256)
    weight[7, 100] = bad_value
    with pytest.raises(NonFiniteWeight):
        get_scheme(name).quantize(weight)
    with pytest.raises(NonFiniteWeight):
        get_scheme(name).quantize(weight.cuda())


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="fewer than 2 GPUs: spreading a model over GPUs is tested on a multi-GPU machine only")
def test_model_spread_over_gpus_gives_one_gpu_logits(tmp_path) -> None:
    """A model given less than its size per GPU is spread by accelerate's device map over every
    visible GPU, whole decoder blocks on each, and computes the logits one GPU computes."""
    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve
    from qtool.synthetic import write_synthetic_llama

    folder = write_synthetic_llama(tmp_path / "model", hidden_size=256, intermediate_size=688, num_layers=8,
                                   num_heads=4, num_kv_heads=2, vocab_size=4096)
    ids = torch.randint(0, 4096, (2, 96), generator=torch.Generator().manual_seed(0))
    with resolve(str(folder)) as source:
        one = model_from_source(source, dtype=torch.float32, device="cuda:0")
        size = sum(p.numel() for p in one.parameters()) * 4
        spread = model_from_source(source, dtype=torch.float32, device="cuda", gpu_memory=size * 6 // 10)
    gpus = {p.device.index for p in spread.parameters()}
    assert gpus == set(range(torch.cuda.device_count())) or len(gpus) >= 2, gpus
    by_block = {}
    for name, param in spread.named_parameters():
        if ".layers." in name:
            by_block.setdefault(name.split(".layers.")[1].split(".")[0], set()).add(param.device.index)
    assert all(len(devices) == 1 for devices in by_block.values()), by_block
    with torch.inference_mode():
        expected = one(ids.to("cuda:0")).logits
        got = spread(ids.to("cuda:0")).logits
    torch.testing.assert_close(got.to(expected.device), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("fmt", "type_name"), [("safetensors", None), ("gguf", "Q4_K_M")])
def test_quantize_on_cuda_writes_the_files_the_cpu_writes(tmp_path, fmt: str, type_name: str | None) -> None:
    """The whole pipe with --device cuda (the next tensor read on a helper thread, the fused kernels,
    the results copied back) writes the bytes --device cpu writes."""
    from qtool.pipeline import QuantizeOptions, quantize
    from qtool.recipes import recipe_from_options
    from qtool.synthetic import write_synthetic_llama

    folder = write_synthetic_llama(tmp_path / "model", hidden_size=256, intermediate_size=768, num_layers=2,
                                   num_heads=4, num_kv_heads=2, vocab_size=1024)
    recipe = recipe_from_options(fmt=fmt, bits=4 if type_name is None else None, scheme=None, gguf_type=type_name,
                                 config=None, block_size=None, group_size=None, double_quant=None, include=[], skip=[])
    written = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / (f"{device}.gguf" if fmt == "gguf" else device)
        quantize(str(folder), out, recipe, QuantizeOptions(format=fmt, device=device))
        files = {"model.gguf": out} if fmt == "gguf" else {path.name: path for path in out.glob("*.safetensors")}
        written[device] = {name: path.read_bytes() for name, path in files.items()}
    assert written["cpu"] and written["cuda"].keys() == written["cpu"].keys()
    for name, data in written["cpu"].items():
        assert written["cuda"][name] == data, f"{fmt}: {name} differs between --device cpu and cuda"


@pytest.mark.parametrize("scheme", ["int4-sym", "int4-asym", "Q4_0", "IQ4_NL", "Q4_K", "nf4"])
def test_gptq_fused_column_loop_agrees_with_the_torch_loop_on_cuda(scheme: str) -> None:
    """The compiled Triton column loop (qtool.kernels.gptq) against GPTQ's torch loop on the same GPU:
    the same levels but for rounding ties (at least 99.9%), the same layer-output error within 0.5%.
    Under Triton's interpreter the two are equal bit for bit (tests/test_gptq.py)."""
    pytest.importorskip("triton")
    from qtool.schemes.gptq import gptq_quantize, layer_output_error, make_grid

    generator = torch.Generator().manual_seed(11)
    cols = 1024
    x = (torch.randn(2048, cols, generator=generator) @ (torch.randn(cols, cols, generator=generator) / cols ** 0.5))
    w = (torch.randn(96, cols, generator=generator) * 0.05).cuda()
    h = (x.T @ x).cuda()
    grid = make_grid(scheme, group_size=128 if scheme.startswith("int4") else None)
    torch_loop, fused_loop = (gptq_quantize(w, h, grid, act_order=True, damp_diag=1.0, fused=fused) for fused in (False, True))
    assert (torch_loop.levels == fused_loop.levels).float().mean() >= 0.999
    errors = [layer_output_error(w, run.qweight, h) for run in (torch_loop, fused_loop)]
    assert abs(errors[1] - errors[0]) <= 0.005 * errors[0]
