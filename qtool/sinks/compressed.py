"""compressed-tensors checkpoints (what llm-compressor writes; loaded by vLLM, and by transformers
with ``compressed-tensors`` installed).

int4 groups use compressed-tensors' ``pack-quantized`` format (what its ``infer_module_format``
picks for weight-only int schemes and what vLLM's W4A16 kernels read). Per quantized Linear
``<module>``:

- ``weight_packed`` int32 [rows, ceil(cols * bits / 32)]: values offset to unsigned and packed
  densely, element i of a row at bit i*bits;
- ``weight_scale`` [rows, groups] in the model dtype (groups = 1 for the channel strategy);
- ``weight_zero_point`` (asymmetric only) int32 [ceil(rows * bits / 32), groups]: the int zero
  points packed the same way along the rows;
- ``weight_shape`` int64 [2].

int8-asym (per channel) uses ``int-quantized``: ``weight`` int8 [rows, cols], ``weight_scale``
[rows, 1] and ``weight_zero_point`` int8 [rows, 1], unpacked. ``w8a8`` is the same layout with
symmetric weights (no zero point) plus the inputs' quantization (what vLLM runs as W8A8 int8):
``input_activations`` in the config group, int8 symmetric, either ``strategy: tensor`` with a
static ``input_scale`` [1] per module (from calibration, ``options["input_scales"]``), or
``strategy: token, dynamic: true`` (the runtime takes each token's absmax; nothing stored). transformers + compressed-tensors
0.20 load it as is (they cannot load *packed* zero points: the empty model they build expects
them unpacked; int4-asym outputs therefore load with ``CompressedTensorsConfig(dequantize=True)``,
and in vLLM). vLLM serves weight-only int8 only symmetric, so no format would run int8-asym there.

The float encodings (qtool/schemes/floats.py) carry their compressed-tensors arguments and format in
their records: ``float-quantized`` FP8 stores ``weight`` float8_e4m3fn [rows, cols] and ``weight_scale``
in the model dtype ([rows, 1] per channel, [ceil(rows/128), ceil(cols/128)] per block);
``nvfp4-pack-quantized`` stores ``weight_packed`` uint8 [rows, cols/2] (two E2M1 codes a byte, the even
column in the low nibble), ``weight_scale`` float8_e4m3fn [rows, cols/16] and ``weight_global_scale``
float32 [1]; ``mxfp4-pack-quantized`` the same packing with ``weight_scale`` uint8 E8M0 exponents
[rows, cols/32]. Their inputs are quantized by the runtime: dynamically (nothing stored), or for
``fp8 --act-strategy tensor`` with a static ``input_scale`` [1] (model dtype) and for ``nvfp4`` under a
static ``input_global_scale`` float32 [1] = 448 * 6 / the calibrated absmax.

``config.json`` gets ``quantization_config`` with one config group per distinct scheme, its
``targets`` being the exact module names (so kept Linear layers, tied lm_head included, are
simply not targeted).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from qtool.calibration.activation import ACT_BITS, ActivationScale, act_strategy, act_symmetric, needs_static_scale
from qtool.errors import BadArgument
from qtool.plan import TensorPlan
from qtool.schemes.base import get_scheme
from qtool.schemes.floats import E2M1_MAX, FP8, FP8_MAX, PackedFloat
from qtool.schemes.int4 import PackedInt, pack_int32
from qtool.sinks.safetensors_io import (
    OutputTensor,
    SafetensorsSink,
    entry_bound,
    linear_module_name,
)

PACKED = "pack-quantized"
INT = "int-quantized"


def _format(plan: TensorPlan) -> str:
    recorded = getattr(get_scheme(plan.scheme), "ct_format", None)
    if recorded is not None:
        return recorded
    # int8 weights are stored as they are; transformers then loads the asymmetric zero points
    # unpacked (compressed-tensors 0.20 cannot load packed zero points through transformers).
    return INT if plan.scheme in ("int8-asym", "w8a8") else PACKED


def _module_name(weight_name: str) -> str:
    return linear_module_name(weight_name, "compressed-tensors")


def _scheme_args(plan: TensorPlan) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` of a planned tensor's scheme."""
    scheme = get_scheme(plan.scheme)
    if getattr(scheme, "weight_args", None) is not None:
        return dict(scheme.weight_args)
    if plan.scheme in ("int8-asym", "w8a8"):
        return {"num_bits": 8, "type": "int", "symmetric": plan.scheme == "w8a8", "strategy": "channel",
                "group_size": None, "dynamic": False, "actorder": None, "block_structure": None,
                "observer": "minmax", "observer_kwargs": {}}
    group_size = int(plan.params.get("group_size", 128))
    return {"num_bits": int(scheme.bits), "type": "int", "symmetric": plan.scheme.endswith("-sym"),
            "strategy": "group", "group_size": group_size, "dynamic": False, "actorder": None,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}


def _input_args(plan: TensorPlan) -> dict[str, Any] | None:
    """compressed-tensors ``QuantizationArgs`` of the inputs (None: weight-only scheme)."""
    scheme = get_scheme(plan.scheme)
    recorded = getattr(scheme, "input_args", None)
    if recorded is not None:
        if needs_static_scale(plan) and recorded["strategy"] != "tensor_group":   # fp8 with a calibrated input scale
            return {**recorded, "strategy": "tensor", "dynamic": False, "observer": "minmax"}
        return dict(recorded)
    if plan.scheme != "w8a8":
        return None
    dynamic = act_strategy(plan) == "token"
    return {"num_bits": ACT_BITS, "type": "int", "symmetric": act_symmetric(plan), "strategy": act_strategy(plan),
            "group_size": None, "dynamic": dynamic, "actorder": None, "block_structure": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


# Sibling Linears vLLM loads into one matrix (qkv_proj, gate_up_proj; llm-compressor's FUSED_LAYER_NAMES):
# it reads one NVFP4 global scale for the fused matrix, so its parts must share it.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"),
                  ("w1", "w3"))


def fused_groups(names: list[str]) -> list[list[str]]:
    """Weight names (of ``names``) that a runtime fuses, grouped: siblings of one parent module."""
    present = set(names)
    groups = []
    for name in names:
        parent, _, leaf = _module_name(name).rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf == siblings[0]:
                members = [f"{parent}.{sibling}.weight" for sibling in siblings]
                found = [member for member in members if member in present]
                if len(found) > 1:
                    groups.append(found)
    return groups


class CompressedSink(SafetensorsSink):
    family: ClassVar[str] = "compressed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.global_absmax = self._shared_global_absmax()

    @classmethod
    def shared_type_groups(cls, names: list[str]) -> list[list[str]]:
        """Siblings vLLM fuses into one matrix (q/k/v, gate/up), and a layer's experts (vLLM runs a
        mixture-of-experts block with one quantization method)."""
        from qtool.architectures import merged_expert_name
        from qtool.plan import layer_index

        experts: dict[int | None, list[str]] = {}
        for name in names:
            if merged_expert_name(name) is not None:
                experts.setdefault(layer_index(name), []).append(name)
        return fused_groups(names) + [group for group in experts.values() if len(group) > 1]

    def _shared_global_absmax(self) -> dict[str, float]:
        """NVFP4 weights that vLLM fuses: the absmax of the fused matrix, which sets their common global
        scale (one extra read of those weights before writing)."""
        planned = [p.name for p in self.plans if not p.keep and getattr(get_scheme(p.scheme), "shares_global_scale", False)]
        shared: dict[str, float] = {}
        for group in fused_groups(planned):
            absmax = max(float(self.source.load(name).abs().amax()) for name in group)
            shared.update(dict.fromkeys(group, absmax))
        return shared

    def add(self, plan: TensorPlan, tensor: torch.Tensor, packed: Any = None) -> int:
        if plan.name in self.global_absmax:
            plan = dataclasses.replace(plan, params={**plan.params, "global_absmax": self.global_absmax[plan.name]})
        return super().add(plan, tensor, packed)

    @classmethod
    def check_layout(cls, plans: list[TensorPlan]) -> None:
        super().check_layout(plans)
        for plan in plans:
            if plan.keep:
                continue
            _module_name(plan.name)
            if len(plan.shape) != 2:
                raise BadArgument(f"compressed-tensors quantizes 2-D Linear weights; {plan.name} has shape {plan.shape}")
            args = _scheme_args(plan)
            group_size = args["group_size"]
            input_group = (_input_args(plan) or {}).get("group_size")
            for size, what in ((group_size if args["type"] == "float" else None, "stores weights"),
                               (input_group, "has its runtime quantize inputs")):
                if size is not None and plan.shape[1] % size:
                    raise BadArgument(f"{plan.scheme} {what} in groups of {size} input columns; {plan.name} has "
                                      f"{plan.shape[1]}: keep it (--skip '{plan.name}') or use fp8")
            if group_size is not None and (group_size <= 0 or plan.shape[1] % group_size):
                raise BadArgument(f"--group-size {group_size} does not divide the {plan.shape[1]} input columns of "
                                  f"{plan.name}; compressed-tensors needs whole groups (try a divisor such as "
                                  f"{math.gcd(plan.shape[1], 128) or 1})")

    def check_plans(self, plans: list[TensorPlan]) -> None:
        super().check_plans(plans)
        for plan in plans:
            if not plan.keep and needs_static_scale(plan) and plan.name not in self.input_scales:
                raise BadArgument(f"{plan.name}: w8a8 with static activation scales needs calibration "
                                  "(--calib FILE or --stats FILE), or pass --act-strategy token")

    @property
    def input_scales(self) -> dict[str, ActivationScale]:
        return self.options.get("input_scales") or {}

    @classmethod
    def quantized_outputs(cls, plan: TensorPlan, dtype: torch.dtype) -> list[OutputTensor]:
        module = _module_name(plan.name)
        args = _scheme_args(plan)
        bits = args["num_bits"]
        rows, cols = plan.shape
        if args["type"] == "float":
            inputs = _input_args(plan) or {}
            return _float_outputs(module, args, rows, cols, dtype) + \
                ([entry_bound(f"{module}.{_input_scale_name(inputs)}", _input_scale_dtype(inputs, dtype), (1,))]
                 if needs_static_scale(plan) else [])
        groups = 1 if args["group_size"] is None else -(-cols // args["group_size"])
        if _format(plan) == INT:
            outputs = [entry_bound(f"{module}.weight", torch.int8, (rows, cols)),
                       entry_bound(f"{module}.weight_scale", dtype, (rows, groups))]
            if not args["symmetric"]:
                outputs.append(entry_bound(f"{module}.weight_zero_point", torch.int8, (rows, groups)))
            if needs_static_scale(plan):
                outputs.append(entry_bound(f"{module}.input_scale", dtype, (1,)))
            return outputs
        outputs = [entry_bound(f"{module}.weight_packed", torch.int32, (rows, -(-cols * bits // 32))),
                   entry_bound(f"{module}.weight_scale", dtype, (rows, groups)),
                   entry_bound(f"{module}.weight_shape", torch.int64, (2,))]
        if not args["symmetric"]:
            outputs.append(entry_bound(f"{module}.weight_zero_point", torch.int32, (-(-rows * bits // 32), groups)))
        return outputs

    def calibrated_as(self, packed: PackedInt | PackedFloat, dtype: torch.dtype) -> PackedInt | PackedFloat:
        """Calibrated scales come in float32; round to nearest stores them in the weight's dtype, and
        so does this where that dtype holds them exactly (the grids round scales to bfloat16). FP4
        scales are stored in their own formats (E4M3, E8M0) already."""
        if not dtype.is_floating_point or packed.scale.dtype == dtype or not packed.scale.dtype.is_floating_point:
            return packed
        scale = packed.scale.to(dtype)
        if not torch.equal(scale.to(packed.scale.dtype), packed.scale):
            return packed
        return dataclasses.replace(packed, scale=scale, dtype=dtype)

    def packed_tensors(self, plan: TensorPlan, packed: PackedInt | PackedFloat) -> dict[str, torch.Tensor]:
        module = _module_name(plan.name)
        if isinstance(packed, PackedFloat):
            values = "weight" if packed.values.dtype == FP8 else "weight_packed"
            tensors = {f"{module}.{values}": packed.values, f"{module}.weight_scale": packed.scale}
            if packed.global_scale is not None:
                tensors[f"{module}.weight_global_scale"] = packed.global_scale
            if needs_static_scale(plan):
                args = _input_args(plan) or {}
                chosen = self.input_scales[plan.name]
                # NVFP4's is a global scale (it multiplies): 448 * 6 / the clip, as llm-compressor's generate_gparam
                value = (FP8_MAX * E2M1_MAX / chosen.clip) if args["strategy"] == "tensor_group" else chosen.scale
                tensors[f"{module}.{_input_scale_name(args)}"] = torch.tensor([value],
                                                                              dtype=_input_scale_dtype(args, packed.dtype))
            return tensors
        if _format(plan) == INT:
            tensors = {f"{module}.weight": packed.q, f"{module}.weight_scale": packed.scale}
            if packed.zero_point is not None:
                tensors[f"{module}.weight_zero_point"] = packed.zero_point
            if needs_static_scale(plan):
                # Stored in the scale dtype, as compressed-tensors allocates it (the weight's dtype).
                tensors[f"{module}.input_scale"] = torch.tensor([self.input_scales[plan.name].scale],
                                                                dtype=packed.scale.dtype)
            return tensors
        tensors = {f"{module}.weight_packed": pack_int32(packed.q, packed.bits),
                   f"{module}.weight_scale": packed.scale,
                   f"{module}.weight_shape": torch.tensor(packed.shape, dtype=torch.int64)}
        if packed.zero_point is not None:
            tensors[f"{module}.weight_zero_point"] = \
                pack_int32(packed.zero_point.t().contiguous(), packed.bits).t().contiguous()
        return tensors

    def quantization_config(self) -> dict[str, Any]:
        groups: dict[str, dict[str, Any]] = {}
        targets: dict[str, list[str]] = {}
        formats: dict[str, str] = {}
        for plan in self.plans:
            if plan.keep:
                continue
            args = _scheme_args(plan)
            inputs = _input_args(plan)
            key = repr((_format(plan), sorted(args.items()), sorted((inputs or {}).items())))
            if key not in groups:
                groups[key] = (args, inputs)
                formats[key] = _format(plan)
                targets[key] = []
            targets[key].append(_module_name(plan.name))
        config_groups = {
            f"group_{index}": {"format": formats[key], "input_activations": inputs, "output_activations": None,
                               "targets": targets[key], "weights": args}
            for index, (key, (args, inputs)) in enumerate(groups.items())
        }
        distinct = set(formats.values())
        overall_format = distinct.pop() if len(distinct) == 1 else ("dense" if not distinct else "mixed-precision")
        return {
            "config_groups": config_groups,
            "format": overall_format,
            "global_compression_ratio": None,
            "ignore": [],
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": "0.20.0",
        }


def _input_scale_name(args: dict[str, Any]) -> str:
    """A float encoding's stored input scale: NVFP4's global one, FP8's per-tensor one."""
    return "input_global_scale" if args["strategy"] == "tensor_group" else "input_scale"


def _input_scale_dtype(args: dict[str, Any], dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if args["strategy"] == "tensor_group" else dtype


def _float_outputs(module: str, args: dict[str, Any], rows: int, cols: int, dtype: torch.dtype) -> list[OutputTensor]:
    """The tensors of a float encoding (see the module docstring), from its compressed-tensors arguments."""
    if args["num_bits"] == 8:
        if args["strategy"] == "block":
            height, width = args["block_structure"]
            scale_shape = (-(-rows // height), -(-cols // width))
        else:
            scale_shape = (rows, 1)
        return [entry_bound(f"{module}.weight", FP8, (rows, cols)), entry_bound(f"{module}.weight_scale", dtype, scale_shape)]
    groups = cols // args["group_size"]
    outputs = [entry_bound(f"{module}.weight_packed", torch.uint8, (rows, cols // 2)),
               entry_bound(f"{module}.weight_scale", FP8 if args["strategy"] == "tensor_group" else torch.uint8,
                           (rows, groups))]
    if args["strategy"] == "tensor_group":
        outputs.append(entry_bound(f"{module}.weight_global_scale", torch.float32, (1,)))
    return outputs


def packed_nbytes(plan: TensorPlan, dtype: torch.dtype = torch.bfloat16) -> int:
    return CompressedSink.packed_nbytes(plan, dtype)
