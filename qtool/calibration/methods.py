"""Calibration-aware quantization of a model's planned Linear weights: rtn, imatrix, gptq.

- ``rtn``: the scheme's own round-to-nearest (what the sinks do without calibration);
- ``imatrix``: importance-weighted scale search on the scheme's grid, importance = per-input-channel
  mean square activation (the role of llama.cpp's importance matrix), then round to nearest;
- ``gptq``: GPTQ error feedback with the inverse Hessian on the scheme's grid, with scales from the
  same importance-weighted search.

:func:`calibrated_weights` walks the decoder blocks. Without saved statistics it runs the
calibration pass itself, block by block, and (``sequential``) feeds each block the outputs of the
already-quantized previous blocks, as GPTQ does. With statistics from ``qtool calibrate``
(``--stats``) it needs no forward pass at all.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from qtool import ui
from qtool.calibration.data import CalibrationSet
from qtool.calibration.observers import InputStats
from qtool.calibration.runner import CalibrationStats, LayerRecord, walk_blocks
from qtool.errors import BadArgument
from qtool.plan import TensorPlan, layer_index
from qtool.schemes.gptq import Grid, QuantResult, gptq_quantize, layer_output_error, make_grid, quantize_rtn
from qtool.sources.base import Source

METHODS = ("rtn", "imatrix", "gptq")


@dataclass
class MethodOptions:
    method: str = "gptq"
    damp: float = 0.01               # GPTQ: fraction of the mean Hessian diagonal added to it
    damp_diag: float = 1.0           # GPTQ: H + damp_diag * diag(H), against overfitting few tokens
    act_order: bool = True           # GPTQ: columns by decreasing activation energy
    block_size: int = 128            # GPTQ: lazy-update block (columns)
    static_groups: bool = False      # GPTQ: fit all group scales before any error feedback
    sequential: bool = True          # feed each block the quantized outputs of the previous ones


@dataclass
class CalibratedTensor:
    plan: TensorPlan
    weight: torch.Tensor             # dequantized result, float32, original shape
    result: QuantResult | None       # levels / scales / offsets chosen (None for the scheme's own rtn)
    packed: Any                      # the scheme's packed object, ready for the sink
    error: float                     # relative layer-output error ||X(W-Q)^T||^2 / ||XW^T||^2 (nan without X)


@dataclass
class MethodReport:
    method: str
    layers: list[LayerRecord] = field(default_factory=list)


def grid_for(plan: TensorPlan) -> Grid:
    try:
        return make_grid(plan.scheme, group_size=plan.params.get("group_size"))
    except ValueError:
        raise BadArgument(f"--method: no calibration-aware quantization for scheme {plan.scheme} "
                          f"(tensor {plan.name}); use --method rtn") from None


def quantize_weight(weight: torch.Tensor, plan: TensorPlan, stats: InputStats | None,
                    options: MethodOptions) -> tuple[torch.Tensor, QuantResult | None]:
    """(dequantized weight, chosen grid parameters) for one planned 2-D weight."""
    from qtool.schemes.base import get_scheme

    if options.method == "rtn":
        scheme = get_scheme(plan.scheme)
        return scheme.dequantize(scheme.quantize(weight, **plan.params)).to(torch.float32), None
    if stats is None:
        raise BadArgument(f"--method {options.method}: no calibration statistics for {plan.name}")
    grid = grid_for(plan)
    if options.method == "imatrix":
        result = quantize_rtn(weight, grid, stats.mean_square)
    elif options.method == "gptq":
        if stats.hessian is None:
            raise BadArgument("--method gptq needs X^T X; recreate the statistics with `qtool calibrate --hessian`")
        result = gptq_quantize(weight, stats.hessian, grid, damp=options.damp, act_order=options.act_order,
                               block_size=options.block_size, static_groups=options.static_groups,
                               importance=stats.mean_square, damp_diag=options.damp_diag)
    else:
        raise BadArgument(f"--method {options.method}: choose one of {', '.join(METHODS)}")
    return result.qweight, result


def _pack(plan: TensorPlan, weight: torch.Tensor, result: QuantResult | None) -> Any:
    if result is None:
        return None
    from qtool.calibration.packing import pack_result

    return pack_result(plan, result)


def calibrated_weights(source: Source, plans: list[TensorPlan], options: MethodOptions, *,
                       stats: CalibrationStats | None = None, calib_set: CalibrationSet | None = None,
                       device: str = "cpu", pack: bool = True) -> Iterator[CalibratedTensor]:
    """Quantize every planned decoder-block weight with ``options.method``, block by block.

    Yields in block order (layer 0 first, then its Linears in module order); tensors outside the
    decoder blocks, or planned ``keep``, are not yielded (the pipeline handles them as usual).
    """
    planned = {p.name: p for p in plans if not p.keep and layer_index(p.name) is not None}
    if options.method not in METHODS:
        raise BadArgument(f"--method {options.method}: choose one of {', '.join(METHODS)}")
    if options.method == "rtn" or stats is not None:
        yield from _from_stats(source, planned, options, stats, device, pack)
        return
    if calib_set is None:
        raise BadArgument(f"--method {options.method} needs calibration data (--calib) or --stats")
    n_layers = int(source.config.get("num_hidden_layers") or 0)
    with ui.task(f"{options.method} {source.description}", total=n_layers or None) as progress:
        for step in walk_blocks(source, calib_set, device=device, want_hessian=options.method == "gptq"):
            started = time.perf_counter()
            errors = []
            for name, module in step.linears.items():
                plan = planned.get(name)
                if plan is None:
                    continue
                weight = module.weight.detach()
                stats_for = step.stats.get(name)
                qweight, result = quantize_weight(weight, plan, stats_for, options)
                error = (layer_output_error(weight, qweight, stats_for.hessian)
                         if stats_for is not None and stats_for.hessian is not None else float("nan"))
                errors.append(error)
                if options.sequential:
                    module.weight = torch.nn.Parameter(qweight.to(weight.dtype), requires_grad=False)
                    step.modified = True
                yield CalibratedTensor(plan, qweight, result, _pack(plan, qweight, result) if pack else None, error)
            seconds = step.seconds + time.perf_counter() - started
            worst = max(errors) if errors else 0.0
            progress.advance(1, status=f"layer {step.index + 1}/{step.n_layers} {seconds:.1f}s max err {worst:.4f}")


def _from_stats(source: Source, planned: dict[str, TensorPlan], options: MethodOptions,
                stats: CalibrationStats | None, device: str, pack: bool) -> Iterator[CalibratedTensor]:
    names = sorted(planned, key=lambda n: (layer_index(n), n))
    with ui.task(f"{options.method} {source.description}", total=len(names)) as progress:
        for name in names:
            plan = planned[name]
            weight = source.load(name).to(device=device, dtype=torch.float32)
            stats_for = stats.linears.get(name) if stats is not None else None
            if options.method != "rtn" and stats_for is None:
                raise BadArgument(f"--stats has no statistics for {name}; recreate them with `qtool calibrate` "
                                  "on this model")
            qweight, result = quantize_weight(weight, plan, stats_for, options)
            error = (layer_output_error(weight, qweight, stats_for.hessian.to(device))
                     if stats_for is not None and stats_for.hessian is not None else float("nan"))
            yield CalibratedTensor(plan, qweight, result, _pack(plan, qweight, result) if pack else None, error)
            progress.advance(1, status=name)


class OverlaySource(Source):
    """A source whose named tensors are replaced (the dequantized results of a method): evaluates a
    quantization recipe without writing it. Everything else comes from ``base``."""

    def __init__(self, base: Source, replaced: dict[str, torch.Tensor]) -> None:
        super().__init__(spec=base.spec, description=f"{base.description} (+{len(replaced)} quantized)",
                         config=base.config, revision=base.revision, is_quantized=True)
        self.base = base
        self.replaced = replaced

    def tensors(self) -> list:
        return self.base.tensors()

    def load(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name]
        return self.base.load(name)

    def tokenizer_dir(self):
        return self.base.tokenizer_dir()

    def extra_files(self) -> dict:
        return self.base.extra_files()
