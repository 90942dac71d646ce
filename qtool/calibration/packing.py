"""Lay out the levels and scales a calibration method chose in the scheme's packed format.

A format's own ``quantize`` derives the scales from the weight (round to nearest); a calibrated
result must keep the scales GPTQ / the importance search chose, so each encoding's record packs
it from ``QuantResult`` (``Scheme.pack_calibrated``, beside the format's byte helpers). The tests
check every layout by dequantizing the packed result with the format's reference (gguf-py, the
scheme's ``dequantize``).
"""
from __future__ import annotations

from typing import Any

import torch

from qtool.errors import BadArgument
from qtool.plan import TensorPlan
from qtool.schemes.base import get_scheme
from qtool.schemes.grids import QuantResult


def pack_result(plan: TensorPlan, result: QuantResult, dtype: torch.dtype = torch.float32) -> Any:
    """The packed object the plan's sink writes, holding exactly ``result``'s grid (the encoding
    record's ``pack_calibrated``). ``dtype``: the source weight's dtype (compressed-tensors stores
    scales in it)."""
    if result.packed is not None:     # already the encoding's bytes (its own importance-weighted quantizer)
        return result.packed
    return get_scheme(plan.scheme).pack_calibrated(result, plan.params, dtype, plan.name)


def check_importance(plans: list[TensorPlan], method: str) -> None:
    """Refuse, before any work, tensors of a type that cannot be quantized without an importance matrix
    (IQ2_XXS, IQ2_XS) unless --method imatrix gives them one: only decoder-block Linears get one."""
    from qtool.plan import layer_index

    for plan in plans:
        if plan.keep or not get_scheme(plan.scheme).requires_importance:
            continue
        if method != "imatrix":
            raise BadArgument(f"{plan.scheme} ({plan.name}) needs an importance matrix: add --imatrix FILE "
                              "(llama-imatrix's), or --method imatrix with --calib or --stats")
        if layer_index(plan.name) is None:
            raise BadArgument(f"{plan.scheme} needs an importance matrix, which no calibration collects for "
                              f"{plan.name} (outside the decoder blocks); give it another type")


def check_packable(plans: list[TensorPlan], method: str) -> None:
    """Refuse, before any calibration work, a plan whose calibrated decoder-block tensors could not
    be written (embeddings and the head are not calibrated: the sink rounds them to nearest)."""
    from qtool.plan import layer_index

    for plan in plans:
        if plan.keep or layer_index(plan.name) is None:
            continue
        scheme = get_scheme(plan.scheme)
        if not scheme.packs_calibrated and method != "imatrix":     # imatrix rounds such types to nearest
            raise BadArgument(f"--method {method}: calibrated {plan.scheme} tensors cannot be written yet "
                              f"({plan.name}); use --method rtn, or a scheme such as w8a8 or int4-sym")
