"""FP8 checkpoints as DeepSeek-V3, Qwen3-FP8 and transformers' FineGrainedFP8 store them (config.json
``quant_method: fp8``): read only, dequantized so that they can be evaluated or quantized to anything.

A quantized Linear holds ``weight`` float8_e4m3fn [rows, cols] (or [experts, rows, cols]) and
``weight_scale_inv`` float32 (or uint8 E8M0 exponents, 2^(byte - 127)): one multiplier per
``weight_block_size`` tile ([ceil(rows / 128), ceil(cols / 128)] for the usual [128, 128]), or a
single one when the config gives no block size. The
float weight is ``weight * weight_scale_inv`` tile by tile. ``activation_scale`` (static input scales)
belongs to the runtime, not to the float model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from qtool.containers.base import Container, QuantizedWeight, StoredCheckpoint

if TYPE_CHECKING:
    import torch

    from qtool.sinks.base import Sink


class FP8Blocks(Container):
    name: ClassVar[str] = "fp8"
    format: ClassVar[str] = "safetensors"
    families: ClassVar[tuple[str, ...]] = ()     # read only: qtool writes FP8 as compressed-tensors
    quant_method: ClassVar[str | None] = "fp8"
    config_keys: ClassVar[tuple[str, ...]] = ("activation_scheme", "weight_block_size", "modules_to_not_convert")

    @classmethod
    def writer(cls) -> type[Sink]:
        from qtool.errors import Unsupported

        raise Unsupported("qtool reads quant_method fp8 checkpoints; it writes FP8 as compressed-tensors "
                          "(--scheme fp8 or fp8-block)")

    @classmethod
    def read(cls, checkpoint: StoredCheckpoint) -> dict[str, QuantizedWeight]:
        from qtool.errors import CorruptFile
        from qtool.sources.base import TensorInfo

        block = checkpoint.quantization_config.get("weight_block_size")
        if block is not None and (not isinstance(block, list) or len(block) != 2
                                  or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block)):
            raise CorruptFile(f"{checkpoint.description}: quantization_config.weight_block_size {str(block)[:40]} "
                              "is not [rows, columns] of positive integers")
        weights: dict[str, QuantizedWeight] = {}
        stored = checkpoint.tensors
        for name in stored:
            if not name.endswith(".weight_scale_inv"):
                continue
            weight = name[: -len("_scale_inv")]
            info = stored.get(weight)
            if info is None or info.stored_dtype != "F8_E4M3" or len(info.shape) not in (2, 3):
                raise CorruptFile(f"{checkpoint.description}: {name} scales "
                                  + (f"no {weight}" if info is None else f"{weight}, which is {info.stored_dtype} "
                                     f"{list(info.shape)}, not a float8_e4m3fn matrix"))
            scale_shape = tuple(stored[name].shape)
            if block is None or scale_shape in ((), (1,)):
                expected: tuple[int, ...] = scale_shape
                tile = None
            else:
                tile = (int(block[0]), int(block[1]))
                expected = (*info.shape[:-2], -(-info.shape[-2] // tile[0]), -(-info.shape[-1] // tile[1]))
            if scale_shape != expected or (tile is None and scale_shape not in ((), (1,))):
                raise CorruptFile(f"{checkpoint.description}: {name} has shape {list(scale_shape)}; {weight} "
                                  f"{list(info.shape)} in tiles of {block} needs {list(expected)}")
            weights[weight] = QuantizedWeight(
                TensorInfo(weight, tuple(info.shape), "FP8", info.stored_bytes + stored[name].stored_bytes),
                [weight, name],
                lambda raw, weight=weight, name=name, tile=tile: dequantize_fp8_tiles(raw[weight], raw[name], tile,
                                                                                      checkpoint.model_dtype))
        return weights


def dequantize_fp8_tiles(values: torch.Tensor, scale_inv: torch.Tensor, tile: tuple[int, int] | None,
                         dtype: torch.dtype) -> torch.Tensor:
    """``values`` (float8) times its per-tile multipliers, as ``dtype``; products in float32."""
    import torch

    # uint8 scales are E8M0 exponents (MXFP8 checkpoints), as transformers reads them
    scale = (scale_inv.to(torch.float32) - 127.0).exp2() if scale_inv.dtype == torch.uint8 else scale_inv.to(torch.float32)
    if tile is not None:
        from qtool.schemes.floats import expand_tiles

        scale = expand_tiles(scale, tile, *values.shape[-2:])
    return (values.to(torch.float32) * scale).to(dtype)
