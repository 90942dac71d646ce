"""The quantization pipe: Source -> Plan -> Scheme (inside the Sink) -> Sink.finish -> report.

Streaming: one tensor is read, quantized and written at a time (on a GPU the next one is read
meanwhile), so peak memory is about the largest tensor or two plus the sink's buffers, whatever
the model's size.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from qtool import __version__, architectures, ui
from qtool.atomic import OutputClaim, StagedOutput, output_errors
from qtool.errors import BadArgument, Unsupported
from qtool import containers
from qtool.plan import KEEP, Recipe, TensorPlan, build_plan, check_coverage
from qtool.report import ActivationReport, ActivationRow, QuantizeReport, size_report
from qtool.schemes.base import get_scheme
from qtool.sources.base import Source
from qtool.sources.config_check import check_source_config
from qtool.sources.resolve import resolve

DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass
class QuantizeOptions:
    format: str = field(default_factory=containers.default_format)
    force: bool = False
    dry_run: bool = False
    max_shard_size: int = DEFAULT_SHARD_BYTES
    device: str = "cpu"
    revision: str | None = None
    method: str = "rtn"                 # rtn, or a calibration-aware method (gptq, imatrix, awq)
    calib: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    stats: Path | None = None
    imatrix: Path | None = None         # a llama.cpp importance matrix (.gguf or .dat) instead of --stats
    all_experts: bool = False           # mixtures of experts: see MethodOptions
    expert_min_tokens: int = 64
    target_bpw: float | None = None     # --target-bpw / --max-size: each tensor's type chosen to fit (qtool.sizing)
    max_size: int | None = None
    save_plan: Path | None = None       # where the chosen plan goes as a preset YAML
    size_types: list[str] | None = None  # --types: the only types the sizing may choose
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadArgument(f"--device {device}: no CUDA device is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise BadArgument(f"--device {device}: use cpu, cuda or auto")
    return device


def plan_model(source: Source, recipe: Recipe, fmt: str | None = None) -> list[TensorPlan]:
    # The layer count (plans, GGUF metadata) and calibration read the config: check it against the tensors first.
    check_source_config(source, require_architecture=False)
    fmt = fmt or containers.default_format()
    record = architectures.block_record(source.config)
    if record is not None and record.fused_experts is not None and not containers.format_option(
            fmt, "writes_fused_experts"):
        raise Unsupported(f"{architectures.model_type_of(source.config)} stores its experts fused, and transformers "
                          f"loads them only as float or MXFP4 parameters, not as --format {fmt} writes experts; "
                          "use --format gguf (llama.cpp)")
    tensors = source.tensors()
    # The format's adjustments to the rules (GGUF: tied embeddings get the output matrix's type).
    recipe = containers.format_option(fmt, "plan_recipe")(tensors, recipe, source.config)
    plans = build_plan(tensors, recipe, int(source.config.get("num_hidden_layers") or 0))
    for plan in plans:
        if not plan.keep:
            get_scheme(plan.scheme)   # unknown names fail before any work
    plans = _experts_kept_where_unloadable(plans, fmt)
    warning = check_coverage(plans, recipe, source.config)   # never exit 0 with nothing quantized
    if warning:
        ui.warn(warning)
    return plans


def _experts_kept_where_unloadable(plans: list[TensorPlan], fmt: str) -> list[TensorPlan]:
    """``plans`` with a mixture's experts kept when the container's runtime cannot load them quantized
    (bitsandbytes), as transformers' own bitsandbytes loading leaves them; said once."""
    schemes = {plan.scheme for plan in plans if not plan.keep}
    container = containers.container_for(fmt, schemes) if schemes else None
    if container is None or container.quantizes_experts:
        return plans
    experts = {plan.name for plan in plans if not plan.keep and architectures.merged_expert_name(plan.name)}
    if not experts:
        return plans
    ui.warn(f"{container.name}: the {len(experts)} expert matrices stay unquantized: transformers loads {container.name} "
            "weights into Linear layers only, and runs a mixture's experts as fused parameters; --format gguf, "
            "or a compressed-tensors scheme (--scheme int4-sym, fp8, nvfp4a16), quantizes them")
    return [replace(plan, scheme=KEEP, params={}) if plan.name in experts else plan for plan in plans]


def quantize(spec: str, out: str | Path, recipe: Recipe,
             options: QuantizeOptions | None = None) -> QuantizeReport | None:
    """Quantize ``spec`` into ``out``. Under torchrun (several processes) every rank calibrates its share
    of the windows (qtool.calibration.distributed) and rank 0 alone writes and reports; the other
    ranks return None."""
    from qtool.calibration import distributed

    options = options or QuantizeOptions()
    containers.check_format(options.format)
    device = distributed.start(resolve_device(options.device))
    started = time.perf_counter()
    with resolve(spec, revision=options.revision) as source:
        sizing = None
        if options.target_bpw is not None or options.max_size is not None:
            recipe, sizing = sized(source, recipe, options)
        plans = plan_model(source, recipe, options.format)
        sink_type = containers.sink_class(options.format, {p.scheme for p in plans if not p.keep})
        sink_type.check_layout(plans)     # before reading or calibrating anything, and for --dry-run
        from qtool.calibration.packing import check_importance

        check_importance(stored_plans(plans, sink_type), options.method)
        if source.is_quantized:
            ui.warn(f"{spec} is already quantized; its dequantized weights are quantized again, "
                    "which adds the errors of both steps")
        infos = {info.name: info for info in source.tensors()}
        labels = {p.name: sink_type.stored_scheme(p) for p in plans}
        if distributed.rank() > 0:
            if not options.dry_run:     # the calibration passes, in rank 0's order; rank 0 writes
                calibrate_plans(activation_scales(source, plans, options, device)[0],
                                stored_plans(plans, sink_type), options, device)
            return None
        if options.dry_run:
            sizes = {p.name: sink_type.planned_nbytes(p, source.config) for p in plans}
            report = size_report(source, infos, plans, sizes, output=None, fmt=options.format,
                                 seconds=time.perf_counter() - started, dry_run=True, labels=labels)
            report.sizing = sizing
            return report

        calib_plans = stored_plans(plans, sink_type)
        if options.method != "rtn":
            from qtool.calibration.packing import check_packable

            check_packable(calib_plans, options.method)    # before any calibration work
        # Before any long work: the output must spare the source's files, be free (or --force-able)
        # and not be written by another run; held until the rename (see qtool.atomic).
        run_inputs = [Path(path) for path in (options.stats, options.imatrix, options.calib) if path]     # read too: spared alike
        claim = OutputClaim(out, force=options.force, reads=[*source.local_paths(), *run_inputs])
        try:
            report = _quantize_into(claim, source, recipe, options, device, plans, sink_type, infos, labels, started)
        finally:
            claim.release()
        report.sizing = sizing
        return report


def sized(source: Source, recipe: Recipe, options: QuantizeOptions) -> tuple[Recipe, dict[str, Any]]:
    """--target-bpw / --max-size: the recipe whose per-tensor types fit the size (qtool.sizing), and what was
    chosen, for the report. The plan is also saved as a preset (--save-plan) and goes into the output's
    metadata (GGUF: qtool.plan)."""
    from dataclasses import asdict

    from qtool import sizing

    container = containers.sizing_container(options.format)
    if container is None:
        raise Unsupported(f"--target-bpw / --max-size cannot size --format {options.format}; write GGUF "
                          "(-o MODEL.gguf) or safetensors (compressed-tensors)")
    sink_type = container.writer()

    def fits(plan: TensorPlan) -> bool:
        scheme = get_scheme(plan.scheme)
        if hasattr(scheme, "supports") and not scheme.supports(tuple(plan.shape)):
            return False
        try:
            sink_type.check_layout([plan])
        except BadArgument:
            return False
        return True

    writer = sizing.Writer(family=container.sizing_family, sizes_embeddings=container.sizes_embeddings,
                           packed_nbytes=lambda plan: sink_type.planned_nbytes(plan, source.config),
                           overhead_nbytes=lambda plans: sink_type.overhead_nbytes(source, plans), fits=fits,
                           shared_type_groups=sink_type.shared_type_groups)

    def weights() -> sizing.Weights:
        stats = _statistics(source, options) if options.imatrix is not None or options.stats is not None else None
        importance = {name: linear.mean_square for name, linear in stats.linears.items()} if stats else None
        calib = options.calib or (stats.calib if stats is not None and Path(stats.calib).is_file() else None)
        measured, text = _sensitivity(source, calib, options)
        quantizers = f"; importance {options.imatrix or options.stats}" if stats else ""
        return sizing.Weights(fisher=measured.fisher, importance=importance,
                              described=f"Fisher over {measured.tokens} tokens of {text}{quantizers}")

    recipe, report = sizing.sized_recipe(lambda candidate: plan_model(source, candidate, options.format), source,
                                         recipe, writer, target_bpw=options.target_bpw, max_size=options.max_size,
                                         weights=weights, types=options.size_types)
    text = sizing.recipe_yaml(recipe, f"qtool's plan for {recipe.name} of {source.spec}")
    options.extra["plan"] = text
    if options.save_plan is not None:      # claimed and written now: the output comes after it
        from qtool.atomic import StagedOutput

        staged = StagedOutput(options.save_plan, force=options.force, is_dir=False, reads=source.local_paths())
        try:
            with output_errors(options.save_plan):
                staged.path.write_text(text, encoding="utf-8")
        except BaseException:
            staged.abort()
            raise
        staged.commit()
    return recipe, asdict(report)


# Calibration windows the sizing's sensitivity pass (a forward and a backward pass each) runs at most.
SENSITIVITY_WINDOWS = 16


def _sensitivity(source: Source, calib: str | None, options: QuantizeOptions) -> tuple[Any, str]:
    """The Fisher diagonal of every decoder Linear's weight (qtool.calibration.fisher), over calibration
    windows of ``calib`` (default: --calib's default text), on --device."""
    from qtool.calibration.data import DEFAULT_CALIB, calibration_set
    from qtool.calibration.fisher import measure_sensitivity
    from qtool.sizing import fisher_rows
    from qtool.tokenizer import load_tokenizer

    windows = calibration_set(calib or DEFAULT_CALIB, load_tokenizer(source, "sizing"),
                              samples=min(options.calib_samples, SENSITIVITY_WINDOWS), seqlen=options.calib_seqlen,
                              seed=0)
    with ui.task(f"measuring sensitivities on {windows.samples} windows", total=None):
        measured = measure_sensitivity(source, windows.tokens, device=resolve_device(options.device),
                                       keep=fisher_rows)
    return measured, windows.description


def _statistics(source: Source, options: QuantizeOptions) -> Any:
    """The calibration statistics --stats or --imatrix name (mean squares; X^T X where saved)."""
    if options.imatrix is not None:
        from qtool.calibration.imatrix_file import load_imatrix

        return load_imatrix(options.imatrix, source.config, {info.name: info.shape[-1] for info in source.tensors()
                                                              if len(info.shape) >= 2})
    from qtool.calibration import load_stats

    return load_stats(options.stats)


def _quantize_into(claim: OutputClaim, source: Source, recipe: Recipe, options: QuantizeOptions, device: str,
                   plans: list[TensorPlan], sink_type: Any, infos: dict, labels: dict[str, str],
                   started: float) -> QuantizeReport:
    """Calibrate (if the method asks), quantize and write into the claimed output."""
    out = claim.final
    calib_plans = stored_plans(plans, sink_type)
    # W8A8 may smooth the model first: from here on (GPTQ included), tensors are read through the smoothing.
    source, scales, activations = activation_scales(source, plans, options, device)
    calibrated, folds, calibration = calibrate_plans(source, calib_plans, options, device)
    if folds:   # AWQ: the packed weights belong to the scaled model; its norms are written too
        from qtool.calibration.smoothing import SmoothedSource

        if scales:
            raise BadArgument(f"--method {options.method} rescales the Linear inputs after w8a8's static input "
                              "scales were chosen; use --method gptq or rtn with w8a8 (it smooths with --smooth)")
        source = SmoothedSource(source, folds)
    # Output-side OSErrors (disk full, read-only, no permission) become OutputFailed; reading the
    # source (the loop's iterator) stays outside, so its errors keep their own meaning.
    with output_errors(out):
        sink = sink_type(Path(out), source, plans, force=options.force,
                         options={"max_shard_size": options.max_shard_size, "input_scales": scales,
                                  "gguf_type": recipe.name or recipe.scheme, "output_claim": claim,
                                  **options.extra})
    sizes: dict[str, int] = {}
    try:
        # closing(): on an error the reader thread's last read ends before the source closes
        with (ui.task(f"quantizing {source.description}", total=len(plans)) as progress,
              contextlib.closing(loaded(source, plans, device, frozenset(
                  [p.name for p in plans if p.keep] + list(calibrated)))) as tensors):
            for plan, tensor in tensors:
                with output_errors(out):
                    sizes[plan.name] = sink.add(plan, tensor, packed=calibrated.pop(plan.name, None))
                del tensor
                progress.advance(1, status=plan.name)
        report = size_report(source, infos, plans, sizes, output=str(out), fmt=options.format,
                             seconds=time.perf_counter() - started, dry_run=False, labels=labels)
        report.activations = activations
        report.calibration = calibration
        with output_errors(out):
            final = sink.finish(model_card(source, recipe, report))
    except BaseException:
        sink.abort()        # the staged output is gone before the error reaches the user
        raise
    report.output = str(final)
    return report


def loaded(source: Source, plans: list[TensorPlan], device: str,
           on_host: frozenset[str] = frozenset()) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Each plan with its tensor on ``device`` (the ones named in ``on_host``, which nothing quantizes
    here, stay where they were read: kept embeddings would cross the bus twice for nothing), in order.
    On a GPU the next tensor is read on a helper thread (disk, and for GGUF sources dequantization, on
    the host) while the current one is quantized and written; on the CPU, where the quantizers use
    every core, one at a time."""
    if device == "cpu":
        for plan in plans:
            yield plan, source.load(plan.name)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtool-read") as reader:
        upcoming = reader.submit(source.load, plans[0].name) if plans else None
        for index, plan in enumerate(plans):
            tensor = upcoming.result()
            upcoming = reader.submit(source.load, plans[index + 1].name) if index + 1 < len(plans) else None
            yield plan, tensor if plan.name in on_host else tensor.to(device, non_blocking=True)
            del tensor


def stored_plans(plans: list[TensorPlan], sink_type: Any) -> list[TensorPlan]:
    """The plans as the sink will store them, which is what calibration must fit: a GGUF block type
    whose blocks do not divide a tensor's rows falls back to another type (Q4_K -> Q5_0 for rows of
    576), or to a float type, which is not calibrated (kept)."""
    return [sink_type.stored_plan(plan) for plan in plans]


def calibrate_plans(source: Source, plans: list[TensorPlan], options: QuantizeOptions,
                    device: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Packed tensors from a calibration-aware method, by name ({} for plain round-to-nearest), the
    scalings the method folded into the model (AWQ; name -> operations, for SmoothedSource), and what
    ran for the report (method, tensors, the statistics or text it used; None for round-to-nearest).

    Calibration walks the model block by block while sinks take tensors in file order, so the packed
    results (a few bits per weight) are collected first and handed to the sink as their turn comes.
    """
    if options.method == "rtn":   # the sink's own round-to-nearest; --stats may be for activation scales
        return {}, {}, None
    from qtool.calibration import MethodOptions, calibrated_weights, calibration_set
    from qtool.calibration.methods import MethodReport
    from qtool.calibration.data import DEFAULT_CALIB
    from qtool.tokenizer import load_tokenizer

    from qtool.calibration.smoothing import SmoothedSource

    stats = _statistics(source, options) if options.stats is not None or options.imatrix is not None else None
    calib, samples, seqlen = options.calib or DEFAULT_CALIB, options.calib_samples, options.calib_seqlen
    if stats is not None and isinstance(source, SmoothedSource):
        # W8A8 smoothing changed the Linear inputs the saved X^T X describes: calibrate the smoothed
        # model again, on the text the statistics were made from.
        if options.calib is None and Path(stats.calib).is_file():
            calib = stats.calib
        samples, seqlen, stats = stats.samples, stats.seqlen, None
    calib_set = None
    if stats is None:
        calib_set = calibration_set(calib, load_tokenizer(source, "calibration"), samples=samples, seqlen=seqlen,
                                    seed=0)
    seen = MethodReport()
    method_options = MethodOptions(method=options.method, all_experts=options.all_experts,
                                   expert_min_tokens=options.expert_min_tokens)
    results = calibrated_weights(source, plans, method_options, stats=stats, calib_set=calib_set, device=device,
                                 report=seen)
    packed: dict[str, Any] = {}
    folds: dict[str, Any] = {}
    for item in results:
        packed[item.plan.name] = item.packed
        for name, operations in item.folds.items():
            folds.setdefault(name, []).extend(operations)
    described = {"method": options.method, "tensors": len(packed) - len(seen.fallbacks),
                 "stats": str(options.stats or options.imatrix) if stats is not None else None,
                 "text": str(stats.calib if stats is not None else calib),
                 "samples": stats.samples if stats is not None else samples,
                 "seqlen": stats.seqlen if stats is not None else seqlen}
    if seen.expert_tokens:
        described.update(all_experts=stats.all_experts if stats is not None else options.all_experts,
                         expert_min_tokens=options.expert_min_tokens,
                         expert_tokens=seen.expert_tokens, fallbacks=seen.fallbacks)
    return packed, folds, described


def activation_scales(source: Source, plans: list[TensorPlan], options: QuantizeOptions,
                      device: str) -> tuple[Source, dict[str, Any], ActivationReport | None]:
    """For plans whose inputs the runtime quantizes (W8A8, FP8): the source to quantize (smoothed when the
    plans ask for ``smooth: ALPHA``), the static input scales (from --stats, else a calibration pass without
    X^T X; after smoothing, a second pass over the smoothed model) and what was chosen, for the report."""
    from qtool.calibration.activation import (act_strategy, act_symmetric, input_scales, needs_static_scale,
                                              quantizes_inputs)

    w8a8 = [p for p in plans if quantizes_inputs(p)]
    if not w8a8:
        return source, {}, None
    strategies = sorted({act_strategy(p) for p in w8a8})
    for plan in w8a8:
        act_symmetric(plan)     # refused before any work when it cannot be written
    static = [p for p in w8a8 if needs_static_scale(p)]
    alphas = {float(p.params.get("smooth") or 0.0) for p in w8a8}
    if len(alphas) > 1:
        raise BadArgument(f"smooth: one smoothing alpha per model, got {sorted(alphas)}")
    alpha = alphas.pop()
    downs = {p.params.get("smooth_down") for p in w8a8}
    if len(downs) > 1:
        raise BadArgument(f"smooth_down: one down_proj smoothing alpha per model, got {sorted(map(str, downs))}")
    down = downs.pop()
    down_alpha = float(down) if down is not None else None
    scales: dict[str, Any] = {}
    described = None
    if static or alpha or down_alpha:
        from qtool.calibration import calibrate, load_stats
        from qtool.calibration.data import DEFAULT_CALIB

        calib: str = options.calib or DEFAULT_CALIB
        samples, seqlen = options.calib_samples, options.calib_seqlen
        if options.stats is not None:
            stats = load_stats(options.stats)
            # A second pass (after smoothing) reads the text the statistics were made from.
            if options.calib is None and Path(stats.calib).is_file():
                calib = stats.calib
            samples, seqlen = stats.samples, stats.seqlen
        else:
            stats = calibrate(source, calib=calib, samples=samples, seqlen=seqlen, device=device, want_hessian=False)
        if alpha or down_alpha:
            from qtool.architectures import block_record
            from qtool.calibration.smoothing import SmoothedSource, smoothing_ops

            names = {info.name for info in source.tensors()}
            planned = {p.name for p in w8a8}
            record = block_record(source.config)
            ops = smoothing_ops(names, int(source.config.get("num_hidden_layers") or 0), stats.linears,
                                source.load, alpha, record.smoothing_sites if record is not None else (),
                                selected=planned.__contains__, down_alpha=down_alpha)
            source = SmoothedSource(source, ops)
            if static:
                stats = calibrate(source, calib=calib, samples=samples, seqlen=seqlen, device=device,
                                  want_hessian=False)
        scales = input_scales(static, stats.linears)
        described = f"{stats.calib}, {stats.samples} x {stats.seqlen} tokens"
    rows = [ActivationRow(name[: -len(".weight")], s.method, s.absmax, s.clip, s.scale) for name, s in scales.items()]
    methods = sorted({s.method for s in scales.values()})
    kinds = ",".join(sorted({get_scheme(p.scheme).act_type for p in w8a8}))
    return source, scales, ActivationReport(strategy=",".join(strategies), bits=8, type=kinds, range=",".join(methods) or None,
                                            calibration=described, modules=rows, per_token=len(w8a8) - len(static),
                                            smoothing=alpha or None)


def calibrate_model(spec: str, output: Path, *, calib: str | None, samples: int, seqlen: int, seed: int,
                    device: str, force: bool, revision: str | None = None, all_experts: bool = False) -> dict[str, Any]:
    """`qtool calibrate`: activation statistics of every decoder-block Linear, saved as safetensors."""
    from qtool.calibration import calibrate, calibration_set
    from qtool.calibration.data import DEFAULT_CALIB
    from qtool.tokenizer import load_tokenizer

    device = resolve_device(device)
    with resolve(spec, revision=revision) as source:
        # Claimed before any work (spares the source's files, --force's limits, other runs), and
        # written as a staged file that is renamed into place when the statistics are complete.
        staged = StagedOutput(output, force=force, is_dir=False,
                              reads=[*source.local_paths(), *([Path(calib)] if calib else [])])
        try:
            # Read the tokenizer and the text first: output_errors below is about writing only.
            calib_set = calibration_set(calib or DEFAULT_CALIB, load_tokenizer(source, "calibration"),
                                        samples=samples, seqlen=seqlen, seed=seed)
            with output_errors(output):
                stats = calibrate(source, calib=calib or DEFAULT_CALIB, samples=samples, seqlen=seqlen, seed=seed,
                                  device=device, calib_set=calib_set, output=staged.path, all_experts=all_experts)
            staged.commit()
        except BaseException:
            staged.abort()
            raise
    return {"output": str(output), **stats.summary()}


def model_card(source: Source, recipe: Recipe, report: QuantizeReport) -> str:
    revision = f" (revision `{source.revision}`)" if source.revision else ""
    schemes = ", ".join(f"{row.scheme}: {row.tensors} tensors" for row in report.per_scheme)
    lines = [
        "---",
        "tags: [qtool, quantized]",
        "---",
        f"# Quantized {source.description}",
        "",
        f"Quantized with qtool {__version__} from `{source.spec}`{revision}.",
        "",
        "## Recipe",
        f"- default scheme: `{recipe.scheme}` with parameters `{recipe.params or {}}`",
        f"- per-scheme: {schemes}",
        f"- rules: {len(recipe.rules)}, include: {recipe.include or []}, skip: {recipe.skip or []}",
        "",
        "## Size",
        "| | before | after |",
        "|---|---|---|",
        f"| bytes | {report.bytes_before:,} | {report.bytes_after:,} |",
        f"| bits per weight (quantized tensors) | {report.bits_before_quantized:.2f} | {report.bits_per_weight_quantized:.2f} |",
        f"| bits per weight (whole model) | {report.bits_before_model:.2f} | {report.bits_per_weight_model:.2f} |",
        "",
        f"Compression ratio: {report.compression_ratio:.2f}x",
        "",
    ]
    return "\n".join(lines)


__all__ = ["quantize", "QuantizeOptions", "plan_model", "KEEP"]
