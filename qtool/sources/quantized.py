"""Quantized safetensors checkpoints (qtool's, transformers + bitsandbytes', compressed-tensors')
read back as float tensors.

``wrap(source)`` hides the auxiliary tensors (absmax, quant maps, quant state, SCB, scales, zero
points, shapes) and hands out each quantized weight under its Hugging Face name, dequantized with
the matching qtool scheme, so ``qtool eval OUT`` and ``qtool quantize OUT`` work on outputs.
The inner source must offer ``load_raw(name)`` (tensors exactly as stored), as the safetensors
sources do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qtool.errors import CorruptFile, Unsupported
from qtool.schemes.int4 import PackedInt, dequantize_int, unpack_int32
from qtool.schemes.int8 import PackedInt8Rows, dequantize_int8_rows
from qtool.schemes.nf4 import Packed4bit, dequantize_4bit
from qtool.sources.base import Source, TensorInfo
from qtool.sources.jsonfile import clip

_BNB_STATE = ".quant_state.bitsandbytes__"
_BNB_4BIT_AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class InputQuantization:
    """How a file's runtime quantizes a Linear's input (compressed-tensors int ``input_activations``):
    with a stored per-tensor ``scale`` (and zero point), or dynamically from each token's range
    (``per_token``) or the whole input's."""
    bits: int
    symmetric: bool
    per_token: bool
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None


@dataclass
class _Logical:
    info: TensorInfo
    parts: list[str]                               # stored tensors it is made of
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor]


class QuantizedSource(Source):
    """A quantized checkpoint seen as the float checkpoint it approximates."""

    def __init__(self, inner: Source) -> None:
        config = dict(inner.config)
        self.quantization_config = config.pop("quantization_config", None) or {}
        if not isinstance(self.quantization_config, dict):
            raise CorruptFile(f"{inner.description}: config.json's quantization_config is a "
                              f"{type(self.quantization_config).__name__}, not an object; fix or re-download it")
        super().__init__(spec=inner.spec, description=inner.description, config=config,
                         revision=inner.revision, is_quantized=True)
        if not hasattr(inner, "load_raw"):
            raise Unsupported(f"{inner.description}: reading a quantized checkpoint needs raw tensor access")
        self.inner = inner
        self.model_dtype = _TORCH_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"),
                                             torch.float32)
        stored = {info.name: info for info in inner.tensors()}
        method = self.quantization_config.get("quant_method")
        if method == "bitsandbytes":
            logical = self._bnb(stored)
        elif method == "compressed-tensors":
            logical = self._compressed(stored)
        else:
            raise Unsupported(f"{inner.description}: quantization method {clip(method, 40)} is not one qtool reads "
                              "(bitsandbytes, compressed-tensors)")
        hidden = {part for item in logical.values() for part in item.parts}
        # W8A8 input scales belong to the runtime's input quantization (see input_quantization), not
        # to the float model: a re-quantized output must not carry them.
        hidden |= {name for name in stored if name.endswith((".input_scale", ".input_zero_point"))}
        self._logical = logical
        # Each logical tensor takes the place of its first stored part, so file order is kept.
        first_part = {item.parts[0]: item for item in logical.values()}
        self._infos: list[TensorInfo] = []
        for name, info in stored.items():
            if name in first_part:
                self._infos.append(first_part[name].info)
            elif name not in hidden:
                self._infos.append(info)

    # -- layouts ---------------------------------------------------------------------------------
    def _raw(self, name: str) -> torch.Tensor:
        return self.inner.load_raw(name)

    def _bnb(self, stored: dict[str, TensorInfo]) -> dict[str, _Logical]:
        logical: dict[str, _Logical] = {}
        for name in stored:
            if _BNB_STATE in name:
                weight = name.split(_BNB_STATE)[0]
                if weight not in stored:
                    raise CorruptFile(f"{self.description}: {name} has no {weight}")
                state = _read_state(self._raw(name), name)
                parts = [weight, name] + [weight + suffix for suffix in _BNB_4BIT_AUX if weight + suffix in stored]
                logical[weight] = _Logical(
                    TensorInfo(weight, tuple(state["shape"]), state["quant_type"].upper(),
                               sum(stored[p].stored_bytes for p in parts)),
                    parts, lambda raw, weight=weight, state=state: self._decode_4bit(weight, state, raw))
            elif name.endswith(".SCB"):
                module = name[: -len(".SCB")]
                weight = module + ".weight"
                if weight not in stored:
                    raise CorruptFile(f"{self.description}: {name} has no {weight}")
                parts = [weight, name] + ([module + ".weight_format"] if module + ".weight_format" in stored else [])
                logical[weight] = _Logical(
                    TensorInfo(weight, stored[weight].shape, "INT8", sum(stored[p].stored_bytes for p in parts)),
                    parts, lambda raw, weight=weight, scb=name: dequantize_int8_rows(PackedInt8Rows(
                        weight=raw[weight], scb=raw[scb].float(), shape=tuple(raw[weight].shape),
                        dtype=self.model_dtype)))
        return logical

    def _decode_4bit(self, weight: str, state: dict[str, Any], raw: dict[str, torch.Tensor]) -> torch.Tensor:
        nested = weight + ".nested_absmax" in raw
        packed = Packed4bit(
            quant_type=state["quant_type"], data=raw[weight].view(torch.uint8), absmax=raw[weight + ".absmax"],
            block_size=int(state["blocksize"]), shape=tuple(state["shape"]),
            dtype=_TORCH_DTYPES.get(state.get("dtype", ""), self.model_dtype),
            quant_map=raw[weight + ".quant_map"].float(),
            nested_absmax=raw[weight + ".nested_absmax"].float() if nested else None,
            nested_quant_map=raw[weight + ".nested_quant_map"].float() if nested else None,
            nested_offset=float(state["nested_offset"]) if nested else None,
            nested_block_size=int(state.get("nested_blocksize", 256)))
        return dequantize_4bit(packed)

    def _groups(self) -> tuple[list[dict[str, Any]], list[str]]:
        """compressed-tensors' config groups and ignore list."""
        return (list((self.quantization_config.get("config_groups") or {}).values()),
                self.quantization_config.get("ignore") or [])

    def _compressed(self, stored: dict[str, TensorInfo]) -> dict[str, _Logical]:
        groups, ignore = self._groups()
        logical: dict[str, _Logical] = {}
        for name in stored:
            if not name.endswith(".weight_scale"):
                continue
            module = name[: -len(".weight_scale")]
            group = _target_group(module, groups, ignore)
            if group is None:
                raise CorruptFile(f"{self.description}: {module} has a weight_scale but no config group targets it")
            args = group.get("weights") or {}
            bits = int(args.get("num_bits", 8))
            zero_name = module + ".weight_zero_point"
            has_zero = zero_name in stored
            if module + ".weight_packed" in stored:
                parts = [module + ".weight_packed", name, module + ".weight_shape"] + ([zero_name] if has_zero else [])
                shape = tuple(int(v) for v in self._raw(module + ".weight_shape").tolist())
            elif module + ".weight" in stored:
                parts = [module + ".weight", name] + ([zero_name] if has_zero else [])
                shape = stored[module + ".weight"].shape
            else:
                raise CorruptFile(f"{self.description}: {name} has neither {module}.weight_packed nor {module}.weight")
            weight = module + ".weight"
            logical[weight] = _Logical(
                TensorInfo(weight, shape, f"INT{bits}", sum(stored[p].stored_bytes for p in parts)), parts,
                lambda raw, module=module, bits=bits, shape=shape, args=args: self._decode_int(module, bits, shape,
                                                                                              args, raw))
        return logical

    def _decode_int(self, module: str, bits: int, shape: tuple[int, ...], args: dict[str, Any],
                    raw: dict[str, torch.Tensor]) -> torch.Tensor:
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

    def input_quantization(self) -> dict[str, InputQuantization]:
        """The modules whose inputs the file's runtime quantizes (W8A8), by module name; empty for
        weight-only files. A kind the evaluator cannot replay (float inputs, groups, static per
        token) raises Unsupported rather than being evaluated as weight-only."""
        if self.quantization_config.get("quant_method") != "compressed-tensors":
            return {}
        groups, ignore = self._groups()
        for group in groups:
            # Modules quantized on their inputs or outputs only carry no weight_scale to find them by.
            if group.get("output_activations") or (group.get("input_activations") and not group.get("weights")):
                raise Unsupported(f"{self.description}: a config group quantizes activations "
                                  f"({', '.join(group.get('targets') or [])}) in a way qtool's evaluator does "
                                  "not replay; evaluate it with --runtime native")
        stored = {info.name for info in self.inner.tensors()}
        found: dict[str, InputQuantization] = {}
        for weight in self._logical:
            module = weight[: -len(".weight")]
            args = (_target_group(module, groups, ignore) or {}).get("input_activations")
            if not args:
                continue
            kind, dynamic = args.get("type", "int"), args.get("dynamic", False)
            # compressed-tensors' default strategy: groups when a group size is given, else the tensor.
            strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
            if kind != "int" or strategy not in ("tensor", "token") or dynamic not in (True, False) \
                    or (strategy == "token" and not dynamic):
                raise Unsupported(f"{self.description}: {module} quantizes its inputs as {kind} {strategy} "
                                  f"(dynamic: {dynamic}), which qtool's evaluator does not replay; "
                                  "evaluate it with --runtime native")
            scale = zero_point = None
            if not dynamic:
                if module + ".input_scale" not in stored:
                    raise CorruptFile(f"{self.description}: {module} has static input quantization but no "
                                      f"{module}.input_scale")
                scale = self._raw(module + ".input_scale")
                if module + ".input_zero_point" in stored:
                    zero_point = self._raw(module + ".input_zero_point")
            found[module] = InputQuantization(bits=int(args.get("num_bits", 8)), symmetric=bool(args.get("symmetric", True)),
                                              per_token=strategy == "token", scale=scale, zero_point=zero_point)
        return found

    # -- the Source protocol -----------------------------------------------------------------------
    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def load(self, name: str) -> torch.Tensor:
        item = self._logical.get(name)
        if item is None:
            return self.inner.load(name)
        raw = {part: self._raw(part) for part in item.parts}
        return item.decode(raw)

    def tokenizer_dir(self):
        return self.inner.tokenizer_dir()

    def extra_files(self):
        return self.inner.extra_files()

    def local_paths(self):
        return self.inner.local_paths()

    def close(self) -> None:
        self.inner.close()


def _read_state(tensor: torch.Tensor, name: str) -> dict[str, Any]:
    from qtool.sources.jsonfile import load_json

    state = load_json(bytes(tensor.to(torch.uint8).tolist()), "bitsandbytes quant-state JSON", origin=name)
    if not {"quant_type", "blocksize", "shape"} <= set(state):
        raise CorruptFile(f"{name} lacks quant_type/blocksize/shape")
    return state


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


def wrap(source: Source) -> Source:
    """``source`` with its quantized weights dequantized (unchanged when it is not quantized)."""
    if not source.config.get("quantization_config"):
        return source
    return QuantizedSource(source)
