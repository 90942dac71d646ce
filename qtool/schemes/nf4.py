"""bitsandbytes' 4-bit formats (NF4, FP4) with optional double quantization of the block absmax.

Numerics follow bitsandbytes 0.50 on CPU so that the bytes are identical to
``bitsandbytes.functional.quantize_4bit``:

- 4-bit part (bitsandbytes' pure-torch kernel): the flattened tensor (as float32) is cut into
  blocks of ``block_size``; full blocks are scaled by ``x * (1 / absmax)`` (absmax clamped to
  1e-38), the trailing partial block by ``x / absmax``; values are clamped to [-1, 1] and mapped
  with ``bucketize`` on the midpoints of the *sorted* code, so a value exactly on a midpoint goes
  to the lower code. Two codes per byte, first element in the high nibble; an odd count is padded
  with a zero value.
- double quantization (bitsandbytes' C CPU kernel ``quantize_cpu``): ``offset = absmax.mean()``,
  then ``absmax - offset`` is quantized in blocks of 256 with the signed 8-bit dynamic map: value
  divided by the block's absmax, the closest code wins and a tie goes to the lower code.
"""
from __future__ import annotations

from collections.abc import Iterable

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from qtool.kernels import fused
from qtool.schemes._parallel import cpu_workers, run_chunks
from qtool.schemes.base import Scheme, register
from qtool.errors import BadArgument
from qtool.schemes.errors import NonFiniteWeight
from qtool.schemes.grids import CodebookGrid, Grid, GridParams, _keep_best_least_squares, _weighted

if TYPE_CHECKING:
    from collections.abc import Mapping

    from qtool.schemes.grids import QuantResult

NESTED_BLOCK_SIZE = 256
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Elements per vectorized step: bounds the float32 temporaries whatever the tensor size.
_CHUNK_ELEMENTS = 1 << 21

# The NF4 code (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], as bitsandbytes ships them.
_NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, divided by 12 below.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# Ascending order of the FP4 code as bitsandbytes sorts it: +0 (index 0) sorts before -0
# (index 8), so a scaled value <= 0 in the zero bucket becomes code 0 and a tiny positive one 8.
_FP4_ORDER = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 code of ``nf4`` or ``fp4``, indexed by the 4-bit value."""
    if quant_type == "nf4":
        return torch.tensor(_NF4_CODE, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(_FP4_RAW, dtype=torch.float32, device=device).div_(12.0)
    raise ValueError(f"unknown 4-bit type {quant_type!r}")


def _bounds_4bit(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    code = code_4bit(quant_type, device)
    if quant_type == "nf4":
        return (code[:-1] + code[1:]) / 2, None
    order = torch.tensor(_FP4_ORDER, dtype=torch.int64, device=device)
    ordered = code[order]
    return (ordered[:-1] + ordered[1:]) / 2, order.to(torch.uint8)


def cell_table(bounds: torch.Tensor, cells: int) -> torch.Tensor | None:
    """A lookup table that replaces the binary search over the sorted float32 midpoints ``bounds``
    (used by the CUDA kernel, qtool/kernels/nf4.py; ``bucket_by_cell`` is its arithmetic):
    float32 [2 * (cells + 1)], first each cell's count of midpoints below it (as int32 bits), then
    the midpoint inside it or +inf. Cell c covers [c, c + 1] * (2 / cells) - 1 widened by 1/8 cell
    on each side, as the float32 cell index of a value may be off by one next to a cell edge.
    None when two midpoints share a widened cell (FP4's around zero)."""
    values = bounds.double().tolist()
    width = 2.0 / cells
    below, inside = [], []
    for cell in range(cells + 1):
        low, high = -1.0 + (cell - 0.125) * width, -1.0 + (cell + 1.125) * width
        within = [b for b in values if low <= b <= high]
        if len(within) > 1:
            return None
        below.append(sum(b < low for b in values))
        inside.append(within[0] if within else float("inf"))
    counts = torch.tensor(below, dtype=torch.int32).view(torch.float32)
    return torch.cat([counts, torch.tensor(inside, dtype=torch.float64).float()])


def bucket_by_cell(scaled: torch.Tensor, table: torch.Tensor, cells: int) -> torch.Tensor:
    """``torch.bucketize(scaled, bounds)`` for float32 values in [-1, 1] through ``cell_table``,
    in the kernel's float32 operations: one table lookup and one comparison per value."""
    cell = ((scaled + 1.0) * (cells / 2.0)).to(torch.int32).clamp(0, cells).long()
    below = table[:cells + 1].view(torch.int32)[cell]
    return below + (scaled > table[cells + 1:][cell]).to(torch.int32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), 256 sorted values.

    For exponent i in 0..6 there are 2**i fraction steps: the midpoints of ``linspace(0.1, 1,
    2**i + 1)`` (float32) times 10**(i - 6), with both signs; plus 0 and 1.
    """
    values: list[float] = []
    for exponent in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** exponent + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32, device=device)


@dataclass
class Packed4bit:
    """What bitsandbytes keeps for one 4-bit weight (its ``Params4bit`` data + ``QuantState``)."""

    quant_type: str                 # "nf4" or "fp4"
    data: torch.Tensor              # uint8 [(numel + 1) // 2, 1], high nibble first
    absmax: torch.Tensor            # float32 [blocks], or uint8 [blocks] with double quant
    block_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype              # dtype of the original weight
    quant_map: torch.Tensor         # float32 [16]
    nested_absmax: torch.Tensor | None = None      # float32 [ceil(blocks / 256)]
    nested_quant_map: torch.Tensor | None = None   # float32 [256]
    nested_offset: float | None = None             # mean of the absmax, added back after dequantization
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def _absmax_and_scaled(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and values scaled to [-1, 1], exactly as bitsandbytes' torch kernel does."""
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return absmax, scaled


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64,
                  double_quant: bool = True) -> Packed4bit:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization takes float32/float16/bfloat16, got {weight.dtype}")
    device = weight.device
    flat = weight.reshape(-1)
    if device.type != "cpu":
        return _pack_4bit(weight, *_quantize_4bit_torch(flat, quant_type, block_size), quant_type, block_size,
                          double_quant, absmax_mean=lambda absmax: absmax.mean())
    threads = torch.get_num_threads()
    with cpu_workers():
        return _pack_4bit(weight, *_quantize_4bit_cpu(flat, quant_type, block_size), quant_type, block_size,
                          double_quant, absmax_mean=lambda absmax: _mean_as_torch(absmax, threads))


def _pack_4bit(weight: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, quant_type: str, block_size: int,
               double_quant: bool, absmax_mean) -> Packed4bit:
    if not bool(torch.isfinite(absmax).all()):
        # amax propagates nan and inf, so this checks every element of the weight.
        raise NonFiniteWeight("the weight contains inf or nan values")
    device = weight.device
    packed = Packed4bit(quant_type=quant_type, data=data.unsqueeze(1), absmax=absmax, block_size=block_size,
                        shape=tuple(weight.shape), dtype=weight.dtype, quant_map=code_4bit(quant_type, device))
    if double_quant:
        offset = absmax_mean(absmax)
        packed.absmax, packed.nested_absmax = quantize_dynamic(absmax - offset, NESTED_BLOCK_SIZE)
        packed.nested_quant_map = dynamic_map(device)
        packed.nested_offset = offset.item()
    return packed


_REDUCTION_GRAIN = 32768     # at::internal::GRAIN_SIZE


def _mean_as_torch(values: torch.Tensor, threads: int) -> torch.Tensor:
    """``values.mean()`` (float32, 1-D, contiguous) as torch computes it with ``threads`` threads,
    computed on the current thread only.

    bitsandbytes' offset is ``absmax.mean()``, and a float32 sum's rounding depends on how torch
    splits it: each of k = min(threads, ceil(n / grain)) threads sums one of k equal contiguous
    parts (ceil(n / k) elements) into its slot of a zeroed buffer of ``threads`` floats, the buffer
    is summed (torch's own sum again), then divided by n. Running that op itself with several
    threads would cost more than the sum on a busy machine (every parallel op leaves OpenMP threads
    spinning for milliseconds), so the split is replayed here; tests/test_schemes_cpu_paths.py
    checks the replay against torch's own mean, and qtool/kernels/nf4.py computes the same on CUDA.
    """
    n = values.numel()
    parts = max(1, min(threads, -(-n // _REDUCTION_GRAIN)))
    size = -(-n // parts)
    with cpu_workers():         # each part summed in one piece, as one of those threads does
        if parts == 1:
            return values.sum() / n
        buffer = torch.zeros(threads, dtype=values.dtype)
        for part, start in enumerate(range(0, n, size)):
            buffer[part] = values[start:start + size].sum()
        return buffer.sum() / n


def _quantize_4bit_torch(flat: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Any device: bitsandbytes' own formulation (bucketize on the code midpoints), chunk by chunk."""
    device = flat.device
    bounds, order = _bounds_4bit(quant_type, device)
    n = flat.numel()
    data = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=device)
    # Chunks hold an even number of whole blocks, so only the last chunk can end in a partial
    # block or an odd element: chunking changes nothing in the result.
    chunk = max(_CHUNK_ELEMENTS // block_size, 1) * block_size
    for start in range(0, n, chunk):
        part = flat[start:start + chunk].float()
        part_absmax, scaled = _absmax_and_scaled(part, block_size)
        absmax[start // block_size:start // block_size + part_absmax.numel()] = part_absmax
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        codes = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
        if order is not None:
            codes = order[codes.long()]
        pairs = codes.view(-1, 2)
        data[start // 2:start // 2 + pairs.shape[0]] = (pairs[:, 0] << 4) | pairs[:, 1]
    return data, absmax


# -- CPU path -------------------------------------------------------------------------------------
# bucketize (a binary search per element) runs at ~20 M elements/s on CPU. The CPU path finds the
# same code with two table lookups instead. The scaled value's float32 bit pattern is split into
# its top 16 bits (sign, exponent and 7 mantissa bits: a "cell", an interval of floats 2**-7 wide
# relative to their magnitude) and the rest. Cells are narrow next to the gaps between neighbouring
# code midpoints of the same magnitude, so no cell holds two midpoints (the table build checks it):
# within a cell the code is constant or changes once, at that midpoint. The threshold table holds
# the cell's midpoint (+inf where the code is constant) and the code table, at
# ``cell + 65536 * (value > threshold)``, the code: a value on a midpoint takes the lower code as
# with bucketize, and FP4's reordering is folded into the table. Values beyond +-1 (x * (1 / absmax)
# can round past 1) fall in cells holding the end codes, so no clamp is needed. Work goes in chunks
# that stay in the CPU caches, through preallocated buffers, one single-threaded torch op after
# another, on a few Python threads taking alternate chunks (see qtool/schemes/_parallel.py).
_CPU_CHUNK_ELEMENTS = 1 << 18
_CPU_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _cpu_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold float32 [65536], code uint8 [131072]) for the cells of the float32 bit pattern."""
    if quant_type not in _CPU_TABLES:
        bounds, order = _bounds_4bit(quant_type, torch.device("cpu"))
        if order is None:
            order = torch.arange(16, dtype=torch.uint8)
        cells = torch.arange(65536, dtype=torch.int64)
        ends = torch.stack([cells << 16, (cells << 16) | 0xFFFF]).to(torch.int32).view(torch.float32)
        low, high = ends.amin(dim=0), ends.amax(dim=0)
        finite = torch.isfinite(low) & torch.isfinite(high)        # nan/inf patterns never occur
        low = torch.where(finite, low, torch.zeros_like(low))
        high = torch.where(finite, high, torch.zeros_like(high))
        code_low = torch.bucketize(low, bounds)
        code_high = torch.bucketize(high, bounds)
        if int((code_high - code_low).max()) > 1:
            raise AssertionError(f"{quant_type}: a table cell holds two code midpoints")
        padded = torch.cat([bounds, torch.tensor([float("inf")])])
        threshold = torch.where(code_high > code_low, padded[code_low], torch.tensor(float("inf")))
        code = torch.cat([order[code_low], order[(code_low + 1).clamp(max=15)]]).to(torch.uint8)
        _CPU_TABLES[quant_type] = (threshold.contiguous(), code.contiguous())
    return _CPU_TABLES[quant_type]


class _CpuBuffers:
    """Per-thread scratch of one chunk, kept for the thread's next tensors (fresh memory costs a
    page fault per 4 KiB on first touch)."""

    _local = threading.local()

    @classmethod
    def get(cls, chunk: int) -> _CpuBuffers:
        buffers = getattr(cls._local, "buffers", None)
        if buffers is None or buffers.values.numel() < chunk:
            buffers = cls._local.buffers = cls(max(chunk, _CPU_CHUNK_ELEMENTS))
        return buffers

    def __init__(self, chunk: int) -> None:
        self.values = torch.empty(chunk, dtype=torch.float32)
        self.scaled = torch.empty(chunk, dtype=torch.float32)
        self.cell = torch.empty(chunk, dtype=torch.int32)
        self.above = torch.empty(chunk, dtype=torch.bool)
        self.codes = torch.empty(chunk, dtype=torch.uint8)
        self.pairs = torch.empty(chunk // 2, dtype=torch.int16)


def _quantize_4bit_cpu_chunk(x: torch.Tensor, block_size: int, threshold_table: torch.Tensor,
                             code_table: torch.Tensor, buffers: _CpuBuffers, data: torch.Tensor,
                             absmax: torch.Tensor) -> None:
    """Whole blocks ``x`` (an even count of elements) -> packed ``data`` and float32 ``absmax``."""
    n = x.numel()
    values, scaled, cell = buffers.values[:n], buffers.scaled[:n], buffers.cell[:n]
    above, codes, pairs = buffers.above[:n], buffers.codes[:n], buffers.pairs[:n // 2]
    values.copy_(x)
    torch.abs(values, out=scaled)
    torch.amax(scaled.view(-1, block_size), dim=1, out=absmax)
    inverse = 1.0 / absmax.clamp(min=1e-38)
    torch.mul(values.view(-1, block_size), inverse.unsqueeze(1), out=scaled.view(-1, block_size))
    torch.bitwise_right_shift(scaled.view(torch.int32), 16, out=cell)
    cell.bitwise_and_(0xFFFF)
    torch.index_select(threshold_table, 0, cell, out=values)
    torch.gt(scaled, values, out=above)
    cell.add_(above, alpha=65536)
    torch.index_select(code_table, 0, cell, out=codes)
    # Bytes (even, odd) read as little-endian int16 e + 256 * o; (w | w << 12) >> 8 has 16 * e + o
    # in its low byte, which the uint8 copy keeps.
    words = codes.view(torch.int16)
    torch.bitwise_left_shift(words, 12, out=pairs)
    pairs.bitwise_or_(words).bitwise_right_shift_(8)
    data.copy_(pairs)


def _quantize_4bit_cpu(flat: torch.Tensor, quant_type: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    full = n - n % block_size
    data = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32)
    threshold_table, code_table = _cpu_tables(quant_type)
    chunk = max(_CPU_CHUNK_ELEMENTS // block_size, 1) * block_size      # whole blocks, an even count

    def work(starts: Iterable[int]) -> None:
        buffers = _CpuBuffers.get(min(chunk, full))
        for start in starts:
            end = min(start + chunk, full)
            _quantize_4bit_cpu_chunk(flat[start:end], block_size, threshold_table, code_table, buffers,
                                     data[start // 2:end // 2], absmax[start // block_size:end // block_size])

    if full:
        run_chunks(range(0, full, chunk), work)
    if full < n:
        # The trailing partial block (and an odd element): bitsandbytes divides instead of multiplying.
        tail_data, tail_absmax = _quantize_4bit_torch(flat[full:], quant_type, block_size)
        data[full // 2:] = tail_data
        absmax[-1:] = tail_absmax
    return data, absmax


def quantize_dynamic(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of float32 ``values`` with the dynamic map (bitsandbytes' CPU kernel).

    Returns (codes uint8, per-block absmax float32). bitsandbytes' CPU kernel does not search the
    map: it scales by ``1 / absmax``, clamps to [-1, 1], turns the value into one of 65536 evenly
    spaced bins (``trunc(((v + 1) * 0.5) * 65535 + 0.5)``) and reads the code of the bin's centre
    from a table built by nearest-code (midpoint, tie to the lower code) search. A block whose
    absmax is 0 gets code 0 everywhere.
    """
    lut = _dynamic_lut(values.device)
    n = values.numel()
    blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(values.float().reshape(-1), (0, blocks * block_size - n)).view(blocks, block_size)
    # Padding zeros never raise a block's absmax.
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = torch.clamp(padded * inverse.unsqueeze(1), -1.0, 1.0)
    bins = (((scaled + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    codes = torch.index_select(lut, 0, bins.reshape(-1)).view(blocks, block_size)
    codes.masked_fill_((absmax == 0).unsqueeze(1), 0)
    return codes.reshape(-1)[:n], absmax


_LUT_CACHE: dict[torch.device, torch.Tensor] = {}


def _dynamic_lut(device: torch.device) -> torch.Tensor:
    if device not in _LUT_CACHE:
        code = dynamic_map(device)
        midpoints = 0.5 * (code[:-1] + code[1:])
        centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=device)) / 65535.0
        _LUT_CACHE[device] = torch.bucketize(centres, midpoints).to(torch.uint8)
    return _LUT_CACHE[device]


def dequantize_dynamic(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int) -> torch.Tensor:
    n = codes.numel()
    blocks = absmax.numel()
    values = code[codes.reshape(-1).long()]
    values = torch.nn.functional.pad(values, (0, blocks * block_size - n)).view(blocks, block_size)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n]


def block_absmax(packed: Packed4bit) -> torch.Tensor:
    """The float32 absmax of every 4-bit block (undoing the double quantization)."""
    if not packed.double_quant:
        return packed.absmax.float()
    absmax = dequantize_dynamic(packed.absmax, packed.nested_absmax, packed.nested_quant_map,
                                packed.nested_block_size)
    return absmax + torch.tensor(packed.nested_offset, dtype=torch.float32, device=absmax.device)


def dequantize_4bit(packed: Packed4bit) -> torch.Tensor:
    n = 1
    for size in packed.shape:
        n *= size
    data = packed.data.reshape(-1)
    codes = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)[:n]
    values = packed.quant_map[codes.long()]
    absmax = block_absmax(packed)
    blocks = absmax.numel()
    values = torch.nn.functional.pad(values, (0, blocks * packed.block_size - n)).view(blocks, packed.block_size)
    return (values * absmax.unsqueeze(1)).reshape(-1)[:n].to(packed.dtype).reshape(packed.shape)


def _params(params: dict[str, Any]) -> tuple[int, bool]:
    block_size = int(params.get("block_size", 64))
    double_quant = bool(params.get("double_quant", True))
    return block_size, double_quant


class Bnb4bitGrid(CodebookGrid):
    """bitsandbytes' NF4 / FP4 blocks: value = absmax * code[level], the float32 absmax of each block
    being the chosen scale. Levels index the code sorted ascending (FP4's is not; the packing maps
    them back). With ``double_quant`` the absmaxes of the whole tensor are stored as bitsandbytes'
    double quantization does (offset = their mean, then 8-bit dynamic codes in blocks of 256), and
    the levels are chosen for those decoded scales, so the packed file holds exactly the weight the
    method evaluated. Blocks run along rows, as bitsandbytes' blocks of the flattened weight do when
    the block size divides the row length."""

    def __init__(self, quant_type: str, block: int, double_quant: bool) -> None:
        super().__init__(quant_type, block, torch.sort(code_4bit(quant_type)).values)
        self.double_quant = double_quant
        self.whole_tensor_scales = double_quant

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        # The shrink candidates' levels, each with its weighted least-squares scale (the absmax is a
        # free float here, unlike IQ4_NL's fp16 d): about 3% lower output error than the shrink alone
        # on SmolLM2's layers.
        weights = _weighted(w, weights)
        absmax = w.abs().amax(-1, keepdim=True)
        table = self.codebook.to(w.device)
        best_score = torch.full_like(absmax, -1.0)
        best_scale = absmax.clone()
        for factor in self.shrink:
            levels = self.encode(w, (absmax * factor).expand_as(w), torch.zeros_like(w))
            best_score, best_scale = _keep_best_least_squares(w, weights, table[levels.long()], best_score, best_scale)
        return GridParams(best_scale, torch.zeros_like(best_scale))

    def finish(self, params: GridParams) -> GridParams:
        if not self.double_quant:
            return params
        absmax = params.scale.reshape(-1).to(torch.float32)      # block order = row-major
        offset = absmax.mean()
        codes, nested_absmax = quantize_dynamic(absmax - offset, NESTED_BLOCK_SIZE)
        # The decoded absmax, computed as bitsandbytes' dequantize_4bit does (blockwise decode, + offset).
        decoded = dequantize_dynamic(codes, nested_absmax, dynamic_map(absmax.device), NESTED_BLOCK_SIZE) + offset
        extra = dict(params.extra, absmax_codes=codes.reshape(params.scale.shape), nested_absmax=nested_absmax,
                     nested_offset=offset)
        return GridParams(decoded.reshape(params.scale.shape), params.offset, extra)


class _Bnb4bit(Scheme):
    family = "bnb"
    params = ("block_size", "double_quant")
    checks_finite = True        # quantize raises NonFiniteWeight itself
    bits = 4.0
    quant_type = "nf4"
    block_size = 64
    triton_module = "nf4"

    def quantize(self, weight: torch.Tensor, **params: Any) -> Packed4bit:
        if weight.is_cuda and (fused_kernel := fused(self)) is not None:
            return fused_kernel(weight, **params)
        block_size, double_quant = _params(params)
        return quantize_4bit(weight, self.quant_type, block_size, double_quant)

    def dequantize(self, packed: Packed4bit) -> torch.Tensor:
        return dequantize_4bit(packed)

    def calibration_grid(self, *, group_size: int | None = None, double_quant: bool = False, **_: Any) -> Grid:
        return Bnb4bitGrid(self.quant_type, group_size or self.block_size, double_quant)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> Packed4bit:
        """A Bnb4bitGrid result: the absmax of each block is the chosen scale (bitsandbytes decodes
        absmax * code[nibble]); with double quant, the 8-bit codes, nested absmax and offset the grid
        decoded its scales from."""
        block_size, double_quant = _params(dict(params))
        rows, cols = result.levels.shape
        if cols % block_size:
            # bitsandbytes' blocks run over the flattened weight; the grid's blocks are within rows.
            raise BadArgument(f"--block-size {block_size}: calibrated {self.name} needs rows that are a multiple "
                              f"of the block size; {tensor_name} has {cols} columns (use --method rtn or another "
                              "block size)")
        if double_quant != ("absmax_codes" in result.extra):
            raise ValueError(f"{tensor_name}: the result's double quantization does not match the plan's")
        code = code_4bit(self.quant_type)
        # Grid levels index the code sorted ascending; the stored nibble indexes bitsandbytes' code.
        nibble_of_level = torch.argsort(code, stable=True).to(torch.uint8)
        nibbles = nibble_of_level[result.levels.reshape(-1).long()]
        if nibbles.numel() % 2:
            nibbles = torch.nn.functional.pad(nibbles, (0, 1))
        pairs = nibbles.view(-1, 2)
        data = ((pairs[:, 0] << 4) | pairs[:, 1]).unsqueeze(1)
        packed = Packed4bit(quant_type=self.quant_type, data=data, absmax=result.scale.reshape(-1).to(torch.float32),
                            block_size=block_size, shape=(rows, cols), dtype=dtype, quant_map=code)
        if double_quant:
            packed.absmax = result.extra["absmax_codes"].reshape(-1).to(torch.uint8)
            packed.nested_absmax = result.extra["nested_absmax"].reshape(-1).to(torch.float32)
            packed.nested_quant_map = dynamic_map()
            packed.nested_offset = float(result.extra["nested_offset"])
        return packed


@register
class NF4(_Bnb4bit):
    name = "nf4"
    quant_type = "nf4"


@register
class FP4(_Bnb4bit):
    name = "fp4"
    quant_type = "fp4"
