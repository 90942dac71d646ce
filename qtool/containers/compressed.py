"""compressed-tensors checkpoints (what llm-compressor writes; vLLM and transformers load them):
written by ``qtool.sinks.compressed.CompressedSink`` (the layout is described there), read and
recognised here, W8A8 input quantization included.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from qtool.containers.base import Container, InputQuantization, QuantizedWeight, StoredCheckpoint

if TYPE_CHECKING:
    import torch

    from qtool.sinks.base import Sink


class CompressedTensors(Container):
    name: ClassVar[str] = "compressed-tensors"
    format: ClassVar[str] = "safetensors"
    families: ClassVar[tuple[str, ...]] = ("compressed",)
    quant_method: ClassVar[str | None] = "compressed-tensors"
    sizing_family: ClassVar[str | None] = "compressed"      # mixed config groups ("mixed-precision")
    config_keys: ClassVar[tuple[str, ...]] = ("format", "quantization_status", "ignore", "config_groups")

    @classmethod
    def writer(cls) -> type[Sink]:
        from qtool.sinks.compressed import CompressedSink

        return CompressedSink

    @classmethod
    def read(cls, checkpoint: StoredCheckpoint) -> dict[str, QuantizedWeight]:
        from qtool.errors import CorruptFile
        from qtool.sources.base import TensorInfo

        groups, ignore = _groups(checkpoint.quantization_config)
        stored = checkpoint.tensors
        weights: dict[str, QuantizedWeight] = {}
        for name in stored:
            if not name.endswith(".weight_scale"):
                continue
            module = name[: -len(".weight_scale")]
            group = _target_group(module, groups, ignore)
            if group is None:
                raise CorruptFile(f"{checkpoint.description}: {module} has a weight_scale but no config group "
                                  "targets it")
            args = group.get("weights") or {}
            if args.get("type") == "float":
                weights[module + ".weight"] = _float_weight(checkpoint, module, args)
                continue
            bits = int(args.get("num_bits", 8))
            zero_name = module + ".weight_zero_point"
            has_zero = zero_name in stored
            if module + ".weight_packed" in stored:
                parts = [module + ".weight_packed", name, module + ".weight_shape"] + ([zero_name] if has_zero else [])
                shape = tuple(int(v) for v in checkpoint.load_raw(module + ".weight_shape").tolist())
            elif module + ".weight" in stored:
                parts = [module + ".weight", name] + ([zero_name] if has_zero else [])
                shape = stored[module + ".weight"].shape
            else:
                raise CorruptFile(f"{checkpoint.description}: {name} has neither {module}.weight_packed nor "
                                  f"{module}.weight")
            weight = module + ".weight"
            weights[weight] = QuantizedWeight(
                TensorInfo(weight, shape, f"INT{bits}", sum(stored[p].stored_bytes for p in parts)), parts,
                lambda raw, module=module, bits=bits, shape=shape, args=args: _decode_int(module, bits, shape,
                                                                                         args, raw))
        return weights

    @classmethod
    def input_quantization(cls, checkpoint: StoredCheckpoint,
                           weights: dict[str, QuantizedWeight]) -> dict[str, InputQuantization]:
        """A kind the evaluator cannot replay (float inputs, groups, static per token) raises
        Unsupported rather than being evaluated as weight-only."""
        from qtool.errors import CorruptFile, Unsupported

        groups, ignore = _groups(checkpoint.quantization_config)
        for group in groups:
            # Modules quantized on their inputs or outputs only carry no weight_scale to find them by.
            if group.get("output_activations") or (group.get("input_activations") and not group.get("weights")):
                raise Unsupported(f"{checkpoint.description}: a config group quantizes activations "
                                  f"({', '.join(group.get('targets') or [])}) in a way qtool's evaluator does "
                                  "not replay; evaluate it with --runtime native")
        stored = checkpoint.tensors
        found: dict[str, InputQuantization] = {}
        for weight in weights:
            module = weight[: -len(".weight")]
            args = (_target_group(module, groups, ignore) or {}).get("input_activations")
            if not args:
                continue
            kind, dynamic = args.get("type", "int"), args.get("dynamic", False)
            # compressed-tensors' default strategy: groups when a group size is given, else the tensor.
            strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
            bits = int(args.get("num_bits", 8))
            float_dynamic = dynamic is True and ((bits == 8 and strategy in ("token", "group"))
                                                 or (bits == 4 and strategy == "group" and args.get("group_size") == 32))
            float_static = dynamic is False and bits == 8 and strategy == "tensor"
            if kind == "float" and bits == 4 and strategy == "tensor_group" and dynamic == "local" \
                    and args.get("group_size") == 16:
                if module + ".input_global_scale" not in stored:
                    raise CorruptFile(f"{checkpoint.description}: {module} quantizes its inputs to NVFP4 but has no "
                                      f"{module}.input_global_scale")
                found[module] = InputQuantization(bits=4, symmetric=True, per_token=False, kind="float", group_size=16,
                                                  global_scale=checkpoint.load_raw(module + ".input_global_scale"))
                continue
            if kind == "float" and float_dynamic:
                found[module] = InputQuantization(bits=bits, symmetric=True, per_token=strategy == "token",
                                                  kind="float", group_size=args.get("group_size")
                                                  if strategy == "group" else None)
                continue
            if (kind == "float" and not float_static) or kind not in ("int", "float") \
                    or strategy not in ("tensor", "token") or dynamic not in (True, False) \
                    or (strategy == "token" and not dynamic):
                raise Unsupported(f"{checkpoint.description}: {module} quantizes its inputs as {kind} {strategy} "
                                  f"(dynamic: {dynamic}), which qtool's evaluator does not replay; "
                                  "evaluate it with --runtime native")
            scale = zero_point = None
            if not dynamic:
                if module + ".input_scale" not in stored:
                    raise CorruptFile(f"{checkpoint.description}: {module} has static input quantization but no "
                                      f"{module}.input_scale")
                scale = checkpoint.load_raw(module + ".input_scale")
                if module + ".input_zero_point" in stored:
                    zero_point = checkpoint.load_raw(module + ".input_zero_point")
            found[module] = InputQuantization(bits=bits,
                                              symmetric=bool(args.get("symmetric", True)),
                                              per_token=strategy == "token", scale=scale, zero_point=zero_point,
                                              kind=kind)
        return found

    @classmethod
    def detect_names(cls, tensor_names: list[str]) -> dict[str, Any] | None:
        if any(name.endswith((".weight_packed", ".weight_scale", ".weight_zero_point")) for name in tensor_names):
            return {}
        return None


def _groups(qconfig: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """compressed-tensors' config groups and ignore list."""
    return list((qconfig.get("config_groups") or {}).values()), qconfig.get("ignore") or []


def _float_weight(checkpoint: StoredCheckpoint, module: str, args: dict[str, Any]) -> QuantizedWeight:
    """An FP8 (``weight``) or FP4 (``weight_packed``, with a global scale for NVFP4) weight of a
    float-quantized config group; refused in one line when its tensors do not fit its arguments."""
    from qtool.errors import CorruptFile
    from qtool.sources.base import TensorInfo

    stored = checkpoint.tensors
    bits, strategy, group_size = int(args.get("num_bits", 8)), args.get("strategy"), args.get("group_size")
    values = module + (".weight" if bits == 8 else ".weight_packed")
    scale = module + ".weight_scale"
    parts = [values, scale] + ([module + ".weight_global_scale"] if strategy == "tensor_group" else [])
    missing = [part for part in parts if part not in stored]
    if missing or bits not in (4, 8) or (bits == 4 and group_size not in (16, 32)):
        raise CorruptFile(f"{checkpoint.description}: {module} is float{bits} {strategy} "
                          + (f"without {', '.join(missing)}" if missing else "in a layout qtool does not read"))
    rows, cols = stored[values].shape[0], stored[values].shape[1] * (1 if bits == 8 else 2)
    label = "FP8" if bits == 8 else ("NVFP4" if strategy == "tensor_group" else "MXFP4")
    dtype = checkpoint.model_dtype

    def decode(raw: dict[str, torch.Tensor]) -> torch.Tensor:
        from qtool.schemes.floats import PackedFloat, dequantize_float

        global_scale = raw.get(module + ".weight_global_scale")
        tile = args.get("block_structure") if strategy == "block" else None
        packed = PackedFloat(raw[values], raw[scale], global_scale, (rows, cols), dtype,
                             tuple(tile) if tile else None)
        if bits == 4 and packed.scale.shape != (rows, cols // group_size):
            raise CorruptFile(f"{checkpoint.description}: {scale} has shape {tuple(packed.scale.shape)}, "
                              f"expected {(rows, cols // group_size)}")
        return dequantize_float(packed)

    return QuantizedWeight(TensorInfo(module + ".weight", (rows, cols), label,
                                      sum(stored[p].stored_bytes for p in parts)), parts, decode)


def _decode_int(module: str, bits: int, shape: tuple[int, ...], args: dict[str, Any],
                raw: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch

    from qtool.schemes.int4 import PackedInt, dequantize_int, unpack_int32

    rows, cols = shape
    scale = raw[module + ".weight_scale"]
    if scale.dim() == 1:
        scale = scale.unsqueeze(1)
    zero_point = raw.get(module + ".weight_zero_point")
    if module + ".weight_packed" in raw:
        q = unpack_int32(raw[module + ".weight_packed"], bits, cols)
        if zero_point is not None and zero_point.dtype == torch.int32:
            zero_point = unpack_int32(zero_point.t().contiguous(), bits, rows).t()
    else:
        q = raw[module + ".weight"].to(torch.int8)
    if zero_point is not None:
        zero_point = zero_point.reshape(rows, -1).to(torch.int8)
    group_size = args.get("group_size") if args.get("strategy") == "group" else None
    if group_size is None and scale.shape[1] > 1:
        group_size = -(-cols // scale.shape[1])
    packed = PackedInt(q=q, scale=scale, zero_point=zero_point, bits=bits, group_size=group_size,
                       shape=tuple(shape), dtype=scale.dtype)
    return dequantize_int(packed)


def _target_matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    if "." not in target and target[:1].isupper():
        return True   # a class name such as "Linear": every module carrying a weight_scale is one
    return target == module or module.endswith("." + target)


def _target_group(module: str, groups: list[dict[str, Any]], ignore: list[str]) -> dict[str, Any] | None:
    """The config group that targets ``module`` (None: ignored or untargeted)."""
    if any(_target_matches(pattern, module) and not pattern[:1].isupper() for pattern in ignore):
        return None
    for group in groups:
        if any(_target_matches(target, module) for target in group.get("targets") or []):
            return group
    return None
