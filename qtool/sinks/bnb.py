"""bitsandbytes checkpoints as transformers' ``save_pretrained`` writes them (loaded with
``AutoModelForCausalLM.from_pretrained(OUT)`` and bitsandbytes installed).

Per quantized Linear ``<module>`` (weight name ``<module>.weight``):

- 4-bit (nf4/fp4): ``weight`` uint8 [(numel+1)//2, 1], ``weight.absmax`` (float32, or uint8 with
  double quant), ``weight.quant_map`` float32 [16], with double quant ``weight.nested_absmax``
  float32 and ``weight.nested_quant_map`` float32 [256], and ``weight.quant_state.bitsandbytes__nf4``
  (or ``__fp4``): uint8 bytes of the JSON ``{"quant_type", "blocksize", "dtype", "shape",
  "nested_blocksize", "nested_dtype", "nested_offset"}`` (bitsandbytes' ``QuantState.as_dict(packed=True)``).
- 8-bit (int8-sym): ``weight`` int8 [rows, cols], ``<module>.SCB`` float32 [rows] and
  ``<module>.weight_format`` uint8 scalar 0 ("row").

``config.json`` gets the ``quantization_config`` transformers writes for ``BitsAndBytesConfig``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

import torch

from qtool.errors import BadArgument
from qtool.plan import TensorPlan
from qtool.schemes.base import get_scheme
from qtool.schemes.int8 import PackedInt8Rows
from qtool.schemes.nf4 import BLOCK_SIZES, NESTED_BLOCK_SIZE, Packed4bit
from qtool.sinks.safetensors_io import (
    OutputTensor,
    SafetensorsSink,
    dtype_name,
    entry_bound,
    linear_module_name,
)

_MAX_FLOAT_TEXT = "-1.2345678901234567e-308"   # longest repr() of a float


def quant_state_json(packed: Packed4bit) -> bytes:
    """The quant-state JSON bitsandbytes packs into a uint8 tensor, key order and spacing included."""
    state: dict[str, Any] = {"quant_type": packed.quant_type, "blocksize": packed.block_size,
                             "dtype": dtype_name(packed.dtype), "shape": list(packed.shape)}
    if packed.double_quant:
        state.update({"nested_blocksize": packed.nested_block_size, "nested_dtype": "float32",
                      "nested_offset": packed.nested_offset})
    return json.dumps(state).encode("utf-8")


def _module_name(weight_name: str) -> str:
    return linear_module_name(weight_name, "bitsandbytes")


def _params_4bit(plan: TensorPlan) -> tuple[int, bool]:
    return int(plan.params.get("block_size", 64)), bool(plan.params.get("double_quant", True))


class BnbSink(SafetensorsSink):
    family: ClassVar[str] = "bnb"

    @classmethod
    def check_layout(cls, plans: list[TensorPlan]) -> None:
        super().check_layout(plans)
        quantized = [plan for plan in plans if not plan.keep]
        kinds = {"8bit" if plan.scheme == "int8-sym" else "4bit" for plan in quantized}
        if len(kinds) > 1:
            raise BadArgument("transformers loads a bitsandbytes checkpoint as all 4-bit or all 8-bit; "
                              "do not mix int8-sym with nf4/fp4 in one output")
        quant_types = {plan.scheme for plan in quantized if plan.scheme != "int8-sym"}
        if len(quant_types) > 1:
            raise BadArgument("transformers' bitsandbytes config has one 4-bit type; use nf4 or fp4, not both")
        for plan in quantized:
            _module_name(plan.name)
            if len(plan.shape) != 2:
                raise BadArgument(f"bitsandbytes quantizes 2-D Linear weights; {plan.name} has shape {plan.shape}")
            if plan.scheme != "int8-sym":
                block_size, _ = _params_4bit(plan)
                if block_size not in BLOCK_SIZES:
                    raise BadArgument(f"--block-size {block_size}: bitsandbytes takes one of "
                                      f"{', '.join(map(str, BLOCK_SIZES))}")

    def check_plans(self, plans: list[TensorPlan]) -> None:
        super().check_plans(plans)
        quantized = [plan for plan in plans if not plan.keep]
        four_bit = {plan.scheme for plan in quantized if plan.scheme != "int8-sym"}   # one at most (check_layout)
        self.scheme_name = four_bit.pop() if four_bit else ("int8-sym" if quantized else None)
        double_quants = {_params_4bit(plan)[1] for plan in quantized if plan.scheme != "int8-sym"}
        self.double_quant = double_quants != {False}
        # An explicit skip list replaces transformers' default one (lm_head), so lm_head is named
        # here unless quantized, also when tied embeddings leave it out of the checkpoint.
        kept = {_module_name(plan.name) for plan in plans
                if plan.keep and len(plan.shape) == 2 and plan.name.endswith(".weight")}
        if "lm_head.weight" not in {plan.name for plan in quantized}:
            kept.add("lm_head")
        self.kept_linear = sorted(kept)

    @classmethod
    def quantized_outputs(cls, plan: TensorPlan, dtype: torch.dtype) -> list[OutputTensor]:
        module = _module_name(plan.name)
        rows = plan.shape[0]
        numel = math.prod(plan.shape)
        if plan.scheme == "int8-sym":
            return [entry_bound(plan.name, torch.int8, plan.shape),
                    entry_bound(f"{module}.SCB", torch.float32, (rows,)),
                    entry_bound(f"{module}.weight_format", torch.uint8, ())]
        block_size, double_quant = _params_4bit(plan)
        blocks = -(-numel // block_size)
        quant_type = get_scheme(plan.scheme).name
        longest_state = Packed4bit(quant_type=quant_type, data=torch.empty(0), absmax=torch.empty(0),
                                   block_size=block_size, shape=tuple(plan.shape), dtype=torch.bfloat16,
                                   quant_map=torch.empty(0))
        state_len = len(quant_state_json(longest_state)) + 2      # "bfloat16" is the longest dtype name
        if double_quant:
            state_len += len(', "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": ') \
                + len(_MAX_FLOAT_TEXT)
        outputs = [entry_bound(plan.name, torch.uint8, ((numel + 1) // 2, 1)),
                   entry_bound(f"{plan.name}.absmax", torch.uint8 if double_quant else torch.float32, (blocks,)),
                   entry_bound(f"{plan.name}.quant_map", torch.float32, (16,))]
        if double_quant:
            outputs += [entry_bound(f"{plan.name}.nested_absmax", torch.float32, (-(-blocks // NESTED_BLOCK_SIZE),)),
                        entry_bound(f"{plan.name}.nested_quant_map", torch.float32, (256,))]
        outputs.append(entry_bound(f"{plan.name}.quant_state.bitsandbytes__{quant_type}", torch.uint8, (state_len,)))
        return outputs

    def add(self, plan: TensorPlan, tensor: torch.Tensor, packed: Any = None) -> int:
        if isinstance(packed, Packed4bit) and packed.dtype != tensor.dtype:
            # A calibrated result decodes into the source weight's dtype, as the sink's own quantizer's does.
            packed = dataclasses.replace(packed, dtype=tensor.dtype)
        return super().add(plan, tensor, packed)

    def packed_tensors(self, plan: TensorPlan, packed: Any) -> dict[str, torch.Tensor]:
        if isinstance(packed, PackedInt8Rows):
            module = _module_name(plan.name)
            return {plan.name: packed.weight, f"{module}.SCB": packed.scb,
                    f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}
        tensors = {plan.name: packed.data, f"{plan.name}.absmax": packed.absmax,
                   f"{plan.name}.quant_map": packed.quant_map}
        if packed.double_quant:
            tensors[f"{plan.name}.nested_absmax"] = packed.nested_absmax
            tensors[f"{plan.name}.nested_quant_map"] = packed.nested_quant_map
        state = quant_state_json(packed)
        tensors[f"{plan.name}.quant_state.bitsandbytes__{packed.quant_type}"] = \
            torch.frombuffer(bytearray(state), dtype=torch.uint8)
        return tensors

    def quantization_config(self) -> dict[str, Any]:
        load_in_8bit = self.scheme_name == "int8-sym"
        load_in_4bit = not load_in_8bit
        compute_dtype = dtype_name(self.model_dtype()) if load_in_4bit else "float32"
        return {
            "_load_in_4bit": load_in_4bit,
            "_load_in_8bit": load_in_8bit,
            "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.scheme_name if load_in_4bit and self.scheme_name else "fp4",
            "bnb_4bit_use_double_quant": load_in_4bit and self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            # Linear layers the plan kept in full precision: transformers must not turn them into
            # bitsandbytes modules (lm_head is always skipped by transformers itself).
            "llm_int8_skip_modules": self.kept_linear or None,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": load_in_4bit,
            "load_in_8bit": load_in_8bit,
            "quant_method": "bitsandbytes",
        }


def packed_nbytes(plan: TensorPlan, dtype: torch.dtype = torch.bfloat16) -> int:
    return BnbSink.packed_nbytes(plan, dtype)
