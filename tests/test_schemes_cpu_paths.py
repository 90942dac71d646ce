"""The schemes' fast CPU paths (table lookup instead of bucketize, chunks on worker threads) against
bitsandbytes and against the schemes' own whole-tensor torch paths: same bytes whatever the
chunking, and on every value where the lookup could go wrong (code midpoints, their float32
neighbours, the edges of every lookup cell)."""
from __future__ import annotations

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from qtool.schemes import _parallel, int4, int8, nf4
from qtool.schemes.int4 import NonFiniteWeight


def _same_as_bnb(weight: torch.Tensor, quant_type: str, block_size: int = 64, double_quant: bool = True) -> None:
    ref_data, ref_state = bnb_functional.quantize_4bit(weight, blocksize=block_size,
                                                        compress_statistics=double_quant, quant_type=quant_type)
    ours = nf4.quantize_4bit(weight, quant_type, block_size, double_quant)
    assert torch.equal(ours.data, ref_data)
    assert torch.equal(ours.absmax, ref_state.absmax)
    if double_quant:
        assert ours.nested_offset == ref_state.offset.item()
        assert torch.equal(ours.nested_absmax, ref_state.state2.absmax)


def _critical_values(quant_type: str) -> torch.Tensor:
    """Midpoints, their float32 neighbours, and both ends of every 16-bit cell of [-1, 1]."""
    bounds, _ = nf4._bounds_4bit(quant_type, torch.device("cpu"))
    up = torch.nextafter(bounds, torch.full_like(bounds, 2.0))
    down = torch.nextafter(bounds, torch.full_like(bounds, -2.0))
    cells = torch.arange(65536, dtype=torch.int64)
    edges = torch.cat([cells << 16, (cells << 16) | 0xFFFF]).to(torch.int32).view(torch.float32)
    edges = edges[torch.isfinite(edges) & (edges.abs() <= 1)]
    return torch.cat([bounds, up, down, -bounds, -up, -down, edges, torch.tensor([0.0, -0.0, 1.0, -1.0])])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lookup_exact_on_critical_values(quant_type):
    """Blocks of float32 holding 1.0 (absmax 1, so the scaled value is the value itself) and then
    critical values: the table path must pick bucketize's code for each, ties to the lower code."""
    values = _critical_values(quant_type)
    per_block = 63
    pad = (-values.numel()) % per_block
    values = torch.cat([values, torch.zeros(pad)]).view(-1, per_block)
    weight = torch.cat([torch.ones(values.shape[0], 1), values], dim=1).reshape(-1, 128)
    _same_as_bnb(weight, quant_type, 64, double_quant=False)
    # Scaled by a power of two the values stay exact; other scales exercise x * (1 / absmax).
    for factor in (0.25, 3.0e-3, 7.0):
        _same_as_bnb(weight * factor, quant_type, 64, double_quant=True)


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_4bit_many_chunks_identical(monkeypatch, workers, dtype):
    """Several chunks per worker, a short last chunk, a trailing partial block and an odd count."""
    monkeypatch.setattr(nf4, "_CPU_CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(_parallel, "WORKERS", workers)
    generator = torch.Generator().manual_seed(workers)
    weight = (torch.randn(301, 517, generator=generator) * torch.rand(301, 1, generator=generator)).to(dtype)
    for quant_type in ("nf4", "fp4"):
        _same_as_bnb(weight, quant_type, 64, double_quant=True)
        _same_as_bnb(weight, quant_type, 256, double_quant=False)


def test_4bit_cpu_path_equals_torch_path():
    generator = torch.Generator().manual_seed(11)
    flat = (torch.randn(1 << 19, generator=generator) * 0.03).to(torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        fast = nf4._quantize_4bit_cpu(flat[:-3], quant_type, 64)
        slow = nf4._quantize_4bit_torch(flat[:-3], quant_type, 64)
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_int8_rows_many_chunks_identical(monkeypatch, workers, dtype):
    monkeypatch.setattr(int8, "_CPU_CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(_parallel, "WORKERS", workers)
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(203, 333, generator=generator) * torch.rand(203, 1, generator=generator)
    weight[7] = 0.0                                   # an all-zero row
    weight[9, :5] = 1e-6                              # float16 subnormals
    weight = weight.to(dtype)
    ref_q, ref_scb, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
    packed = int8.quantize_int8_rows(weight)
    assert torch.equal(packed.scb, ref_scb)
    ref_q[7] = 0                                      # bitsandbytes writes 0 * inf = nan -> garbage there
    assert torch.equal(packed.weight, ref_q)


def test_int8_rows_beyond_float16_takes_the_float32_route(monkeypatch):
    monkeypatch.setattr(int8, "_CPU_CHUNK_ELEMENTS", 1 << 10)
    weight = torch.randn(64, 100, generator=torch.Generator().manual_seed(2))
    weight[40, 3] = 70000.0
    fast = int8.quantize_int8_rows(weight)
    q, scb = int8._int8_rows_torch(weight)
    assert torch.equal(fast.weight, q) and torch.equal(fast.scb, scb)
    assert fast.scb[40] == 70000.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_found_by_every_cpu_path(monkeypatch, bad):
    monkeypatch.setattr(nf4, "_CPU_CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(int8, "_CPU_CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(int4, "_CPU_CHUNK_ELEMENTS", 1 << 12)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        weight = torch.randn(100, 300).to(dtype)
        weight[77, 201] = bad
        for quantize in (lambda w: nf4.quantize_4bit(w, "nf4", 64, True),
                         int8.quantize_int8_rows,
                         lambda w: int4.quantize_int(w, 4, True, 128),
                         lambda w: int4.quantize_int(w, 8, False, None)):
            with pytest.raises(NonFiniteWeight):
                quantize(weight)


@pytest.mark.parametrize("symmetric,bits,group_size", [(True, 4, 128), (False, 4, 32), (False, 8, None)])
def test_int_rows_chunked_equals_whole(monkeypatch, symmetric, bits, group_size):
    generator = torch.Generator().manual_seed(bits)
    weight = (torch.randn(157, 300, generator=generator) * 0.02).to(torch.bfloat16)
    whole = int4._quantize_int_rows(weight, bits, symmetric, group_size, torch.bfloat16)
    monkeypatch.setattr(int4, "_CPU_CHUNK_ELEMENTS", 1 << 11)
    monkeypatch.setattr(_parallel, "WORKERS", 2)
    packed = int4.quantize_int(weight, bits, symmetric, group_size)
    assert torch.equal(packed.q, whole[0]) and torch.equal(packed.scale, whole[1])
    assert (packed.zero_point is None) == symmetric
    if not symmetric:
        assert torch.equal(packed.zero_point, whole[2])


def test_thread_count_restored():
    before = torch.get_num_threads()
    nf4.quantize_4bit(torch.randn(600, 600), "nf4", 64, True)
    int8.quantize_int8_rows(torch.randn(600, 600))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_mean_replays_torch_split(threads):
    """The double-quant offset is torch's float32 mean with the caller's thread count, replayed on
    one thread: equal to torch's own result for sizes below, at and far above the split grain."""
    generator = torch.Generator().manual_seed(threads)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for n in (1, 7, 32768, 32769, 65537, 100_003, 180_224, 1_000_001):
            values = torch.rand(n, generator=generator) * 0.05
            assert torch.equal(nf4._mean_as_torch(values, threads), values.mean()), n
    finally:
        torch.set_num_threads(before)


def test_double_quant_offset_identical_with_many_blocks():
    """More than 32768 blocks: torch splits bitsandbytes' mean between threads; the offset still
    matches bitsandbytes' bit for bit."""
    generator = torch.Generator().manual_seed(4)
    weight = (torch.randn(2048, 1500, generator=generator) * torch.rand(2048, 1, generator=generator)).to(torch.bfloat16)
    _same_as_bnb(weight, "nf4", 64, double_quant=True)


def test_cell_table_gives_bucketize_index():
    """The CUDA kernel's NF4 codes come from a 64-cell table (one comparison instead of a binary
    search): on a dense grid of [-1, 1], every midpoint and its float32 neighbours, and the cell
    edges' neighbours, its index is torch.bucketize's. FP4's midpoints are too close for it."""
    bounds = nf4._bounds_4bit("nf4", torch.device("cpu"))[0]
    table = nf4.cell_table(bounds, 64)
    assert table is not None
    edges = torch.arange(65, dtype=torch.float32) / 32 - 1
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    values = torch.cat([torch.linspace(-1, 1, 1_000_001), bounds, torch.nextafter(bounds, up),
                        torch.nextafter(bounds, down), edges, torch.nextafter(edges, up),
                        torch.nextafter(edges, down), torch.tensor([-0.0, 0.0])]).clamp(-1, 1)
    assert torch.equal(nf4.bucket_by_cell(values, table, 64), torch.bucketize(values, bounds).to(torch.int32))
    assert nf4.cell_table(nf4._bounds_4bit("fp4", torch.device("cpu"))[0], 64) is None


def test_launch_argument_class_separates_what_triton_specializes_on():
    """qtool.kernels.launch reuses a compiled kernel for arguments of one class; the class must
    tell apart everything Triton compiles differently: dtype, 16-byte alignment, ints equal to 1,
    divisible by 16, or beyond 32 bits."""
    from qtool.kernels import _argument_class

    storage = torch.zeros(64, dtype=torch.bfloat16)
    assert _argument_class(storage[:8]) != _argument_class(storage[1:9])        # 2 bytes off alignment
    assert _argument_class(storage[:8]) == _argument_class(storage[8:16])       # 16 bytes on: aligned
    assert _argument_class(storage[:8]) != _argument_class(storage.float()[:8])
    assert len({_argument_class(v) for v in (1, 2, 16, 1 << 31, 1 << 63)}) == 5
    assert _argument_class(16) == _argument_class(32) and _argument_class(2) == _argument_class(17)
    assert _argument_class(True) != _argument_class(1)
