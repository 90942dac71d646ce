"""bitsandbytes checkpoints as transformers' ``save_pretrained`` writes them: written by
``qtool.sinks.bnb.BnbSink`` (the layout is described there), read and recognised here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qtool.containers.base import Container, QuantizedWeight, StoredCheckpoint

if TYPE_CHECKING:
    import torch

    from qtool.sinks.base import Sink

_STATE = ".quant_state.bitsandbytes__"
_AUX_4BIT = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_TORCH_DTYPES = ("float32", "float16", "bfloat16")


class Bitsandbytes(Container):
    name: ClassVar[str] = "bitsandbytes"
    format: ClassVar[str] = "safetensors"
    families: ClassVar[tuple[str, ...]] = ("bnb",)
    quant_method: ClassVar[str | None] = "bitsandbytes"
    default: ClassVar[bool] = True
    quantizes_experts: ClassVar[bool] = False
    bits_defaults: ClassVar[dict[int, str]] = {4: "nf4", 8: "int8-sym"}
    config_keys: ClassVar[tuple[str, ...]] = (
        "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
        "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "llm_int8_skip_modules")

    @classmethod
    def writer(cls) -> type[Sink]:
        from qtool.sinks.bnb import BnbSink

        return BnbSink

    @classmethod
    def read(cls, checkpoint: StoredCheckpoint) -> dict[str, QuantizedWeight]:
        from qtool.errors import CorruptFile
        from qtool.schemes.int8 import PackedInt8Rows, dequantize_int8_rows
        from qtool.sources.base import TensorInfo

        stored = checkpoint.tensors
        weights: dict[str, QuantizedWeight] = {}
        for name in stored:
            if _STATE in name:
                weight = name.split(_STATE)[0]
                if weight not in stored:
                    raise CorruptFile(f"{checkpoint.description}: {name} has no {weight}")
                state = _read_state(checkpoint.load_raw(name), name)
                parts = [weight, name] + [weight + suffix for suffix in _AUX_4BIT if weight + suffix in stored]
                weights[weight] = QuantizedWeight(
                    TensorInfo(weight, tuple(state["shape"]), state["quant_type"].upper(),
                               sum(stored[p].stored_bytes for p in parts)),
                    parts, lambda raw, weight=weight, state=state: _decode_4bit(weight, state, raw,
                                                                                checkpoint.model_dtype))
            elif name.endswith(".SCB"):
                module = name[: -len(".SCB")]
                weight = module + ".weight"
                if weight not in stored:
                    raise CorruptFile(f"{checkpoint.description}: {name} has no {weight}")
                parts = [weight, name] + ([module + ".weight_format"] if module + ".weight_format" in stored else [])
                weights[weight] = QuantizedWeight(
                    TensorInfo(weight, stored[weight].shape, "INT8", sum(stored[p].stored_bytes for p in parts)),
                    parts, lambda raw, weight=weight, scb=name: dequantize_int8_rows(PackedInt8Rows(
                        weight=raw[weight], scb=raw[scb].float(), shape=tuple(raw[weight].shape),
                        dtype=checkpoint.model_dtype)))
        return weights

    @classmethod
    def detect_names(cls, tensor_names: list[str]) -> dict[str, Any] | None:
        if any(_STATE in name for name in tensor_names):
            return {"quant_type": "nf4" if any(f"{_STATE}nf4" in name for name in tensor_names) else "fp4"}
        if any(name.endswith(".SCB") for name in tensor_names):
            return {"load_in_8bit": True}
        return None


def _decode_4bit(weight: str, state: dict[str, Any], raw: dict[str, torch.Tensor],
                 model_dtype: torch.dtype) -> torch.Tensor:
    import torch

    from qtool.schemes.nf4 import Packed4bit, dequantize_4bit

    nested = weight + ".nested_absmax" in raw
    dtype_name = state.get("dtype", "")
    packed = Packed4bit(
        quant_type=state["quant_type"], data=raw[weight].view(torch.uint8), absmax=raw[weight + ".absmax"],
        block_size=int(state["blocksize"]), shape=tuple(state["shape"]),
        dtype=getattr(torch, dtype_name) if dtype_name in _TORCH_DTYPES else model_dtype,
        quant_map=raw[weight + ".quant_map"].float(),
        nested_absmax=raw[weight + ".nested_absmax"].float() if nested else None,
        nested_quant_map=raw[weight + ".nested_quant_map"].float() if nested else None,
        nested_offset=float(state["nested_offset"]) if nested else None,
        nested_block_size=int(state.get("nested_blocksize", 256)))
    return dequantize_4bit(packed)


def _read_state(tensor: torch.Tensor, name: str) -> dict[str, Any]:
    import torch

    from qtool.errors import CorruptFile
    from qtool.sources.jsonfile import load_json

    state = load_json(bytes(tensor.to(torch.uint8).tolist()), "bitsandbytes quant-state JSON", origin=name)
    if not {"quant_type", "blocksize", "shape"} <= set(state):
        raise CorruptFile(f"{name} lacks quant_type/blocksize/shape")
    return state
