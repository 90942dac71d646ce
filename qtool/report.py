"""Size reports for quantize runs: dataclasses (JSON is ``dataclasses.asdict``) and rich tables."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from qtool.architectures import merged_expert_name
from qtool.plan import TensorPlan
from qtool.sources.base import Source, TensorInfo


@dataclass
class SchemeRow:
    scheme: str
    tensors: int
    parameters: int
    bytes_before: int
    bytes_after: int
    bits_per_weight: float


@dataclass
class TensorRow:
    name: str
    shape: list[int]
    scheme: str
    bytes_before: int
    bytes_after: int


@dataclass
class ActivationRow:
    module: str
    range: str            # how the clip was chosen: minmax | percentile | mse
    absmax: float         # largest |x| seen in calibration
    clip: float           # |x| mapped to the largest int level
    scale: float


@dataclass
class ActivationReport:
    """What a W8A8 output does with the Linear inputs."""

    strategy: str                 # tensor (static scales) | token (dynamic, per token)
    bits: int
    range: str | None             # minmax | percentile | mse (static only)
    calibration: str | None       # where the static scales came from
    modules: list[ActivationRow] = field(default_factory=list)    # the static ones
    per_token: int = 0            # modules quantizing their inputs per token, dynamically
    smoothing: float | None = None    # SmoothQuant alpha folded into norms / up_proj (None: not smoothed)
    type: str = "int8"            # what the inputs become: int8, fp8, nvfp4 (comma separated when several)


@dataclass
class QuantizeReport:
    source: str
    output: str | None
    format: str
    dry_run: bool
    parameters: int
    parameters_quantized: int
    bytes_before: int
    bytes_after: int
    bits_before_quantized: float      # bits per weight of the quantized tensors, as the source stores them
    bits_per_weight_quantized: float  # ... after quantization
    bits_before_model: float
    bits_per_weight_model: float
    compression_ratio: float
    seconds: float
    per_scheme: list[SchemeRow]
    tensors: list[TensorRow]
    # A mixture of experts: its expert matrices apart (scheme: theirs, comma separated); None otherwise.
    experts: SchemeRow | None = None
    evaluation: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    activations: ActivationReport | None = None
    sizing: dict[str, Any] | None = None      # --target-bpw / --max-size: the budget and each tensor's type
    warnings: list[str] = field(default_factory=list)


def _bits(nbytes: int, params: int) -> float:
    return 8.0 * nbytes / params if params else 0.0


def size_report(source: Source, infos: dict[str, TensorInfo], plans: list[TensorPlan], sizes: dict[str, int],
                *, output: str | None, fmt: str, seconds: float, dry_run: bool,
                labels: dict[str, str] | None = None) -> QuantizeReport:
    """``labels`` names the scheme each tensor was really stored with, where the sink fell back."""
    labels = labels or {}
    rows = []
    by_scheme: dict[str, list[TensorRow]] = defaultdict(list)
    params_of = {}
    for plan in plans:
        info = infos[plan.name]
        scheme = labels.get(plan.name, plan.scheme)
        row = TensorRow(plan.name, list(info.shape), scheme, info.stored_bytes, sizes[plan.name])
        rows.append(row)
        by_scheme[scheme].append(row)
        params_of[plan.name] = math.prod(info.shape)
    per_scheme = []
    for scheme, scheme_rows in sorted(by_scheme.items()):
        params = sum(params_of[r.name] for r in scheme_rows)
        after = sum(r.bytes_after for r in scheme_rows)
        per_scheme.append(SchemeRow(scheme, len(scheme_rows), params, sum(r.bytes_before for r in scheme_rows),
                                    after, _bits(after, params)))
    # The experts' matrices (gpt-oss's expert biases are kept like every bias, and counted with them).
    expert_rows = [r for r in rows if merged_expert_name(r.name) is not None and r.name.endswith(".weight")]
    experts = None
    if expert_rows:
        params_e = sum(params_of[r.name] for r in expert_rows)
        after_e = sum(r.bytes_after for r in expert_rows)
        experts = SchemeRow(", ".join(sorted({r.scheme for r in expert_rows})), len(expert_rows), params_e,
                            sum(r.bytes_before for r in expert_rows), after_e, _bits(after_e, params_e))
    quantized = [r for r in rows if r.scheme != "keep"]
    params_q = sum(params_of[r.name] for r in quantized)
    params = sum(params_of.values())
    before, after = sum(r.bytes_before for r in rows), sum(r.bytes_after for r in rows)
    return QuantizeReport(
        source=source.description, output=output, format=fmt, dry_run=dry_run,
        parameters=params, parameters_quantized=params_q, bytes_before=before, bytes_after=after,
        bits_before_quantized=_bits(sum(r.bytes_before for r in quantized), params_q),
        bits_per_weight_quantized=_bits(sum(r.bytes_after for r in quantized), params_q),
        bits_before_model=_bits(before, params), bits_per_weight_model=_bits(after, params),
        compression_ratio=before / after if after else 0.0, seconds=round(seconds, 3),
        per_scheme=per_scheme, tensors=rows, experts=experts)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def render_quantize(report: QuantizeReport, console: Console, *, show_tensors: bool = False) -> None:
    if show_tensors or report.dry_run:
        plan = Table(title="plan" if report.dry_run else "tensors")
        for col in ("tensor", "shape", "scheme", "before", "after"):
            plan.add_column(col, justify="right" if col in ("before", "after") else "left")
        for row in report.tensors:
            plan.add_row(row.name, "x".join(map(str, row.shape)), row.scheme, human_bytes(row.bytes_before),
                         human_bytes(row.bytes_after))
        console.print(plan)
    schemes = Table(title="per scheme")
    for col in ("scheme", "tensors", "parameters", "before", "after", "bits/weight"):
        schemes.add_column(col, justify="left" if col == "scheme" else "right")
    for row in report.per_scheme:
        schemes.add_row(row.scheme, str(row.tensors), f"{row.parameters:,}", human_bytes(row.bytes_before),
                        human_bytes(row.bytes_after), f"{row.bits_per_weight:.2f}")
    console.print(schemes)
    summary = Table(title=("dry run: nothing written" if report.dry_run else f"wrote {report.output}"),
                    show_header=True)
    summary.add_column("")
    summary.add_column("before", justify="right")
    summary.add_column("after", justify="right")
    summary.add_row("size", human_bytes(report.bytes_before), human_bytes(report.bytes_after))
    summary.add_row("bits/weight, quantized tensors", f"{report.bits_before_quantized:.2f}",
                    f"{report.bits_per_weight_quantized:.2f}")
    summary.add_row("bits/weight, whole model", f"{report.bits_before_model:.2f}", f"{report.bits_per_weight_model:.2f}")
    summary.add_row("parameters: all, quantized", f"{report.parameters:,}", f"{report.parameters_quantized:,}")
    if report.experts is not None:
        experts = report.experts
        summary.add_row(f"experts: {experts.tensors} matrices, {experts.parameters:,} parameters ({experts.scheme})",
                        human_bytes(experts.bytes_before), human_bytes(experts.bytes_after))
        summary.add_row("bits/weight, experts", f"{_bits(experts.bytes_before, experts.parameters):.2f}",
                        f"{experts.bits_per_weight:.2f}")
    console.print(summary)
    console.print(f"compression {report.compression_ratio:.2f}x in {report.seconds:.1f} s", highlight=False)
    if report.sizing is not None:
        sizing = report.sizing
        asked = (f"{sizing['target_bpw']:g} bits per weight" if sizing["target_bpw"] is not None
                 else f"at most {human_bytes(sizing['max_size'])}")
        console.print(f"sized to {asked}: {len(sizing['choices'])} tensors typed by measured damage "
                      f"({human_bytes(sizing['allocated_bytes'])} of a {human_bytes(sizing['budget_bytes'])} budget; "
                      f"{sizing['measured']})", highlight=False)
    if report.calibration is not None:
        calibration = report.calibration
        origin = f"statistics {calibration['stats']} of " if calibration["stats"] else ""
        # A legacy llama.cpp imatrix stores its chunk count, not the chunk's length (seqlen 0).
        windows = (f"{calibration['samples']} x {calibration['seqlen']} tokens" if calibration["seqlen"]
                   else f"{calibration['samples']} chunks")
        console.print(f"{calibration['method']}: {calibration['tensors']} tensors calibrated on {origin}"
                      f"{calibration['text']} ({windows})", highlight=False)
        if calibration.get("expert_tokens"):
            render_experts(calibration["expert_tokens"], console, all_experts=calibration["all_experts"],
                           fallbacks=calibration["fallbacks"], min_tokens=calibration["expert_min_tokens"],
                           show_experts=show_tensors)
    if report.activations is not None:
        render_activations(report.activations, console, show_modules=show_tensors)


def render_experts(expert_tokens: dict[str, list[int]], console: Console, *, all_experts: bool,
                   fallbacks: dict[str, int] | None = None, min_tokens: int | None = None,
                   show_experts: bool = False) -> None:
    """Calibration of a mixture of experts: the tokens the router sent each expert (one line, or a row
    per block with ``show_experts``), and the expert weights rounded to nearest for lack of them."""
    counts = sorted(count for per_expert in expert_tokens.values() for count in per_expert)
    unrouted = sum(1 for count in counts if count == 0)
    how = "statistics from every token (--all-experts)" if all_experts else "statistics from the routed tokens"
    console.print(f"experts: {len(counts)} in {len(expert_tokens)} blocks; tokens routed to each: min {counts[0]}, "
                  f"median {counts[len(counts) // 2]}, max {counts[-1]}; {unrouted} never routed; {how}",
                  highlight=False)
    if show_experts:
        table = Table(title="calibration tokens routed to each expert")
        table.add_column("experts")
        table.add_column("tokens per expert")
        for name, per_expert in expert_tokens.items():
            table.add_row(name, " ".join(str(count) for count in per_expert))
        console.print(table)
    if fallbacks:
        experts: dict[str, int] = {}    # model.layers.0.mlp.experts.3 -> its tokens (its matrices' fewest)
        for name, tokens in fallbacks.items():
            expert = name.rsplit(".", 2)[0]
            experts[expert] = min(tokens, experts.get(expert, tokens))
        listed = ", ".join(f"{expert} ({tokens} tokens)" for expert, tokens in list(experts.items())[:8])
        more = f" and {len(experts) - 8} more" if len(experts) > 8 else ""
        console.print(f"{len(experts)} expert(s) had fewer than {min_tokens} calibration tokens; their {len(fallbacks)} "
                      f"weights were rounded to nearest: {listed}{more} (--all-experts calibrates every expert; "
                      "--expert-min-tokens sets the limit)", style="yellow", highlight=False)


def render_activations(activations: ActivationReport, console: Console, *, show_modules: bool = False) -> None:
    if activations.smoothing:
        console.print(f"inputs smoothed into the weights (SmoothQuant alpha {activations.smoothing:g})", highlight=False)
    if activations.strategy == "token":
        console.print(f"inputs: {activations.type} per token, dynamic (no stored scales)", highlight=False)
        return
    modules = activations.modules
    ratios = sorted(row.clip / row.absmax for row in modules if row.absmax > 0)
    clipped = sum(1 for r in ratios if r < 1)
    line = (f"inputs: {activations.type} per tensor, static scales ({activations.range}) of {len(modules)} "
            f"modules from {activations.calibration}")
    if activations.per_token:
        line += f"; {activations.per_token} modules per token (dynamic)"
    if ratios:
        line += f"; clip / absmax {ratios[0]:.3f}..{ratios[-1]:.3f} (median {ratios[len(ratios) // 2]:.3f}), {clipped} clipped"
    console.print(line, highlight=False)
    if show_modules:
        table = Table(title="input scales")
        for col in ("module", "range", "absmax", "clip", "scale"):
            table.add_column(col, justify="left" if col in ("module", "range") else "right")
        for row in modules:
            table.add_row(row.module, row.range, f"{row.absmax:.4g}", f"{row.clip:.4g}", f"{row.scale:.4g}")
        console.print(table)
