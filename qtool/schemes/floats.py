"""Floating-point encodings in compressed-tensors' layouts (what llm-compressor writes and vLLM runs):

- ``fp8``: FP8 E4M3 weights with one scale per output channel, inputs quantized to FP8 per token by
  the runtime (llm-compressor's FP8_DYNAMIC);
- ``fp8-block``: FP8 E4M3 weights with one scale per 128 x 128 block (the layout of DeepSeek-V3's and
  Qwen3's FP8 checkpoints), inputs quantized to FP8 per group of 128 by the runtime (FP8_BLOCK);
- ``nvfp4a16`` / ``nvfp4``: NVFP4 weights: E2M1 values in groups of 16, each with an E4M3 scale, under one
  float32 global scale per tensor (shared by the Linears vLLM fuses: the sink gives it); ``nvfp4`` also has
  the runtime quantize the inputs to NVFP4 under a calibrated global scale (llm-compressor's NVFP4);
- ``mxfp4a16`` / ``mxfp4``: MXFP4 weights (E2M1 in groups of 32 with E8M0 power-of-two scales);
  ``mxfp4`` also has the runtime quantize the inputs to MXFP4 (dynamic groups of 32).

``fp8`` can also take a static per-tensor input scale from calibration (``act_strategy: tensor``). GPTQ and
the importance search fit ``fp8`` and ``mxfp4*`` on their grids (``FloatGrid``).

The numbers are compressed-tensors' own (``calculate_qparams`` on a min/max observer, ``quantize``,
the compressors' packing), taken in the same dtypes so that the bytes agree: the weight's range and
its scale are computed in the weight's dtype (bfloat16 division included), FP8 values are the
clamped quotient cast to ``float8_e4m3fn`` (round to nearest even), E2M1 values round half to even on
its grid (0, 0.5, 1, 1.5, 2, 3, 4, 6) with a zero keeping the sign of the value it came from.

Pure torch, any device, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from qtool.kernels import fused
from qtool.schemes.base import Scheme, register
from qtool.schemes.errors import NonFiniteWeight
from qtool.schemes.grids import Grid, GridParams, QuantResult
from qtool.schemes.mxfp4 import E2M1_VALUES, SCALE_BIAS, unpack_e2m1

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
E2M1_MAX = 6.0
FP8_BLOCK = 128          # fp8-block's block edge (rows and columns)
NVFP4_GROUP = 16
MXFP4_GROUP = 32


@dataclass
class PackedFloat:
    """Float-quantized weight as compressed-tensors stores it."""

    values: torch.Tensor                 # float8_e4m3fn [rows, cols], or uint8 [rows, cols / 2]: E2M1 codes, two a byte
    scale: torch.Tensor                  # fp8: [rows, 1] or [row blocks, col blocks] in ``dtype``; nvfp4: float8_e4m3fn
                                         # [rows, cols / 16]; mxfp4: uint8 E8M0 exponents [rows, cols / 32]
    global_scale: torch.Tensor | None    # nvfp4: float32 [1] (values = e2m1 * scale / global_scale); else None
    shape: tuple[int, ...]
    dtype: torch.dtype
    tile: tuple[int, int] | None = None  # fp8 per tile: its rows and columns (edge tiles are partial)


def _absmax(groups: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """compressed-tensors' symmetric range: max(|min(x, 0)|, max(x, 0)) over ``dims``, in x's dtype."""
    low = groups.amin(dim=dims).clamp(max=0)
    high = groups.amax(dim=dims).clamp(min=0)
    absmax = torch.maximum(low.abs(), high)
    if not bool(torch.isfinite(absmax).all()):
        raise NonFiniteWeight("the weight contains inf or nan values")
    return absmax


def _matrix(weight: torch.Tensor, what: str, multiple: int = 1) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"{what} quantizes matrices, got shape {tuple(weight.shape)}")
    if weight.shape[1] % multiple:
        raise ValueError(f"{what} needs the columns ({weight.shape[1]}) to be a multiple of {multiple}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{what} quantizes float weights, got {weight.dtype}")
    return weight


def _nonzero(scale: torch.Tensor, eps: float) -> torch.Tensor:
    """A zero scale (an all-zero group) becomes ``eps``, as calculate_qparams does."""
    return torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype, device=scale.device), scale)


def _to_fp8(scaled: torch.Tensor) -> torch.Tensor:
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8)


# -- E2M1 (FP4) codes ------------------------------------------------------------------------------

def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 codes (sign bit 3, magnitude index 0..7) of ``x`` clamped to +-6 and rounded on the E2M1 grid,
    ties to the even code; a negative value rounding to zero keeps its sign (a -0 code) while -0.0 itself
    does not, as compressed-tensors' CPU path packs them."""
    magnitude = x.abs().clamp(max=E2M1_MAX)
    # Thresholds between neighbouring grid values; at a tie the even code wins (<= for even below, < for odd).
    index = ((magnitude > 0.25).to(torch.uint8) + (magnitude >= 0.75) + (magnitude > 1.25) + (magnitude >= 1.75)
             + (magnitude > 2.5) + (magnitude >= 3.5) + (magnitude > 5.0)).to(torch.uint8)
    return index | ((x < 0).to(torch.uint8) << 3)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes a byte along the last dim, the even element in the low nibble."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


# -- quantize / dequantize -------------------------------------------------------------------------

def _fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """absmax / 448 in absmax's dtype (448 taken in that dtype, as calculate_qparams does); zero -> its eps."""
    return _nonzero(absmax / torch.tensor(FP8_MAX, dtype=absmax.dtype, device=absmax.device),
                    torch.finfo(absmax.dtype).eps)


def _mx_scale(absmax: torch.Tensor) -> torch.Tensor:
    """The MXFP4 scale of groups with this absmax, a power of two in absmax's dtype (zero -> 1)."""
    exponent = SCALE_BIAS + torch.floor(torch.log2(_power_of_two_floor(absmax))) - 2
    exponent = torch.round(exponent.clamp(0, 255)).to(torch.int32)
    return _nonzero((2.0 ** (exponent - SCALE_BIAS).to(torch.float)).to(absmax.dtype), 1.0)


def _nvfp4_group_scale(absmax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4's E4M3 group scales (as float32): global * absmax / 6, absmax / 6 taken in absmax's dtype; zero -> 0.125."""
    scale = global_scale * (absmax / torch.tensor(E2M1_MAX, dtype=absmax.dtype, device=absmax.device))
    return _nonzero(scale.clamp(-FP8_MAX, FP8_MAX).to(FP8).to(scale.dtype), 0.125)


def fake_quantize_float_input(x: torch.Tensor, *, bits: int, group_size: int | None = None,
                              scale: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A Linear's input quantized and dequantized as compressed-tensors' runtime does it: FP8 with a stored
    per-tensor ``scale``, or dynamically with one scale per token (the features of a [batch, tokens, features]
    input; a 2-D input has one range, as there) or per ``group_size`` features; MXFP4 (``bits`` 4) per group
    of 32; NVFP4 (``bits`` 4 with the stored ``global_scale``) per group of 16; in x's dtype."""
    if x.numel() == 0:
        return x
    if global_scale is not None:
        values = x.unflatten(-1, (-1, NVFP4_GROUP))
        absmax = _absmax(values, (-1,)).unsqueeze(-1)
        global32 = global_scale.to(torch.float32)
        step = _nvfp4_group_scale(absmax, global32) / global32
        levels = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=x.device)[e2m1_codes(values / step).long()]
        return (levels.to(step.dtype) * step).to(x.dtype).reshape(x.shape)
    if scale is not None:
        scale = scale.to(x.dtype)
        return (_to_fp8(x / scale).to(scale.dtype) * scale).to(x.dtype)
    if group_size is not None:
        values = x.unflatten(-1, (-1, group_size))
        absmax = _absmax(values, (-1,)).unsqueeze(-1)
    elif x.dim() > 2:
        values, absmax = x, _absmax(x, tuple(range(2, x.dim()))).reshape(*x.shape[:2], *([1] * (x.dim() - 2)))
    else:
        values, absmax = x, _absmax(x, tuple(range(x.dim())))
    if bits == 8:
        scale = _fp8_scale(absmax)
        levels = _to_fp8(values / scale).to(x.dtype)
    else:
        scale = _mx_scale(absmax)
        codes = e2m1_codes(values / scale)
        levels = torch.tensor(E2M1_VALUES, dtype=x.dtype, device=x.device)[codes.long()]
    return (levels.to(scale.dtype) * scale).to(x.dtype).reshape(x.shape)


def quantize_fp8(weight: torch.Tensor, block: int | None = None) -> PackedFloat:
    """FP8 E4M3 per output channel (``block`` None) or per ``block`` x ``block`` tile (edge tiles zero-padded)."""
    matrix = _matrix(weight, "fp8")
    rows, cols = matrix.shape
    if block is None:
        scale = _absmax(matrix, (1,)).unsqueeze(1)
    else:
        padded = torch.nn.functional.pad(matrix, (0, -cols % block, 0, -rows % block))
        tiles = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
        scale = _absmax(tiles, (1, 3))
    scale = _fp8_scale(scale)
    values = _to_fp8(matrix / (scale if block is None else expand_tiles(scale, (block, block), rows, cols)))
    return PackedFloat(values, scale, None, tuple(weight.shape), weight.dtype, None if block is None else (block, block))


def expand_tiles(scale: torch.Tensor, tile: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Per-tile scales [..., ceil(rows / tile rows), ceil(cols / tile cols)] spread over the [..., rows, cols]
    elements they scale."""
    return scale.repeat_interleave(tile[0], -2)[..., :rows, :].repeat_interleave(tile[1], -1)[..., :cols]


def nvfp4_global_scale(tensor_max: torch.Tensor, global_absmax: float | None = None) -> torch.Tensor:
    """NVFP4's float32 [1] global scale, 448 * 6 / absmax taken in absmax's dtype (``global_absmax``: a larger
    absmax shared with the Linears a runtime fuses with this one; a zero or non-finite absmax gives 1)."""
    if global_absmax is not None:
        tensor_max = torch.maximum(tensor_max, torch.tensor(global_absmax, dtype=tensor_max.dtype,
                                                            device=tensor_max.device))
    tensor_max = tensor_max.clamp(min=torch.finfo(tensor_max.dtype).tiny)
    global_scale = torch.nan_to_num((FP8_MAX * E2M1_MAX) / tensor_max, nan=1.0, posinf=1.0, neginf=1.0)
    return global_scale.to(torch.float32).reshape(1)


def quantize_nvfp4(weight: torch.Tensor, global_absmax: float | None = None) -> PackedFloat:
    """NVFP4: global scale 448 * 6 / absmax (float32; ``global_absmax``: a larger absmax shared with the
    Linears a runtime fuses with this one), group scales absmax / 6 * global in E4M3."""
    matrix = _matrix(weight, "nvfp4", NVFP4_GROUP)
    rows, cols = matrix.shape
    groups = matrix.reshape(rows, cols // NVFP4_GROUP, NVFP4_GROUP)
    group_max = _absmax(groups, (2,))
    tensor_max = group_max.max() if group_max.numel() else torch.zeros((), dtype=group_max.dtype)
    global_scale = nvfp4_global_scale(tensor_max, global_absmax)
    scale = _nvfp4_group_scale(group_max, global_scale)
    scaled = groups / (scale / global_scale).unsqueeze(2)
    values = pack_nibbles(e2m1_codes(scaled).reshape(rows, cols))
    return PackedFloat(values, scale.to(FP8), global_scale, tuple(weight.shape), weight.dtype)


def _power_of_two_floor(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' round_to_power_2 for E2M1 elements: the power of two at or below ``x`` after
    adding a quarter of the mantissa's range (x >= 1.75 * 2^k goes to 2^(k+1)), on x's own bits."""
    widths = {torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5),
              torch.float32: (torch.int32, 23, 8), torch.float64: (torch.int64, 52, 11)}
    int_dtype, mantissa, exponent = widths[x.dtype]
    bits = x.contiguous().view(int_dtype).to(torch.int64) & ((1 << (mantissa + exponent + 1)) - 1)
    rounded = (bits + (1 << (mantissa - 2))) & (((1 << (exponent + 1)) - 1) << mantissa)
    if int_dtype == torch.int16:
        rounded = torch.where(rounded >= 1 << 15, rounded - (1 << 16), rounded)
    elif int_dtype == torch.int32:
        rounded = torch.where(rounded >= 1 << 31, rounded - (1 << 32), rounded)
    return rounded.to(int_dtype).view(x.dtype)


def quantize_mxfp4(weight: torch.Tensor) -> PackedFloat:
    """MXFP4: per group of 32, the E8M0 exponent of the group's absmax rounded to a power of two, less 2
    (E2M1's largest power); values clamped to +-6."""
    matrix = _matrix(weight, "mxfp4", MXFP4_GROUP)
    rows, cols = matrix.shape
    groups = matrix.reshape(rows, cols // MXFP4_GROUP, MXFP4_GROUP)
    scale = _mx_scale(_absmax(groups, (2,)))
    scaled = groups / scale.unsqueeze(2)
    values = pack_nibbles(e2m1_codes(scaled).reshape(rows, cols))
    stored = (SCALE_BIAS + torch.floor(torch.log2(scale.float())).to(torch.int32)).to(torch.uint8)
    return PackedFloat(values, stored, None, tuple(weight.shape), weight.dtype)


def dequantize_float(packed: PackedFloat) -> torch.Tensor:
    """The float weight as compressed-tensors' decompression gives it, in the weight's dtype."""
    rows, cols = packed.shape
    if packed.values.dtype == FP8:
        scale = packed.scale
        if scale.shape != (rows, 1):          # per tile
            scale = expand_tiles(scale, packed.tile or (-(-rows // scale.shape[0]), -(-cols // scale.shape[1])),
                                 rows, cols)
        return (packed.values.to(scale.dtype) * scale).to(packed.dtype).reshape(packed.shape)
    values = unpack_e2m1(packed.values).reshape(rows, packed.scale.shape[1], -1)
    if packed.global_scale is not None:
        scale = packed.scale.to(torch.float32) / packed.global_scale.to(torch.float32)
    else:
        scale = torch.ldexp(torch.ones(packed.scale.shape, device=packed.scale.device),
                            packed.scale.to(torch.int32) - SCALE_BIAS)
    return (values * scale.unsqueeze(2)).reshape(rows, cols).to(packed.dtype).reshape(packed.shape)


# -- calibration grids (GPTQ, imatrix) -------------------------------------------------------------

def _codebook(values: list[float]) -> torch.Tensor:
    return torch.tensor(sorted(set(values)), dtype=torch.float32)


# Every finite E4M3 value (253: +-0 once) and every E2M1 value (15), ascending.
FP8_CODEBOOK = _codebook(torch.arange(256, dtype=torch.uint8).view(FP8).float()[
    torch.isfinite(torch.arange(256, dtype=torch.uint8).view(FP8).float())].tolist())
E2M1_CODEBOOK = _codebook(list(E2M1_VALUES))


def _fp8_levels(levels: torch.Tensor) -> torch.Tensor:
    """Calibrated levels on FP8_CODEBOOK as the E4M3 values they index."""
    return FP8_CODEBOOK.to(levels.device)[levels.long()].to(FP8)


def _e2m1_levels_packed(levels: torch.Tensor) -> torch.Tensor:
    """Calibrated levels on E2M1_CODEBOOK as packed E2M1 codes, two a byte."""
    return pack_nibbles(e2m1_codes(E2M1_CODEBOOK.to(levels.device)[levels.long()]))


class FloatGrid(Grid):
    """value = scale * codebook[level], the codebook being a float format's values (E4M3, E2M1) and the
    scale what the encoding derives from the group's absmax (the calibration method moves the values; the
    scale rule stays the format's, so the packed result is what round to nearest would store for it)."""

    negative_scales = False

    def __init__(self, name: str, group: int, codebook: torch.Tensor,
                 scale_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.name, self.group_size, self.sub_size = name, group, group
        self.codebook, self.qmax = codebook, len(codebook) - 1
        self.scale_of = scale_of

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        scale = self.scale_of(w.abs().amax(-1, keepdim=True))
        return GridParams(scale, torch.zeros_like(scale))


class NVFP4Grid(FloatGrid):
    """NVFP4's grid under a tensor's global scale g: value = E2M1 * s / g, s the group's E4M3 scale of
    g * absmax / 6. ``global_scale`` is fixed before GPTQ (from the weight's absmax, or its fused siblings'
    when they are solved stacked), as GPTQ fits one group at a time; None: each fit takes it from the whole
    weight it is given (round to nearest, importance search). Each group's fit also returns g
    (``extra["global_scale"]``, one per group) for the packer."""

    def __init__(self, name: str, global_scale: torch.Tensor | None) -> None:
        super().__init__(name, NVFP4_GROUP, E2M1_CODEBOOK, lambda absmax: absmax)
        self.global_scale = global_scale

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        absmax = w.abs().amax(-1, keepdim=True).float()
        global_scale = (self.global_scale if self.global_scale is not None
                        else nvfp4_global_scale(absmax.max() if absmax.numel() else torch.zeros(()))).to(w.device)
        scale = _nvfp4_group_scale(absmax, global_scale) / global_scale
        return GridParams(scale, torch.zeros_like(scale), {"global_scale": global_scale.expand_as(scale).clone()})


class FP8BlockGrid(FloatGrid):
    """E4M3 with one scale per 128 x 128 tile. A tile spans 128 rows, which GPTQ updates column by column
    together, so its scale is fixed from the whole weight before calibration moves any value (static
    groups: ``whole_tensor_scales``), the tile's absmax / 448 as round to nearest takes it."""

    whole_tensor_scales = True

    def __init__(self, name: str) -> None:
        super().__init__(name, FP8_BLOCK, FP8_CODEBOOK, _fp8_row_scale)

    def fit(self, w: torch.Tensor, weights: torch.Tensor | None) -> GridParams:
        groups = w.abs().amax(-1)                         # (rows, column tiles): w is the whole weight
        rows = groups.shape[0]
        tiles = torch.nn.functional.pad(groups, (0, 0, 0, -rows % FP8_BLOCK)).unflatten(0, (-1, FP8_BLOCK)).amax(1)
        scale = _fp8_row_scale(tiles).repeat_interleave(FP8_BLOCK, 0)[:rows].unsqueeze(-1)
        return GridParams(scale, torch.zeros_like(scale))


def _fp8_row_scale(absmax: torch.Tensor) -> torch.Tensor:
    # bfloat16 scales: the weight_scale the model dtype stores (float32 or bfloat16) holds them exactly
    return _fp8_scale(absmax.to(torch.bfloat16)).float()


def _mx_group_scale(absmax: torch.Tensor) -> torch.Tensor:
    return _mx_scale(absmax.float())


# -- the encodings ---------------------------------------------------------------------------------

class _FloatScheme(Scheme):
    family = "compressed"
    checks_finite = True        # quantize raises NonFiniteWeight itself
    # compressed-tensors' QuantizationArgs of the weights and of the inputs (None: inputs stay 16-bit).
    weight_args: ClassVar[dict[str, Any]]
    input_args: ClassVar[dict[str, Any] | None] = None
    # The compressed-tensors format of the config group.
    ct_format: ClassVar[str]

    def dequantize(self, packed: PackedFloat) -> torch.Tensor:
        return dequantize_float(packed)


def _args(num_bits: int, strategy: str, *, group_size: int | None = None, block: list[int] | None = None,
          dynamic: bool | str = False, scale_dtype: str | None = None, observer: str | None = "minmax") -> dict[str, Any]:
    return {"num_bits": num_bits, "type": "float", "symmetric": True, "strategy": strategy, "group_size": group_size,
            "block_structure": block, "dynamic": dynamic, "actorder": None, "observer": observer,
            "observer_kwargs": {}, "scale_dtype": scale_dtype, "zp_dtype": scale_dtype}


@register
class FP8Channel(_FloatScheme):
    name = "fp8"
    bits = 8.0
    ct_format = "float-quantized"
    weight_args = _args(8, "channel")
    input_args = _args(8, "token", dynamic=True, observer=None)
    # Inputs per token by the runtime (the default), or with a static per-tensor scale from calibration.
    act_strategies = ("token", "tensor")
    act_max = FP8_MAX
    act_type = "fp8"
    params = ("act_range", "act_strategy", "act_percentile", "smooth", "smooth_down")
    triton_module = "floats"

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedFloat:
        if weight.is_cuda and (fused_kernel := fused(self)) is not None:
            return fused_kernel(weight, **params)
        return quantize_fp8(weight)

    def calibration_grid(self, *, columns: int | None = None, **_: Any) -> Grid:
        if columns is None:
            raise ValueError("fp8's calibration grid spans a row: give the weight's columns")
        return FloatGrid(self.name, columns, FP8_CODEBOOK, _fp8_row_scale)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> PackedFloat:
        values = _fp8_levels(result.levels)
        return PackedFloat(values, result.scale.to(torch.float32), None, tuple(result.levels.shape), dtype)


@register
class FP8Block(_FloatScheme):
    name = "fp8-block"
    bits = 8.0
    block_size = FP8_BLOCK
    ct_format = "float-quantized"
    weight_args = _args(8, "block", block=[FP8_BLOCK, FP8_BLOCK])
    input_args = _args(8, "group", group_size=FP8_BLOCK, dynamic=True, observer=None)

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedFloat:
        return quantize_fp8(weight, FP8_BLOCK)

    def calibration_grid(self, **_: Any) -> Grid:
        return FP8BlockGrid(self.name)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> PackedFloat:
        values = _fp8_levels(result.levels)
        tiles = result.scale[::FP8_BLOCK].to(torch.float32)     # every row of a tile holds its scale
        return PackedFloat(values, tiles, None, tuple(result.levels.shape), dtype, (FP8_BLOCK, FP8_BLOCK))


@register
class NVFP4A16(_FloatScheme):
    name = "nvfp4a16"
    bits = 4.5               # E2M1 plus an 8-bit scale per 16
    group_size = NVFP4_GROUP
    ct_format = "nvfp4-pack-quantized"
    weight_args = _args(4, "tensor_group", group_size=NVFP4_GROUP, scale_dtype="torch.float8_e4m3fn")
    # quantize() takes ``global_absmax``: the sink gives Linears a runtime fuses one global scale.
    shares_global_scale = True
    triton_module = "floats"

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedFloat:
        if weight.is_cuda and (fused_kernel := fused(self)) is not None:
            return fused_kernel(weight, **params)
        return quantize_nvfp4(weight, params.get("global_absmax"))

    def calibration_grid(self, *, absmax: float | None = None, **_: Any) -> Grid:
        """``absmax``: the weight's (or, stacked, its fused siblings' joint) largest magnitude, which sets
        the global scale as quantize's (GPTQ needs it); without it each fit takes the global scale from
        the weight it fits."""
        return NVFP4Grid(self.name, None if absmax is None else nvfp4_global_scale(torch.tensor(absmax)))

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> PackedFloat:
        rows, cols = result.levels.shape
        global_scale = result.extra["global_scale"].reshape(-1)[:1].float()
        # s / g * g gives back s to within an ulp, which the E4M3 rounding removes.
        scale = (result.scale.float() * global_scale).to(FP8)
        return PackedFloat(_e2m1_levels_packed(result.levels), scale, global_scale.cpu(), (rows, cols), dtype)


@register
class NVFP4(NVFP4A16):
    """NVFP4 weights and inputs: the runtime quantizes each group of 16 input features to E2M1 with an E4M3
    scale under a per-Linear ``input_global_scale`` (448 * 6 / the input's absmax over calibration)."""

    name = "nvfp4"
    input_args = _args(4, "tensor_group", group_size=NVFP4_GROUP, dynamic="local",
                       scale_dtype="torch.float8_e4m3fn", observer="static_minmax")
    act_strategies = ("tensor",)          # the global scale is static, from calibration
    act_max = FP8_MAX * E2M1_MAX
    act_type = "nvfp4"
    params = ("act_range", "act_percentile", "smooth", "smooth_down")


@register
class MXFP4A16(_FloatScheme):
    name = "mxfp4a16"
    bits = 4.25              # E2M1 plus an 8-bit exponent per 32
    group_size = MXFP4_GROUP
    ct_format = "mxfp4-pack-quantized"
    weight_args = _args(4, "group", group_size=MXFP4_GROUP, scale_dtype="torch.uint8")

    def quantize(self, weight: torch.Tensor, **params: Any) -> PackedFloat:
        return quantize_mxfp4(weight)

    def calibration_grid(self, **_: Any) -> Grid:
        return FloatGrid(self.name, MXFP4_GROUP, E2M1_CODEBOOK, _mx_group_scale)

    def pack_calibrated(self, result: QuantResult, params: Mapping[str, Any], dtype: torch.dtype,
                        tensor_name: str) -> PackedFloat:
        rows, cols = result.levels.shape
        exponents = (SCALE_BIAS + torch.log2(result.scale.float()).round()).to(torch.uint8)
        return PackedFloat(_e2m1_levels_packed(result.levels), exponents, None, (rows, cols), dtype)


@register
class MXFP4(MXFP4A16):
    name = "mxfp4"
    input_args = _args(4, "group", group_size=MXFP4_GROUP, dynamic=True, scale_dtype="torch.uint8", observer=None)
