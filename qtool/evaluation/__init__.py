"""``qtool eval --ppl``: perplexity (and KL divergence against a baseline) on any model qtool reads.

``evaluate(...)`` returns an :class:`EvalReport` (dataclasses; JSON is ``dataclasses.asdict``),
``render_eval`` draws it, ``check_gates`` raises QualityGateFailed when a gate was exceeded.
"""
from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from qtool import ui
from qtool.errors import BadArgument, QualityGateFailed
from qtool.evaluation.datasets import DATASETS, EvalText, check_text_file, load_text
from qtool.evaluation.model import LoadedModel, check_runtime, load_causal_lm, resolve_device, torch_dtype
from qtool.evaluation.perplexity import PassResult, check_windows, compare, plan_windows, run_windows, tokenize
from qtool.sources.resolve import locate


@dataclass
class ModelResult:
    model: str                    # the spec as given
    description: str              # where it was read from
    ppl: float
    stderr: float                 # of ppl, llama-perplexity's "+/-"
    tokens: int                   # tokens scored
    windows: int
    tokens_evaluated: int         # tokens the model read (windows * ctx): the basis of tokens_per_s
    tokens_per_s: float           # evaluated tokens per second of model compute (llama.cpp's "prompt eval" rate)
    seconds: float                # model compute time (forward passes + log-softmax)
    load_seconds: float
    parameters: int
    runtime: str                  # "dequantized" or "native"
    # Against --baseline (None without one, and for the baseline itself):
    delta: float | None = None              # ppl - baseline ppl
    delta_pct: float | None = None          # 100 * (ppl / baseline ppl - 1)
    delta_stderr: float | None = None
    ppl_ratio: float | None = None
    ppl_ratio_stderr: float | None = None
    correlation: float | None = None        # Cor(ln PPL, ln PPL(base)) over the scored tokens
    mean_kld: float | None = None           # mean KL(P_base || P_model) per scored token, nats
    kld_stderr: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None     # fraction, llama.cpp's "Same top p" / 100
    top1_stderr: float | None = None
    rms_dp: float | None = None             # RMS change of the right token's probability
    is_baseline: bool = False


@dataclass
class EvalReport:
    text: str                     # the --text path or the dataset
    text_sha256: str
    text_bytes: int
    tokens_in_text: int
    ctx: int
    chunks: int | None
    stride: int | None
    protocol: str
    add_bos: bool
    batch_size: int
    dtype: str
    device: str
    baseline: str | None
    models: list[ModelResult]     # the baseline first when there is one
    max_ppl_increase: float | None = None
    max_kld: float | None = None
    gate_failures: list[str] = field(default_factory=list)

    def result(self, spec: str) -> ModelResult:
        for row in self.models:
            if row.model == spec:
                return row
        raise KeyError(spec)


def _result(spec: str, model: LoadedModel, run: PassResult) -> ModelResult:
    ppl, stderr = run.nll.ppl_and_stderr()
    return ModelResult(model=spec, description=model.description, ppl=ppl, stderr=stderr, tokens=run.nll.count,
                       windows=run.windows, tokens_evaluated=run.tokens_evaluated,
                       tokens_per_s=run.tokens_evaluated / run.seconds if run.seconds else 0.0,
                       seconds=round(run.seconds, 3), load_seconds=round(model.load_seconds, 3),
                       parameters=model.parameters, runtime=model.runtime)


def _baseline_result(spec: str, model: LoadedModel, run: PassResult) -> ModelResult:
    assert run.base_nll is not None
    ppl, stderr = run.base_nll.ppl_and_stderr()
    return ModelResult(model=spec, description=model.description, ppl=ppl, stderr=stderr, tokens=run.base_nll.count,
                       windows=run.windows, tokens_evaluated=run.tokens_evaluated,
                       tokens_per_s=run.tokens_evaluated / run.base_seconds if run.base_seconds else 0.0,
                       seconds=round(run.base_seconds, 3), load_seconds=round(model.load_seconds, 3),
                       parameters=model.parameters, runtime=model.runtime, is_baseline=True)


def _add_comparison(row: ModelResult, run: PassResult) -> None:
    assert run.base_nll is not None and run.divergence is not None
    comparison = compare(run.nll, run.base_nll, run.divergence)
    row.delta, row.delta_pct, row.delta_stderr = comparison.ppl_delta, comparison.delta_pct, comparison.ppl_delta_stderr
    row.ppl_ratio, row.ppl_ratio_stderr = comparison.ppl_ratio, comparison.ppl_ratio_stderr
    row.correlation = comparison.correlation
    row.mean_kld, row.kld_stderr = comparison.mean_kld, comparison.kld_stderr
    row.kld_median, row.kld_p99, row.kld_max = comparison.kld_median, comparison.kld_p99, comparison.kld_max
    row.top1_agreement, row.top1_stderr = comparison.top1_agreement, comparison.top1_stderr
    row.rms_dp = comparison.rms_dp


def gate_failures(rows: list[ModelResult], *, max_ppl_increase: float | None, max_kld: float | None,
                  baseline: str | None) -> list[str]:
    failures = []
    base = next((row for row in rows if row.is_baseline), None)
    for row in rows:
        if row.is_baseline:
            continue
        if max_ppl_increase is not None and row.delta_pct is not None and row.delta_pct > max_ppl_increase:
            failures.append(f"{row.model}: ppl {row.ppl:.4f} is {row.delta_pct:+.2f}% over baseline {baseline} "
                            f"({base.ppl:.4f}), above --max-ppl-increase {max_ppl_increase:g}")
        if max_kld is not None and row.mean_kld is not None and row.mean_kld > max_kld:
            failures.append(f"{row.model}: mean KL divergence {row.mean_kld:.5f} from baseline {baseline} "
                            f"is above --max-kld {max_kld:g}")
    return failures


def check_gates(report: EvalReport) -> None:
    """Raise QualityGateFailed (exit code 8) naming every exceeded gate, in one line."""
    if report.gate_failures:
        raise QualityGateFailed("; ".join(report.gate_failures))


def _protocol(ctx: int, stride: int | None) -> str:
    if stride is None:
        return f"llama.cpp: windows of {ctx} tokens, second half scored ({ctx - 1 - ctx // 2} tokens each)"
    return f"llama.cpp --ppl-stride: windows of {ctx} tokens every {stride}, last {stride} scored"


def _free(model: LoadedModel | None) -> None:
    if model is None:
        return
    device = model.device
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_options(*, text_file: Path | None = None, dataset: str = "wikitext2", ctx: int = 512,
                  chunks: int | None = None, stride: int | None = None, baseline: str | None = None,
                  batch_size: int = 1, dtype: str = "fp32", runtime: str = "dequantized",
                  max_ppl_increase: float | None = None, max_kld: float | None = None) -> None:
    """The evaluation options that need no model: checked before any download, quantization or load
    (``quantize --eval`` calls this before quantizing)."""
    for gate, limit, unit in (("--max-ppl-increase", max_ppl_increase, "percent, e.g. 2"),
                              ("--max-kld", max_kld, "nats, e.g. 0.01")):
        if limit is None:
            continue
        if baseline is None:
            raise BadArgument(f"{gate} compares against a reference: pass --baseline MODEL")
        if not math.isfinite(limit) or limit < 0:
            raise BadArgument(f"{gate} {limit}: give the largest acceptable damage, a number of at least 0 ({unit})")
    if batch_size < 1:
        raise BadArgument(f"--batch-size {batch_size}: must be at least 1")
    check_runtime(runtime)
    torch_dtype(dtype)
    check_windows(ctx, chunks, stride)
    if text_file is not None:
        check_text_file(text_file)
    elif dataset not in DATASETS:
        raise BadArgument(f"--dataset {dataset}: choose one of {', '.join(DATASETS)}, or pass --text FILE")


def evaluate(models: list[str], *, text_file: Path | None = None, dataset: str = "wikitext2", ctx: int = 512,
             chunks: int | None = None, stride: int | None = None, baseline: str | None = None,
             device: str = "auto", batch_size: int = 1, dtype: str = "fp32",
             max_ppl_increase: float | None = None, max_kld: float | None = None,
             runtime: str = "dequantized", text: EvalText | None = None,
             gpu_memory: int | None = None) -> EvalReport:
    """Perplexity of each model over the text, llama-perplexity's protocol, and the gates' verdict.

    With ``baseline``, each model is run side by side with the baseline on the same windows (both
    held in memory, one model at a time), which gives the KL divergence and top-1 agreement.
    ``text`` (an already loaded EvalText) overrides ``text_file`` / ``dataset``.
    """
    if not models:
        raise BadArgument("give at least one MODEL to evaluate")
    check_options(text_file=None if text is not None else text_file, dataset=dataset, ctx=ctx, chunks=chunks,
                  stride=stride, baseline=baseline, batch_size=batch_size, dtype=dtype, runtime=runtime,
                  max_ppl_increase=max_ppl_increase, max_kld=max_kld)
    for spec in [*models, *([baseline] if baseline else [])]:
        if isinstance(spec, str):
            locate(spec)      # a wrong path is refused before any model is scored
    compute_device = resolve_device(device)
    eval_text = text or load_text(text_file, dataset)

    base_model = load_causal_lm(baseline, dtype=dtype, device=str(compute_device),
                                gpu_memory=gpu_memory) if baseline else None
    base_tokens = tokenize(base_model, eval_text.text) if base_model is not None else None
    rows: list[ModelResult] = []
    base_row: ModelResult | None = None
    report_tokens = base_tokens
    add_bos = base_model.add_bos if base_model is not None else False
    try:
        for spec in models:
            if baseline is not None and spec == baseline:
                continue
            model = load_causal_lm(spec, dtype=dtype, device=str(compute_device), runtime=runtime,
                                   gpu_memory=gpu_memory)
            try:
                tokens = tokenize(model, eval_text.text)
                if base_tokens is not None and not torch.equal(tokens, base_tokens):
                    raise BadArgument(f"{spec} and --baseline {baseline} tokenize the text differently; "
                                      "KL divergence needs models with the same tokenizer")
                report_tokens, add_bos = tokens, model.add_bos
                plan = plan_windows(len(tokens), ctx=ctx, chunks=chunks, stride=stride,
                                    bos_token_id=model.bos_token_id if model.add_bos else None)
                run = run_windows(model, tokens, plan, batch_size=batch_size, baseline=base_model, label=spec)
                row = _result(spec, model, run)
                if base_model is not None:
                    if base_row is None:
                        base_row = _baseline_result(baseline, base_model, run)
                    _add_comparison(row, run)
                rows.append(row)
                ui.log(f"{spec}: ppl {row.ppl:.4f} +/- {row.stderr:.4f} over {row.tokens} tokens, "
                       f"{row.tokens_per_s:.0f} tokens/s")
            finally:
                _free(model)
        if base_model is not None and base_row is None:
            # Only the baseline was asked for: evaluate it alone.
            plan = plan_windows(len(base_tokens), ctx=ctx, chunks=chunks, stride=stride,
                                bos_token_id=base_model.bos_token_id if base_model.add_bos else None)
            run = run_windows(base_model, base_tokens, plan, batch_size=batch_size, label=baseline)
            base_row = _result(baseline, base_model, run)
            base_row.is_baseline = True
    finally:
        _free(base_model)
    if base_row is not None:
        rows.insert(0, base_row)
    report = EvalReport(
        text=eval_text.label, text_sha256=eval_text.sha256, text_bytes=eval_text.nbytes,
        tokens_in_text=len(report_tokens) if report_tokens is not None else 0, ctx=ctx, chunks=chunks,
        stride=stride, protocol=_protocol(ctx, stride), add_bos=add_bos, batch_size=batch_size, dtype=dtype,
        device=str(compute_device), baseline=baseline, models=rows, max_ppl_increase=max_ppl_increase,
        max_kld=max_kld)
    report.gate_failures = gate_failures(rows, max_ppl_increase=max_ppl_increase, max_kld=max_kld,
                                         baseline=baseline)
    return report


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def render_eval(report: EvalReport, console: Console) -> None:
    """One row per model: ppl +/- stderr, delta, KL divergence, top-1 agreement, speed."""
    with_baseline = report.baseline is not None
    table = Table(title=f"perplexity on {report.text}", caption=report.protocol)
    table.add_column("model", overflow="fold", min_width=16)
    table.add_column("ppl", justify="right", no_wrap=True)
    if with_baseline:
        for col in ("Δ ppl", "Δ %", "mean KLD", "top-1 same"):
            table.add_column(col, justify="right", no_wrap=True)
    for col in ("tokens", "tokens/s"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in report.models:
        name = f"{row.model} (baseline)" if row.is_baseline else row.model
        cells = [name, f"{row.ppl:.4f} ± {row.stderr:.4f}"]
        if with_baseline:
            if row.is_baseline:
                cells += ["", "", "", ""]
            else:
                cells += [_fmt(row.delta, '+.4f'),
                          _fmt(row.delta_pct, '+.2f', '%'),
                          f"{_fmt(row.mean_kld, '.5f')} ± {_fmt(row.kld_stderr, '.5f')}",
                          _fmt(None if row.top1_agreement is None else 100 * row.top1_agreement, '.2f', '%')]
        cells += [f"{row.tokens:,}", f"{row.tokens_per_s:,.0f}"]
        table.add_row(*cells)
    console.print(table)
    console.print(f"{report.dtype} on {report.device}, batch {report.batch_size}, BOS per window: "
                  f"{'yes' if report.add_bos else 'no'}", highlight=False)
    for failure in report.gate_failures:
        console.print(f"gate failed: {failure}", style="red", highlight=False, markup=False)


__all__ = ["check_options", "evaluate", "render_eval", "check_gates", "EvalReport", "ModelResult", "gate_failures"]
