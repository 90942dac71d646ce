"""NF4 / FP4 with double quantization in Triton, the bytes of qtool.schemes.nf4.

1. ``_quantize_4bit_kernel``: per block of ``block_size`` elements the absmax, the scaled values
   (``x * (1 / absmax)`` for whole blocks, ``x / absmax`` for the trailing partial one, as
   bitsandbytes' torch kernel), the 4-bit code (the number of sorted code midpoints strictly below
   the value: torch.bucketize's rule, so a value on a midpoint takes the lower code; NF4 reads it
   from a 64-cell table, FP4, whose midpoints are too close for cells, by binary search and then
   maps the sorted position to its bit pattern) and two codes per byte, high nibble first.
2. ``_part_sum_kernel`` (double quantization): the offset is bitsandbytes' ``absmax.mean()`` as
   torch computes it on the CPU, whose float32 rounding depends on its summation order (split
   between threads, then a cascade over 8-float vectors); this kernel replays each thread's share
   exactly (see ``absmax_mean``), so the offset is the CPU path's to the bit.
3. ``_quantize_dynamic_kernel``: torch's second pass over the threads' sums, then ``absmax -
   offset`` in blocks of 256 with bitsandbytes' 8-bit dynamic map, through the same 65536-bin
   table as the CPU path.

``quantize_4bit_async`` only enqueues (three launches with double quantization); ``finish`` reads
the offset (or the inf/NaN flag) back, the one host sync per weight.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
import triton
import triton.language as tl

from qtool.kernels import launch, read_flags
from qtool.schemes import nf4 as cpu
from qtool.schemes.errors import NonFiniteWeight

# Elements per program of the 4-bit kernel (whole blocks) and its warps: 2048 bf16 elements with 4
# warps, 16 elements a thread, was the fastest on an H100 (GPU time, benchmarks/bench_gpu.py --sweep).
_ELEMENTS_PER_PROGRAM = 2048
_NUM_WARPS = 4
_USE_CELLS = True     # NF4 codes from the cell table: 1.5x the binary search's speed on an H100
_MAX_SUMS = 8                   # sums the dynamic kernel adds in order (absmax_mean's parts below 8 lanes)
_MAX_SUMS_CONSTEXPR = tl.constexpr(_MAX_SUMS)
_NESTED_ROWS = 32         # nested blocks (of 256) per program of the dynamic kernel


@triton.jit
def _clamp(v, low, high):
    # torch.clamp's rule: a bound replaces v only when v is beyond it, so -0.0 and NaN stay.
    v = tl.where(v < low, low, v)
    return tl.where(v > high, high, v)


@triton.jit
def _bucketize16(v, bounds_ptr):
    """Number of the 15 sorted midpoints strictly below v (torch.bucketize's index), by binary
    search: 4 comparisons and 11 selects instead of 15 comparisons and additions."""
    b0 = tl.load(bounds_ptr + 0)
    b1 = tl.load(bounds_ptr + 1)
    b2 = tl.load(bounds_ptr + 2)
    b3 = tl.load(bounds_ptr + 3)
    b4 = tl.load(bounds_ptr + 4)
    b5 = tl.load(bounds_ptr + 5)
    b6 = tl.load(bounds_ptr + 6)
    b7 = tl.load(bounds_ptr + 7)
    b8 = tl.load(bounds_ptr + 8)
    b9 = tl.load(bounds_ptr + 9)
    b10 = tl.load(bounds_ptr + 10)
    b11 = tl.load(bounds_ptr + 11)
    b12 = tl.load(bounds_ptr + 12)
    b13 = tl.load(bounds_ptr + 13)
    b14 = tl.load(bounds_ptr + 14)
    upper8 = v > b7
    upper4 = v > tl.where(upper8, b11, b3)
    upper2 = v > tl.where(upper8, tl.where(upper4, b13, b9), tl.where(upper4, b5, b1))
    upper1 = v > tl.where(upper8, tl.where(upper4, tl.where(upper2, b14, b12), tl.where(upper2, b10, b8)),
                          tl.where(upper4, tl.where(upper2, b6, b4), tl.where(upper2, b2, b0)))
    return (upper8.to(tl.int32) * 8 + upper4.to(tl.int32) * 4 + upper2.to(tl.int32) * 2 + upper1.to(tl.int32))


@triton.jit
def _bucket_by_cell(v, cells_ptr, CELLS: tl.constexpr):
    """torch.bucketize's index of v in [-1, 1] (or NaN) from a table over CELLS equal cells of
    [-1, 1]: each cell's count of midpoints below it and the one midpoint that may lie inside it
    (+inf if none), so one comparison replaces the binary search. See qtool.schemes.nf4.cell_table."""
    cell = ((v + 1.0) * (CELLS / 2.0)).to(tl.int32)
    cell = tl.minimum(tl.maximum(cell, 0), CELLS)            # v = 1 -> CELLS; NaN -> a valid cell
    below = tl.load(cells_ptr + cell)
    midpoint = tl.load(cells_ptr + (CELLS + 1) + cell)
    return below.to(tl.int32, bitcast=True) + (v > midpoint).to(tl.int32)


@triton.jit
def _quantize_4bit_kernel(x_ptr, data_ptr, absmax_ptr, nonfinite_ptr, bounds_ptr, n, n_blocks, order_table,
                          BLOCK: tl.constexpr, ROWS: tl.constexpr, FP4: tl.constexpr, FLAG: tl.constexpr,
                          CELLS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    block_ids = pid * ROWS + tl.arange(0, ROWS)
    offsets = block_ids[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    # Triton's max ignores NaN; as +inf it still marks the block non-finite (the caller raises).
    absmax = tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis=1)
    # 1e-38 is a float32 subnormal (a Python float that small would make Triton use float64): an
    # all-zero block scales by 1e38 instead of dividing by zero.
    clamped = _clamp(absmax, tl.full([ROWS], 1e-38, tl.float32), float("inf"))
    inverse = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), clamped)
    if (pid + 1) * ROWS * BLOCK > n:
        partial = (block_ids + 1) * BLOCK > n
        scaled = tl.where(partial[:, None], tl.math.div_rn(x, clamped[:, None]), x * inverse[:, None])
        absmax = tl.where(partial, clamped, absmax)
    else:
        scaled = x * inverse[:, None]
    scaled = _clamp(scaled, -1.0, 1.0)
    if CELLS > 0:
        code = _bucket_by_cell(scaled, bounds_ptr, CELLS)
    else:
        code = _bucketize16(scaled, bounds_ptr)
    if FP4:
        # Sorted position -> FP4 bit pattern, a 16-nibble table in one integer.
        code = ((order_table >> (code.to(tl.int64) * 4)) & 15).to(tl.int32)
    high, low = tl.split(tl.reshape(code, [ROWS, BLOCK // 2, 2]))
    packed = ((high << 4) | low).to(tl.uint8)
    byte_offsets = block_ids[:, None] * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
    tl.store(data_ptr + byte_offsets, packed, mask=byte_offsets < (n + 1) // 2)
    tl.store(absmax_ptr + block_ids, absmax, mask=block_ids < n_blocks)
    if FLAG:
        # This program's inf/NaN flag, one slot per program (nothing to zero before the launch).
        # With double quantization the offset, a mean of the absmax, is non-finite then instead.
        tl.store(nonfinite_ptr + pid, tl.max((absmax == float("inf")).to(tl.int32), axis=0))


@triton.jit
def _group_sum(base, first, count, W: tl.constexpr):
    """The running sum of runs first .. first + count - 1 (count <= 16), each run a running sum of
    16 rows of W floats. The 16 runs are summed side by side as a [16, W] tile, whose run axis a
    one-warp program keeps within each thread, then added in order (picking run k out of the tile
    is exact: the other terms are zeros)."""
    run = tl.arange(0, 16)[:, None]
    column = tl.arange(0, W)[None, :]
    valid = run < count
    runs = tl.zeros([16, W], tl.float32)
    for j in tl.static_range(16):
        runs += tl.load(base + ((first + run) * 16 + j) * W + column, mask=valid, other=0.0)
    total = tl.zeros([W], tl.float32)
    for k in tl.static_range(16):
        total = tl.where(k < count, total + tl.sum(tl.where(run == k, runs, 0.0), axis=0), total)
    return total


@triton.jit
def _row_sum(base, first, count, W: tl.constexpr):
    """The running sum of rows first .. first + count - 1 (count < 16) of W floats, per column."""
    column = tl.arange(0, W)
    total = tl.zeros([W], tl.float32)
    for j in tl.static_range(16):
        valid = j < count
        total = tl.where(valid, total + tl.load(base + (first + j) * W + column, mask=valid, other=0.0), total)
    return total


@triton.jit(do_not_specialize=["n", "part_size"])
def _part_sum_kernel(values_ptr, partials_ptr, n, part_size, LANES: tl.constexpr):
    """Program p: torch's float32 CPU ``sum`` of part p of ``values`` (one thread's share), in its
    order (aten/src/ATen/native/cpu/SumKernel.cpp, contiguous inner reduction):

    - the part is read as ``m // LANES`` vectors of LANES floats (the CPU's vector width) and those
      as rows of 4 vectors (4 accumulators for instruction-level parallelism): each of the 4*LANES
      columns is summed over the rows by a 4-level cascade with steps of 16 rows (a running sum of
      16 rows, running sums of 16 of those, of 16 of those, and one running sum on top; then the
      unfinished levels, lowest first);
    - the 0-3 vectors after the last whole row go to accumulator 0, then accumulators 1, 2 and 3;
    - finally a scalar running sum: the 0..LANES-1 trailing floats, then the LANES lanes in order.

    Masked-out terms add exact zeros (all values are >= 0). The loop over groups of 256 rows is not
    unrolled (unrolled, an earlier version took about 50 s to compile on first use); within a group
    the 16 runs of 16 rows are summed side by side (_group_sum). The cascade's step stays 16 up to
    2**19 rows, which the launcher checks.
    """
    W: tl.constexpr = 4 * LANES
    part = tl.program_id(0).to(tl.int64)
    start = part * part_size
    m = tl.maximum(tl.minimum(n - start, part_size), 0)      # programs past the last part write 0
    base = values_ptr + start
    rows = (m // LANES) // 4
    chunks = rows // 16
    groups = chunks // 16
    acc2 = tl.zeros([W], tl.float32)
    acc3 = tl.zeros([W], tl.float32)
    for group in range(groups):
        acc1 = _group_sum(base, group * 16, 16, W)
        acc2 += acc1
        flush = (group + 1) % 16 == 0
        acc3 = tl.where(flush, acc3 + acc2, acc3)
        acc2 = tl.where(flush, 0.0, acc2)
    acc1 = _group_sum(base, groups * 16, chunks - groups * 16, W)
    acc0 = _row_sum(base, chunks * 16, rows - chunks * 16, W)
    total = tl.reshape(((acc0 + acc1) + acc2) + acc3, [4, LANES])
    tl.store(partials_ptr + part, _finish_sum(base, m, total, LANES))


@triton.jit
def _finish_sum(base, m, total, LANES: tl.constexpr):
    """The end of torch's CPU sum of the ``m`` floats at ``base`` (see _part_sum_kernel), from the
    column totals of its whole rows of 4 vectors ([4, LANES]): the 4 accumulators' lanes, the 0-3
    vectors after the rows, the scalar tail, then the lanes in order."""
    vectors = m // LANES
    rows = vectors // 4
    accumulator = tl.arange(0, 4)[:, None]
    # Row k of a [4, LANES] tile, exactly: every other term of the sum is zero.
    p0 = tl.sum(tl.where(accumulator == 0, total, 0.0), axis=0)
    p1 = tl.sum(tl.where(accumulator == 1, total, 0.0), axis=0)
    p2 = tl.sum(tl.where(accumulator == 2, total, 0.0), axis=0)
    p3 = tl.sum(tl.where(accumulator == 3, total, 0.0), axis=0)
    lanes = tl.arange(0, LANES)
    for v in tl.static_range(3):
        valid = rows * 4 + v < vectors
        p0 = tl.where(valid, p0 + tl.load(base + (rows * 4 + v) * LANES + lanes, mask=valid, other=0.0), p0)
    p0 = ((p0 + p1) + p2) + p3
    result = tl.sum(tl.zeros([LANES], tl.float32), axis=0)
    for t in tl.static_range(LANES):
        valid = vectors * LANES + t < m
        result = tl.where(valid, result + tl.load(base + vectors * LANES + t, mask=valid, other=0.0), result)
    for t in tl.static_range(LANES):
        result = result + tl.sum(tl.where(lanes == t, p0, 0.0), axis=0)
    return result


@triton.jit
def _short_sum(base, m, LANES: tl.constexpr):
    """torch's CPU sum of m < 64 * LANES floats (fewer than 16 rows of 4 vectors: no cascade level
    is ever completed, so the column totals are running sums over the rows)."""
    total = _row_sum(base, 0, (m // LANES) // 4, 4 * LANES)
    return _finish_sum(base, m, tl.reshape(total, [4, LANES]), LANES)


@triton.jit(do_not_specialize=["n_sums", "divisor"])
def _quantize_dynamic_kernel(values_ptr, sums_ptr, n_sums, divisor, offset_out_ptr, codes_ptr, absmax_ptr,
                             lut_ptr, n, n_blocks, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                             TORCH_SUM: tl.constexpr, LANES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    # The offset (every program redoes it; see absmax_mean): the partial sums added in order, or,
    # with TORCH_SUM, summed as torch's second pass sums its threads' partials; then divided.
    if TORCH_SUM:
        total = _short_sum(sums_ptr, n_sums, LANES)
    else:
        total = tl.load(sums_ptr)
        for index in tl.static_range(1, _MAX_SUMS_CONSTEXPR):
            valid = index < n_sums
            total = tl.where(valid, total + tl.load(sums_ptr + index, mask=valid, other=0.0), total)
    offset = tl.math.div_rn(total, divisor.to(tl.float32))
    if pid == 0:
        tl.store(offset_out_ptr, offset)
    block_ids = pid * ROWS + tl.arange(0, ROWS)
    offsets = block_ids[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    valid = offsets < n
    # The CPU path pads (values - offset) with zeros, which never raise a block's absmax.
    values = tl.where(valid, tl.load(values_ptr + offsets, mask=valid, other=0.0) - offset, 0.0)
    absmax = tl.max(tl.abs(values), axis=1)
    reciprocal = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), absmax)
    inverse = tl.where(absmax > 0, reciprocal, 0.0)
    scaled = _clamp(values * inverse[:, None], -1.0, 1.0)
    bins = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)
    codes = tl.load(lut_ptr + bins)
    codes = tl.where(absmax[:, None] == 0, 0, codes).to(tl.uint8)
    tl.store(codes_ptr + offsets, codes, mask=valid)
    tl.store(absmax_ptr + block_ids, absmax, mask=block_ids < n_blocks)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(kind: str, device: torch.device) -> torch.Tensor:
    """Constant tables, built once on the CPU by the CPU path's own functions and copied to the
    device: built there, torch would divide by a constant through its reciprocal and could move a
    bin; built per call, the host-to-device copy would also stall the stream every call.
    kinds: "bounds:nf4|fp4" (sorted code midpoints), "code:nf4|fp4", "dynamic" (the 256-value map),
    "lut" (its 65536-bin table)."""
    key = (kind, device)
    if key not in _TABLES:
        cpu_device = torch.device("cpu")
        if kind == "lut":
            table = cpu._dynamic_lut(cpu_device)
        elif kind == "dynamic":
            table = cpu.dynamic_map(cpu_device)
        elif kind.startswith("code:"):
            table = cpu.code_4bit(kind[5:], cpu_device)
        elif kind.startswith("cells:"):
            table = cpu.cell_table(cpu._bounds_4bit(kind[6:], cpu_device)[0], _CELLS)
        else:
            table = cpu._bounds_4bit(kind[7:], cpu_device)[0]
        _TABLES[key] = table.contiguous().to(device)
    return _TABLES[key]


_CELLS = 64      # cells of [-1, 1] for _bucket_by_cell (see qtool.schemes.nf4.cell_table)


def _order_table(quant_type: str) -> int:
    if quant_type != "fp4":
        return 0
    return sum(code << (4 * position) for position, code in enumerate(cpu._FP4_ORDER))


_GRAIN = 32768                 # at::internal::GRAIN_SIZE
_MAX_CASCADE_ROWS = 1 << 19    # below this the CPU cascade's step is 16 rows


@functools.cache
def cpu_lanes() -> int | None:
    """Floats per vector of torch's CPU kernels here (Vectorized<float>::size()), or None when the
    capability is one whose width this module does not know."""
    # Measured: torch's float sum runs 8 lanes wide on AVX512 machines too (its reduction kernels
    # are not built for AVX512); tests/test_gpu.py checks this against the CPU path on the device.
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX2", "DEFAULT"):
        return 8
    return None


def _cascade_order(count: int, lanes: int) -> list:
    """The expression tree of torch's float32 CPU sum of ``count`` contiguous floats on one thread
    (leaves are indices; a pair is an addition), built by running SumKernel.cpp's loops on symbols."""
    def add(a, b):
        return b if a is None else (a if b is None else (a, b))

    def multi_row_sum(size: int, nrows: int, item) -> list:
        power = max(4, (1 if size <= 2 else (size - 1).bit_length()) // 4)
        step = 1 << power
        acc = [[None] * nrows for _ in range(4)]
        i = 0
        while i + step <= size:
            for _ in range(step):
                for k in range(nrows):
                    acc[0][k] = add(acc[0][k], item(i, k))
                i += 1
            for j in range(1, 4):
                for k in range(nrows):
                    acc[j][k] = add(acc[j][k], acc[j - 1][k])
                    acc[j - 1][k] = None
                if i & ((step - 1) << (j * power)):
                    break
        for i in range(i, size):
            for k in range(nrows):
                acc[0][k] = add(acc[0][k], item(i, k))
        for j in range(1, 4):
            for k in range(nrows):
                acc[0][k] = add(acc[0][k], acc[j][k])
        return acc[0]

    def row_sum(size: int, item):
        partial = multi_row_sum(size // 4, 4, lambda i, k: item(4 * i + k))
        for i in range(size // 4 * 4, size):
            partial[0] = add(partial[0], item(i))
        for k in range(1, 4):
            partial[0] = add(partial[0], partial[k])
        return partial[0]

    if count < lanes:       # not vectorized: torch's scalar_outer_sum on one row
        return row_sum(count, lambda i: i)
    vectors = count // lanes
    result = None
    for index in range(vectors * lanes, count):
        result = add(result, index)
    for lane in range(lanes):
        result = add(result, row_sum(vectors, lambda i, lane=lane: i * lanes + lane))
    return result


def _is_running_sum(tree, count: int) -> bool:
    """Whether ``tree``, with leaves >= count removed (zeros), adds leaves 0..count-1 in order."""
    def prune(node):
        if isinstance(node, int):
            return node if node < count else None
        left, right = prune(node[0]), prune(node[1])
        return right if left is None else (left if right is None else (left, right))

    node = prune(tree)
    for expected in range(count - 1, 0, -1):
        if not (isinstance(node, tuple) and node[1] == expected):
            return False
        node = node[0]
    return node == 0


@functools.lru_cache(maxsize=1024)
def _mean_plan(n: int, threads: int) -> tuple[int, int, bool, bool] | None:
    """How absmax_mean replays torch's mean of n floats on ``threads`` CPU threads: (part sums to
    launch, part size, torch_sum, second level), or None for the CPU path's own function. Cached:
    the cascade check below builds an expression tree in Python."""
    lanes = cpu_lanes()
    parts = max(1, min(threads, -(-n // _GRAIN)))
    size = -(-n // parts)
    if lanes is None or n < lanes or size // (4 * lanes) >= _MAX_CASCADE_ROWS:
        return None
    if parts == 1:
        return 1, size, False, False
    if threads >= lanes:
        return threads, size, threads < 64 * lanes, threads >= 64 * lanes
    if parts <= _MAX_SUMS and _is_running_sum(_cascade_order(threads, lanes), parts):
        return parts, size, False, False
    return None


def _part_sums(values: torch.Tensor, count: int, total: int, part_size: int) -> torch.Tensor:
    sums = torch.empty(count, dtype=torch.float32, device=values.device)
    launch(_part_sum_kernel, (count,), values, sums, total, part_size, LANES=cpu_lanes(), num_warps=1,
           enable_fp_fusion=False)
    return sums


def absmax_mean(absmax: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, int, bool]:
    """What the dynamic kernel needs for ``qtool.schemes.nf4._mean_as_torch(absmax, threads)`` on
    the GPU: (sums, divisor, torch_sum); the offset is the sum of ``sums`` divided by ``divisor``,
    the sum taken in order, or with ``torch_sum`` as torch sums its threads' partials.

    One thread's share (k = 1) is one program of ``_part_sum_kernel``; with k parts their sums go
    into a buffer of ``threads`` floats (zeros past k) which torch sums again (the dynamic kernel
    does that second pass itself up to 64 * lanes threads; more take one more launch: the second
    level), or, for fewer threads than lanes, the parts are added in order where that is torch's
    order. Anything else (an unknown CPU, tiny or enormous tensors) runs the CPU path's own
    function on a copy of the absmax."""
    threads = torch.get_num_threads() if threads is None else threads
    n = absmax.numel()
    plan = _mean_plan(n, threads)
    if plan is None:
        return cpu._mean_as_torch(absmax.cpu(), threads).to(absmax.device).reshape(1), 1, False
    count, size, torch_sum, second_level = plan
    sums = _part_sums(absmax, count, n, size)
    if second_level:
        return _part_sums(sums, 1, count, count), n, False
    return sums, n, torch_sum


def quantize_dynamic(values: torch.Tensor, block_size: int, sums: torch.Tensor | None = None, divisor: int = 1,
                     torch_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qtool.schemes.nf4.quantize_dynamic(values - offset, block_size)`` in one launch, the offset
    being the sum of ``sums`` (float32, on the device; none: 0; see absmax_mean) divided by
    ``divisor``. Returns (codes, absmax, offset as a 1-element tensor)."""
    if values.dtype != torch.float32 or values.dim() != 1 or not values.is_contiguous():
        values = values.reshape(-1).float().contiguous()
    device = values.device
    if sums is None:
        sums = torch.zeros(1, dtype=torch.float32, device=device)
    n = values.numel()
    n_blocks = -(-n // block_size)
    codes = torch.empty(n, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    offset = torch.empty(1, dtype=torch.float32, device=device)
    rows = _NESTED_ROWS if block_size <= 1024 else 1
    grid = (max(1, -(-n_blocks // rows)),)
    launch(_quantize_dynamic_kernel, grid, values, sums, sums.numel(), divisor, offset, codes, absmax,
           _table("lut", device), n, n_blocks, BLOCK=block_size, ROWS=rows, TORCH_SUM=torch_sum,
           LANES=cpu_lanes() or 8, num_warps=4, enable_fp_fusion=False)
    return codes, absmax, offset


def quantize_4bit_async(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64,
                        double_quant: bool = True) -> tuple[cpu.Packed4bit, torch.Tensor]:
    """The kernels enqueued, nothing read back: (packed, status) where ``status`` (on the device)
    is the double-quant offset (1 element), or without double quantization the 4-bit kernel's
    per-program inf/NaN flags; ``finish`` reads it. bitsandbytes' ``quantize_4bit`` also leaves its
    offset on the GPU.

    The code tables in the result are shared, cached device tensors (read-only)."""
    if block_size not in cpu.BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {cpu.BLOCK_SIZES}, got {block_size}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization takes float32/float16/bfloat16, got {weight.dtype}")
    device = weight.device
    flat = weight if weight.is_contiguous() else weight.contiguous()   # the kernels index it flat
    n = flat.numel()
    n_blocks = -(-n // block_size)
    data = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    double_quant = double_quant and n_blocks > 0
    rows = max(1, _ELEMENTS_PER_PROGRAM // block_size)
    grid = (-(-n_blocks // rows),)
    if double_quant:
        status = absmax          # no flags written (FLAG off); the offset is the status below
    elif n_blocks:
        status = torch.empty(grid[0], dtype=torch.int32, device=device)
    else:
        status = torch.zeros(1, dtype=torch.int32, device=device)
    if n_blocks:
        cells = _CELLS if _USE_CELLS and quant_type == "nf4" else 0
        table = _table(f"cells:{quant_type}" if cells else f"bounds:{quant_type}", device)
        launch(_quantize_4bit_kernel, grid, flat, data, absmax, status, table, n, n_blocks, _order_table(quant_type),
               BLOCK=block_size, ROWS=rows, FP4=quant_type == "fp4", FLAG=not double_quant, CELLS=cells,
               num_warps=_NUM_WARPS, enable_fp_fusion=False)
    packed = cpu.Packed4bit(quant_type=quant_type, data=data.unsqueeze(1), absmax=absmax, block_size=block_size,
                            shape=tuple(weight.shape), dtype=weight.dtype, quant_map=_table(f"code:{quant_type}", device))
    if not double_quant:
        return packed, status
    sums, divisor, torch_sum = absmax_mean(absmax)
    packed.absmax, packed.nested_absmax, offset = quantize_dynamic(absmax, cpu.NESTED_BLOCK_SIZE, sums, divisor,
                                                                   torch_sum)
    packed.nested_quant_map = _table("dynamic", device)
    return packed, offset


def finish(packed: cpu.Packed4bit, status: torch.Tensor, weight: torch.Tensor) -> cpu.Packed4bit:
    """Read what ``quantize_4bit_async`` left on the device (one host sync): the offset becomes
    ``packed.nested_offset``; inf/NaN in the weight raises NonFiniteWeight, as the CPU path does."""
    if not packed.double_quant:
        read_flags(status)
        return packed
    offset = status.item()
    # A NaN or inf block absmax makes the offset non-finite (so can an overflowing sum, which the
    # CPU path writes as it is).
    if not math.isfinite(offset) and not bool(torch.isfinite(weight).all()):
        raise NonFiniteWeight("the weight contains inf or nan values")
    packed.nested_offset = offset
    return packed


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64,
                  double_quant: bool = True) -> cpu.Packed4bit:
    return finish(*quantize_4bit_async(weight, quant_type, block_size, double_quant), weight)


def _scheme_quantize(quant_type: str):
    def quantize(weight: torch.Tensor, **params: Any) -> cpu.Packed4bit:
        block_size, double_quant = cpu._params(params)
        return quantize_4bit(weight, quant_type, block_size, double_quant)

    quantize.__name__ = f"quantize_{quant_type}"
    return quantize


FUSED = {"nf4": _scheme_quantize("nf4"), "fp4": _scheme_quantize("fp4")}
