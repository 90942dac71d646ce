"""MXFP4 checkpoints as OpenAI ships gpt-oss (config.json ``quant_method: mxfp4``): read only.

The experts are stored as ``mlp.experts.gate_up_proj_blocks`` / ``_scales`` (and ``down_proj``), rows
being the output features ([E, out, in / 32, 16]); transformers dequantizes them into its input-major
parameters ``gate_up_proj`` [E, in, out], which is the name and layout they are read back under here.
Everything else in such a checkpoint is plain bfloat16.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from qtool.containers.base import Container, QuantizedWeight, StoredCheckpoint

if TYPE_CHECKING:
    import torch

    from qtool.sinks.base import Sink


class MXFP4Experts(Container):
    name: ClassVar[str] = "mxfp4"
    format: ClassVar[str] = "safetensors"
    families: ClassVar[tuple[str, ...]] = ()     # read, never written (a writer comes with the encodings issue)
    quant_method: ClassVar[str | None] = "mxfp4"
    config_keys: ClassVar[tuple[str, ...]] = ("modules_to_not_convert",)

    @classmethod
    def writer(cls) -> type[Sink]:
        from qtool.errors import Unsupported

        raise Unsupported("qtool reads MXFP4 checkpoints but does not write them yet")

    @classmethod
    def read(cls, checkpoint: StoredCheckpoint) -> dict[str, QuantizedWeight]:
        from qtool.errors import CorruptFile
        from qtool.schemes.mxfp4 import BLOCK
        from qtool.sources.base import TensorInfo

        weights: dict[str, QuantizedWeight] = {}
        stored = checkpoint.tensors
        for name in stored:
            if not name.endswith("_blocks"):
                continue
            weight = name[: -len("_blocks")]
            scales = f"{weight}_scales"
            blocks_shape = tuple(stored[name].shape)
            if scales not in stored or len(blocks_shape) != 4 or tuple(stored[scales].shape) != blocks_shape[:3]:
                raise CorruptFile(f"{checkpoint.description}: {name} {blocks_shape} has no matching {scales} "
                                  "([experts, rows, blocks]); the MXFP4 checkpoint is incomplete")
            experts, rows, groups, _ = blocks_shape
            weights[weight] = QuantizedWeight(
                TensorInfo(weight, (experts, groups * BLOCK, rows), "MXFP4",
                           stored[name].stored_bytes + stored[scales].stored_bytes), [name, scales],
                lambda raw, name=name, scales=scales: _decode(raw[name], raw[scales], checkpoint.model_dtype))
        return weights


def _decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from qtool.schemes.mxfp4 import dequantize_mxfp4

    # [E, out, in] as stored -> transformers' input-major [E, in, out]
    return dequantize_mxfp4(blocks, scales, dtype).transpose(1, 2).contiguous()
