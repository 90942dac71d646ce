"""Calibration-aware quantization of a model's planned Linear weights: rtn, imatrix, gptq, awq.

- ``rtn``: the scheme's own round-to-nearest (what the sinks do without calibration);
- ``imatrix``: importance-weighted scale search on the scheme's grid, importance = per-input-channel
  mean square activation (the role of llama.cpp's importance matrix), then round to nearest;
- ``gptq``: GPTQ error feedback with the inverse Hessian on the scheme's grid, with scales from the
  same importance-weighted search;
- ``awq``, ``awq+imatrix``, ``awq+gptq``: AWQ's per-input-channel scaling (:mod:`qtool.calibration.awq`),
  searched per decoder block and folded into the norms / producer Linears, then the scaled weights
  quantized by round to nearest on the grid, the importance-weighted search, or GPTQ.

:func:`calibrated_weights` walks the decoder blocks. Without saved statistics it runs the
calibration pass itself, block by block, and (``sequential``) feeds each block the outputs of the
already-quantized previous blocks, as GPTQ does. With statistics from ``qtool calibrate``
(``--stats``) it needs no forward pass at all.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from qtool import ui
from qtool.architectures import ScaleSite, block_record, merged_expert_name
from qtool.calibration import distributed
from qtool.calibration.data import CalibrationSet
from qtool.calibration.awq import (Choice, Member, alpha_grid, block_sites, effective_weight, fold_ops, scaled_stats,
                                  search)
from qtool.calibration.observers import InputStats
from qtool.calibration.runner import CalibrationStats, walk_blocks
from qtool.calibration.smoothing import SmoothingOps, apply_ops
from qtool.errors import BadArgument
from qtool.plan import TensorPlan, layer_index
from qtool.schemes.gptq import Grid, QuantResult, gptq_quantize, layer_output_error, quantize_rtn
from qtool.sources.base import Source

METHODS = ("rtn", "imatrix", "gptq", "awq", "awq+imatrix", "awq+gptq")


@dataclass
class MethodOptions:
    method: str = "gptq"
    damp: float = 0.01               # GPTQ: fraction of the mean Hessian diagonal added to it
    damp_diag: float = 1.0           # GPTQ: H + damp_diag * diag(H), against overfitting few tokens
    act_order: bool = True           # GPTQ: columns by decreasing activation energy
    block_size: int = 128            # GPTQ: lazy-update block (columns)
    static_groups: bool = False      # GPTQ: fit all group scales before any error feedback
    refit_scales: bool = True        # GPTQ: re-fit the scales by least squares once the levels are chosen
    sequential: bool = True          # feed each block the quantized outputs of the previous ones
    true_sequential: bool = True     # also within a block: o_proj sees quantized q/k/v, down_proj quantized gate/up
    awq_grid: int = 20               # AWQ: alphas 0, 1/n, ..., 1 searched per site
    # Mixtures of experts: statistics of every expert from every token (the router still picks the
    # outputs), and the fewest tokens an expert's statistics need; below, it is rounded to nearest.
    all_experts: bool = False
    expert_min_tokens: int = 64


@dataclass
class CalibratedTensor:
    plan: TensorPlan
    weight: torch.Tensor             # dequantized result, float32, original shape, in the unscaled model
    result: QuantResult | None       # levels / scales / offsets chosen (None for the scheme's own rtn)
    packed: Any                      # the scheme's packed object, ready for the sink (AWQ: the scaled weight)
    error: float                     # relative layer-output error ||X(W-Q)^T||^2 / ||XW^T||^2 (nan without X)
    # AWQ: the scalings folded into the model (norms, producer rows, consumer columns) that ``packed``
    # belongs to; the whole block's ride on its first tensor. Merge them all (SmoothedSource) to write.
    folds: SmoothingOps = field(default_factory=dict)


@dataclass
class MethodReport:
    """What a method saw of a mixture of experts, for the quantize report."""

    expert_tokens: dict[str, list[int]] = field(default_factory=dict)   # experts -> tokens routed to each
    fallbacks: dict[str, int] = field(default_factory=dict)   # expert weight rounded to nearest -> its tokens


def expert_fallback(name: str, stats: InputStats | None, options: MethodOptions, report: MethodReport) -> bool:
    """True (and noted in ``report``) for an expert's weight whose statistics come from fewer than
    ``options.expert_min_tokens`` tokens (none: the router sent it none): it is rounded to nearest, which
    needs no statistics, rather than fitted to a handful of tokens."""
    if options.method == "rtn" or merged_expert_name(name) is None:
        return False
    tokens = stats.tokens if stats is not None else 0
    if tokens >= options.expert_min_tokens:
        return False
    report.fallbacks[name] = tokens
    return True


def grid_for(plan: TensorPlan, absmax: float | None = None) -> Grid:
    """The grid calibration fits for a planned weight: its encoding record's ``calibration_grid``
    (nf4/fp4 name their block "block_size" and double-quantize their scales by default; ``absmax``: the
    whole weight's largest magnitude, for encodings with a per-tensor scale, NVFP4's global one)."""
    from qtool.schemes.base import get_scheme

    grid = get_scheme(plan.scheme).calibration_grid(
        group_size=plan.params.get("group_size") or plan.params.get("block_size"),
        double_quant=bool(plan.params.get("double_quant", True)), columns=plan.shape[-1], absmax=absmax)
    if grid is None:
        raise BadArgument(f"--method: no calibration-aware quantization for scheme {plan.scheme} "
                          f"(tensor {plan.name}); use --method rtn")
    return grid


def _tensor_absmax(weight: torch.Tensor, plan: TensorPlan) -> float | None:
    """The weight's largest magnitude where its encoding has a per-tensor scale (NVFP4's global one, which
    ``shares_global_scale`` marks); None elsewhere, sparing every other weight the pass and the sync."""
    from qtool.schemes.base import get_scheme

    return float(weight.abs().amax()) if getattr(get_scheme(plan.scheme), "shares_global_scale", False) else None


def quantize_weight(weight: torch.Tensor, plan: TensorPlan, stats: InputStats | None,
                    options: MethodOptions, absmax: float | None = None) -> tuple[torch.Tensor, QuantResult | None]:
    """(dequantized weight, chosen grid parameters) for one planned 2-D weight (``absmax``: of the whole
    weight when this is a share of its rows)."""
    from qtool.schemes.base import get_scheme

    if options.method == "rtn":
        scheme = get_scheme(plan.scheme)
        return scheme.dequantize(scheme.quantize(weight, **plan.params)).to(torch.float32), None
    if stats is None:
        raise BadArgument(f"--method {options.method}: no calibration statistics for {plan.name}")
    scheme = get_scheme(plan.scheme)
    if options.method == "imatrix" and not scheme.takes_importance and not scheme.packs_calibrated:
        # A type with neither an importance-weighted quantizer nor a calibrated packing (MXFP4): round to nearest.
        return scheme.dequantize(scheme.quantize(weight, **plan.params)).to(torch.float32), None
    if options.method == "imatrix" and scheme.takes_importance:
        # The type's own quantizer weighs each element by the importance, byte for byte as llama-quantize
        # --imatrix does with the same matrix.
        packed = scheme.quantize(weight, importance=stats.mean_square, **plan.params)
        qweight = scheme.dequantize(packed).to(torch.float32)
        empty = torch.empty(0)
        return qweight, QuantResult(qweight, empty, empty, empty, packed=packed)
    grid = grid_for(plan, _tensor_absmax(weight, plan) if absmax is None else absmax)
    if options.method == "imatrix":
        result = quantize_rtn(weight, grid, stats.mean_square)
    elif options.method == "gptq":
        if stats.hessian is None:
            raise BadArgument("--method gptq needs X^T X; recreate the statistics with `qtool calibrate`")
        result = gptq_quantize(weight, stats.hessian, grid, damp=options.damp, act_order=options.act_order,
                               block_size=options.block_size, static_groups=options.static_groups,
                               importance=stats.mean_square, damp_diag=options.damp_diag,
                               refit=options.refit_scales)
    else:
        raise BadArgument(f"--method {options.method}: choose one of {', '.join(METHODS)}")
    return result.qweight, result


def _pack(plan: TensorPlan, result: QuantResult | None) -> Any:
    if result is None:
        return None
    from qtool.calibration.packing import pack_result

    return pack_result(plan, result)


def calibrated_weights(source: Source, plans: list[TensorPlan], options: MethodOptions, *,
                       stats: CalibrationStats | None = None, calib_set: CalibrationSet | None = None,
                       device: str = "cpu", pack: bool = True,
                       report: MethodReport | None = None) -> Iterator[CalibratedTensor]:
    """Quantize every planned decoder-block weight with ``options.method``, block by block.

    Yields in block order (layer 0 first, then its Linears in module order); tensors outside the
    decoder blocks, or planned ``keep``, are not yielded (the pipeline handles them as usual).
    Experts with too few calibration tokens are rounded to nearest (:func:`expert_fallback`);
    ``report`` collects them and the tokens routed to each expert.
    """
    report = report if report is not None else MethodReport()
    planned = {p.name: p for p in plans if not p.keep and layer_index(p.name) is not None}
    if options.method not in METHODS:
        raise BadArgument(f"--method {options.method}: choose one of {', '.join(METHODS)}")
    is_awq = options.method.startswith("awq")
    if options.method == "rtn" or stats is not None:
        for record in stats.records if stats is not None else []:
            report.expert_tokens.update(record.expert_tokens)
        if is_awq:
            yield from _awq_from_stats(source, planned, options, stats, device, pack, report)
        else:
            yield from _from_stats(source, planned, options, stats, device, pack, report)
        return
    if calib_set is None:
        raise BadArgument(f"--method {options.method} needs calibration data (--calib) or --stats")
    n_layers = int(source.config.get("num_hidden_layers") or 0)
    shapes = {info.name: tuple(info.shape) for info in source.tensors()}
    want_hessian = options.method == "gptq" or is_awq
    with ui.task(f"{options.method} {source.description}", total=n_layers or None) as progress:
        per_group = options.sequential and options.true_sequential and not is_awq
        block_seconds, block_errors = 0.0, []     # over a block's groups (per_group walks)
        for step in walk_blocks(source, calib_set, device=device, want_hessian=want_hessian, per_group=per_group,
                                all_experts=options.all_experts, hessian_on_device=True):
            started = time.perf_counter()
            report.expert_tokens.update(step.expert_tokens)
            if is_awq:
                weights = {name: module.weight.detach() for name, module in step.linears.items()}
                items, alphas = _awq_block(step.index, weights, step.stats, planned, shapes, options, pack,
                                           _awq_sites(source), report)
            else:
                weights = {name: module.weight.detach() for name, module in step.linears.items() if name in planned}
                items, alphas = _quantize_step(weights, step.stats, planned, options, pack, report), {}
            for item in items:
                if options.sequential:
                    # AWQ: the unscaled model's effective weight computes what the scaled model does.
                    module = step.linears[item.plan.name]
                    module.weight = torch.nn.Parameter(item.weight.to(module.weight.dtype), requires_grad=False)
                    step.modified = True
                yield item
            block_seconds += step.seconds + time.perf_counter() - started
            block_errors.extend(item.error for item in items)
            if step.last_of_block:
                worst = max(block_errors, default=0.0)
                chosen = " alpha " + "/".join(f"{a:.2f}" for a in alphas.values()) if alphas else ""
                progress.advance(1, status=f"layer {step.index + 1}/{step.n_layers} {block_seconds:.1f}s "
                                           f"max err {worst:.4f}{chosen}")
                block_seconds, block_errors = 0.0, []


def _quantize_step(weights: dict[str, torch.Tensor], stats: dict[str, InputStats], planned: dict[str, TensorPlan],
                   options: MethodOptions, pack: bool, report: MethodReport) -> list[CalibratedTensor]:
    """Quantize one step's planned weights (in ``weights``' order). GPTQ solves the weights that share an
    input (q/k/v, gate/up) and a grid as one matrix, their rows stacked: rows are independent in GPTQ
    (one Hessian, one column order), so each part comes out as it would alone, in one column loop
    instead of several."""
    results: dict[str, tuple[torch.Tensor, QuantResult | None]] = {}
    for names in _solved_together(weights, stats, planned, options):
        name = names[0]
        chosen = _for_tensor(name, stats.get(name), options, report)
        if len(names) == 1:
            results[name] = _quantize_rows(weights[name], planned[name], stats.get(name), chosen)
            continue
        stacked = torch.cat([weights[n] for n in names])
        _, result = _quantize_rows(stacked, planned[name], stats[name], chosen)
        rows = [weights[n].shape[0] for n in names]
        for part_name, part in zip(names, _split_rows(result, rows)):
            results[part_name] = part.qweight, part
    items = []
    for name, weight in weights.items():
        plan, (qweight, result), stats_for = planned[name], results[name], stats.get(name)
        error = (layer_output_error(weight, qweight, stats_for.hessian)
                 if stats_for is not None and stats_for.hessian is not None else float("nan"))
        items.append(CalibratedTensor(plan, qweight, result, _pack(plan, result) if pack else None, error))
    return items


def _solved_together(weights: dict[str, torch.Tensor], stats: dict[str, InputStats], planned: dict[str, TensorPlan],
                     options: MethodOptions) -> list[list[str]]:
    """``weights``' names in sets quantized as one: GPTQ on one input's statistics, one scheme and
    parameters, a grid whose scales are per row (not NF4's double quantization across the tensor),
    and no expert falling back; every other weight alone."""
    sets: dict[Any, list[str]] = {}
    for name in weights:
        stats_for, plan = stats.get(name), planned[name]
        joinable = (options.method == "gptq" and stats_for is not None and stats_for.tokens >= options.expert_min_tokens
                    and not grid_for(plan).whole_tensor_scales)
        key = (id(stats_for), plan.scheme, repr(sorted(plan.params.items())), plan.shape[-1]) if joinable else name
        sets.setdefault(key, []).append(name)
    return list(sets.values())


def _quantize_rows(weight: torch.Tensor, plan: TensorPlan, stats: InputStats | None,
                   options: MethodOptions) -> tuple[torch.Tensor, QuantResult | None]:
    """``quantize_weight``; in a run spread over processes, GPTQ's rows shared among them (rows are
    independent in GPTQ: one Hessian, one column order), every process then holding the whole result
    (each goes on with the quantized block; rank 0 writes)."""
    world = distributed.world_size()
    if (world == 1 or options.method != "gptq" or weight.shape[0] < world or stats is None
            or grid_for(plan).whole_tensor_scales):
        return quantize_weight(weight, plan, stats, options)
    bounds = [weight.shape[0] * part // world for part in range(world + 1)]
    rank = distributed.rank()
    _, mine = quantize_weight(weight[bounds[rank]:bounds[rank + 1]], plan, stats, options,
                              absmax=_tensor_absmax(weight, plan))
    on_cpu = dataclasses.replace(mine, qweight=mine.qweight.cpu(), levels=mine.levels.cpu(), scale=mine.scale.cpu(),
                                 offset=mine.offset.cpu(), extra={k: v.cpu() for k, v in mine.extra.items()},
                                 perm=None if mine.perm is None else mine.perm.cpu())
    parts = distributed.all_gather_objects(on_cpu)

    def joined(pick) -> torch.Tensor:
        return torch.cat([pick(part) for part in parts]).to(weight.device)

    result = QuantResult(joined(lambda r: r.qweight), joined(lambda r: r.levels), joined(lambda r: r.scale),
                         joined(lambda r: r.offset), {key: joined(lambda r, key=key: r.extra[key]) for key in mine.extra},
                         mine.perm)
    return result.qweight, result


def _split_rows(result: QuantResult, rows: list[int]) -> list[QuantResult]:
    """A stacked weight's result, back into its parts (every field is per row but the column order)."""
    def parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(tensor, rows)

    extras = {key: parts(value) for key, value in result.extra.items()}
    return [QuantResult(qweight, levels, scale, offset, {key: value[index] for key, value in extras.items()}, result.perm)
            for index, (qweight, levels, scale, offset) in enumerate(zip(parts(result.qweight), parts(result.levels),
                                                                           parts(result.scale), parts(result.offset)))]


def _for_tensor(name: str, stats: InputStats | None, options: MethodOptions, report: MethodReport) -> MethodOptions:
    """``options``, or round to nearest for an expert with too few calibration tokens."""
    return dataclasses.replace(options, method="rtn") if expert_fallback(name, stats, options, report) else options


def _awq_sites(source: Source) -> tuple[ScaleSite, ...]:
    record = block_record(source.config)
    return record.awq_sites if record is not None else ()


def _inner_method(method: str) -> str:
    """What quantizes the scaled weights of ``awq[+inner]``."""
    return method.partition("+")[2] or "rtn"


def _awq_block(layer: int, weights: dict[str, torch.Tensor], stats: dict[str, InputStats],
               planned: dict[str, TensorPlan], shapes: dict[str, tuple[int, ...]], options: MethodOptions,
               pack: bool, candidates: Sequence[ScaleSite],
               report: MethodReport) -> tuple[list[CalibratedTensor], dict[str, float]]:
    """AWQ on one decoder block: search the sites' scales one after another (each on the Linears as the
    earlier sites left them), then quantize every planned Linear's scaled weight. Returns the tensors
    (in ``weights``' order) and the alpha chosen per site (by producer name)."""
    inner = _inner_method(options.method)
    fallback = {name for name in weights if name in planned and expert_fallback(name, stats.get(name), options, report)}
    quantizers = {name: _search_quantizer(grid_for(planned[name]), stats[name], inner)
                  for name in weights if name in planned and name in stats and name not in fallback}

    def member(name: str, folds: SmoothingOps) -> Member:
        hessian = stats[name].hessian
        if hessian is None:
            raise BadArgument(f"--method {options.method} needs X^T X; recreate the statistics with `qtool calibrate`")
        return Member(weights[name].to(torch.float32), hessian, quantizers[name], folds.get(name, []))

    choices: list[Choice] = []
    for site in block_sites(layer, shapes, shapes, candidates):
        if not all(name in quantizers for name in site.linears):
            continue   # a kept or uncalibrated Linear stays as it is: no scaling to fold
        folds = fold_ops(choices)
        producer = member(site.producer, folds) if site.producer in quantizers else None
        consumers = [member(name, folds) for name in site.linears]
        act_scale = stats[site.linears[0]].mean_square.sqrt()
        choices.append(search(site, consumers, producer, act_scale, alpha_grid(options.awq_grid)))
    folds = fold_ops(choices)
    inner_options = dataclasses.replace(options, method=inner)
    items: list[CalibratedTensor] = []
    for name, weight in weights.items():
        plan = planned.get(name)
        if plan is None:
            continue
        weight = weight.to(torch.float32)
        own = folds.get(name, [])
        stored = apply_ops(weight, own) if own else weight
        if name in fallback:
            qstored, result = quantize_weight(stored, plan, None, dataclasses.replace(options, method="rtn"))
        elif inner == "rtn":
            result = quantize_rtn(stored, grid_for(plan))   # exactly the search's candidate
            qstored = result.qweight
        else:
            stats_for = stats.get(name)
            column_scales = [factors for how, factors in own if how == "cols"]
            if stats_for is not None and column_scales:
                stats_for = scaled_stats(stats_for, column_scales[0])
            qstored, result = quantize_weight(stored, plan, stats_for, inner_options)
        effective = effective_weight(qstored, own)
        hessian = stats[name].hessian if name in stats else None
        error = (layer_output_error(weight, effective, hessian.to(weight.device)) if hessian is not None
                 else float("nan"))
        items.append(CalibratedTensor(plan, effective, result, _pack(plan, result) if pack else None, error))
    if items:
        items[0].folds = folds
    return items, {choice.site.producer: choice.alpha for choice in choices}


def _search_quantizer(grid: Grid, stats: InputStats, inner: str):
    """The quantizer of AWQ's search: the grid's round to nearest, importance-weighted (with the scaled
    inputs' mean square) when the final method is (GPTQ is too slow to run per candidate)."""
    if inner == "rtn":
        return lambda weight, column_scales: quantize_rtn(weight, grid).qweight
    mean_square = stats.mean_square

    def weighted(weight: torch.Tensor, column_scales: torch.Tensor | None) -> torch.Tensor:
        importance = mean_square.to(weight.device)
        if column_scales is not None:
            importance = importance / column_scales.to(weight.device).square()
        return quantize_rtn(weight, grid, importance).qweight

    return weighted


def _awq_from_stats(source: Source, planned: dict[str, TensorPlan], options: MethodOptions,
                    stats: CalibrationStats, device: str, pack: bool,
                    report: MethodReport) -> Iterator[CalibratedTensor]:
    shapes = {info.name: tuple(info.shape) for info in source.tensors()}
    layers = sorted({layer_index(name) for name in planned})
    with ui.task(f"{options.method} {source.description}", total=len(layers)) as progress:
        for layer in layers:
            block = sorted(name for name in planned if layer_index(name) == layer)
            missing = [name for name in block if name not in stats.linears and merged_expert_name(name) is None]
            if missing:
                raise BadArgument(f"--stats has no statistics for {missing[0]}; recreate them with `qtool calibrate` "
                                  "on this model")
            weights = {name: source.load(name).to(device=device, dtype=torch.float32) for name in block}
            items, alphas = _awq_block(layer, weights, stats.linears, planned, shapes, options, pack,
                                       _awq_sites(source), report)
            yield from items
            progress.advance(1, status=f"layer {layer} alpha " + "/".join(f"{a:.2f}" for a in alphas.values()))


def _from_stats(source: Source, planned: dict[str, TensorPlan], options: MethodOptions,
                stats: CalibrationStats | None, device: str, pack: bool,
                report: MethodReport) -> Iterator[CalibratedTensor]:
    names = sorted(planned, key=lambda n: (layer_index(n), n))
    with ui.task(f"{options.method} {source.description}", total=len(names)) as progress:
        for name in names:
            plan = planned[name]
            weight = source.load(name).to(device=device, dtype=torch.float32)
            stats_for = stats.linears.get(name) if stats is not None else None
            chosen = _for_tensor(name, stats_for, options, report)
            if chosen.method != "rtn" and stats_for is None:
                raise BadArgument(f"the statistics (--stats, --imatrix) have none for {name}; recreate them "
                                  "on this model (`qtool calibrate`, llama-imatrix)")
            qweight, result = quantize_weight(weight, plan, stats_for, chosen)
            error = (layer_output_error(weight, qweight, stats_for.hessian.to(device))
                     if stats_for is not None and stats_for.hessian is not None else float("nan"))
            yield CalibratedTensor(plan, qweight, result, _pack(plan, result) if pack else None, error)
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
