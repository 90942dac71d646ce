"""The `qtool` command: parse options, call the library, render the result, map errors to exit codes.

No numerics and no format code here.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from qtool import __version__, containers, signals, ui
from qtool.redact import redact_text
from qtool.errors import (EXIT_INTERRUPTED, EXIT_INTERRUPTED_COMPLETE, EXIT_TERMINATED, BadArgument,
                          QtoolError, QualityGateFailed, Terminated)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization of language models: quantize, inspect, eval.")
# Piped output (CI logs, `make demo | tee`) gets wide tables instead of rich's 80-column default.
stdout = ui.SafeConsole() if sys.stdout.isatty() else ui.SafeConsole(width=160)

# Options every command takes.
JsonOpt = typer.Option(False, "--json", help="Print exactly one JSON document on stdout.")
AllExpertsOpt = typer.Option(False, "--all-experts", help="Mixtures of experts: every calibration token through every expert for the statistics (the outputs still follow the router).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress or log lines.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks for errors.")
DeviceOpt = typer.Option("cpu", "--device", help="cpu, cuda or auto (cuda when available).")


_reported: list[int] = []   # exit codes _fail has already told the user about


def _fail(as_json: bool, exit_code: int, kind: str, message: str, report: Any = None) -> typer.Exit:
    """Say what went wrong (one line on stderr; with --json also the one document on stdout, which is
    ``report`` with the error added when there is one)."""
    _reported.append(exit_code)
    message = ui.message_line(redact_text(message))
    ui.stderr.print(f"error: {message}", style="red", soft_wrap=True)
    if as_json:
        document = dataclasses.asdict(report) if report is not None else {}
        document["error"] = {"exit_code": exit_code, "type": kind, "message": message}
        _emit_json(document)
    return typer.Exit(exit_code)


def _run(debug: bool, quiet: bool, work: Callable[[], Any], as_json: bool = False) -> Any:
    ui.configure(quiet=quiet)
    signals.install()
    try:
        return work()
    except typer.Exit:   # a command's own way out, already reported
        raise
    except QtoolError as exc:
        if debug:
            traceback.print_exc()
        raise _fail(as_json, exc.exit_code, type(exc).__name__, exc.message) from None
    except KeyboardInterrupt as exc:
        raise _interrupted(as_json, exc) from None
    except MemoryError:
        if debug:
            traceback.print_exc()
        raise _fail(as_json, 1, "OutOfMemory",
                    "out of memory; try a smaller --max-shard-size or --device cuda") from None
    except Exception as exc:  # a bug of ours: say so in one line, traceback only with --debug
        raise _internal_error(as_json, debug, exc) from None


def _internal_error(as_json: bool, debug: bool, exc: Exception) -> typer.Exit:
    if debug:
        traceback.print_exc()
    first = str(exc).splitlines()[0] if str(exc) else ""
    return _fail(as_json, 1, "InternalError", f"internal error ({type(exc).__name__}: {first}); "
                                              "rerun with --debug and report it")


def _interrupted(as_json: bool, exc: BaseException) -> typer.Exit:
    """Ctrl-C or SIGTERM: whether the output is already whole decides the code and the message."""
    from qtool import atomic

    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    if atomic.committed_outputs:
        done = ", ".join(str(path) for path in atomic.committed_outputs)
        return _fail(as_json, EXIT_INTERRUPTED_COMPLETE, "InterruptedComplete",
                     f"{what} after the output was complete: {done} is whole; the report was not printed")
    if isinstance(exc, Terminated):
        return _fail(as_json, EXIT_TERMINATED, "Terminated", f"{what}; nothing was written")
    return _fail(as_json, EXIT_INTERRUPTED, "Interrupted", f"{what}; nothing was written")


def _show(as_json: bool, report: Any, render: Callable[[], Any]) -> None:
    """The report as the one JSON document, or drawn for people."""
    if as_json:
        _emit_json(report)
    else:
        render()


def _finite(value: Any) -> Any:
    """The payload with NaN and infinities as null: strict JSON parsers reject those literals."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _emit_json(report: Any) -> None:
    payload = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report
    sys.stdout.write(json.dumps(_finite(payload), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _parse_size(text: str, option: str = "--max-shard-size") -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    try:
        amount = float(number) * units[value[len(number):]]
    except (KeyError, ValueError):
        raise BadArgument(f"{option} {text!r}: use a size such as 5GB, 500MB or 2GiB") from None
    if not math.isfinite(amount):   # inf, nan, 1e400: int() of them fails
        raise BadArgument(f"{option} {text!r}: use a finite size such as 5GB, 500MB or 2GiB")
    size = int(amount)
    if size <= 0:
        raise BadArgument(f"{option} {text!r} must be positive")
    return size


# Windows a --target-bpw / --max-size output is scored on when --eval is implied.
SIZED_EVAL_WINDOWS = 40


def version_callback(value: bool) -> None:
    if value:
        stdout.print(f"qtool {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Show the version and exit.")) -> None:
    """qtool: shrink a checkpoint to fit your GPU, laptop or phone, and know what it cost."""


@app.command()
def inspect(
    path: str = typer.Argument(..., help="A .gguf or .safetensors file, a model folder, a Hub id[@revision] or smollm2-135m."),
    tensors: Optional[str] = typer.Option(None, "--tensors", help="Only tensors whose name matches this glob."),
    no_metadata: bool = typer.Option(False, "--no-metadata", help="Leave out the metadata table."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Show what is in a model file: metadata, tensors, types, sizes."""
    def work() -> None:
        from qtool.inspect import inspect_model, render_inspect

        report = inspect_model(path, tensors=tensors, revision=revision)
        _show(as_json, report, lambda: render_inspect(report, stdout, metadata=not no_metadata))

    _run(debug, quiet, work, as_json)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="Hub id[@revision], local folder, .safetensors or .gguf file, or smollm2-135m."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (safetensors) or .gguf file."),
    bits: Optional[int] = typer.Option(None, "--bits", help="4 or 8: picks the default scheme (nf4 / int8-sym, or Q4_K_M / Q8_0 for GGUF)."),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="Encoding of a safetensors output, e.g. nf4, int4-sym or w8a8 (an unknown name lists them all)."),
    fmt: Optional[str] = typer.Option(None, "--format", help=containers.format_help()),
    gguf_type: Optional[str] = typer.Option(None, "--type", help="GGUF type or llama-quantize mix, e.g. Q8_0, Q4_K or Q4_K_M (an unknown name lists them all)."),
    block_size: Optional[int] = typer.Option(None, "--block-size", help="NF4/FP4 block size (default 64)."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="int4 group size (default 128)."),
    no_double_quant: bool = typer.Option(False, "--no-double-quant", help="NF4/FP4: keep absmax in fp32."),
    include: List[str] = typer.Option([], "--include", help="Also quantize tensors matching this glob (repeatable)."),
    skip: List[str] = typer.Option([], "--skip", help="Keep tensors matching this glob as they are (repeatable)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A preset YAML file (see configs/)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and sizes; write nothing."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    method: str = typer.Option("rtn", "--method", help="rtn, or a calibration-aware method: gptq, imatrix, awq (awq+imatrix, awq+gptq: AWQ scaling, then that method)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text: FILE or wikitext2-train."),
    calib_samples: int = typer.Option(128, "--calib-samples"),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen"),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Statistics saved by `qtool calibrate`."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="A llama.cpp importance matrix (llama-imatrix's .gguf or .dat): --method imatrix from it."),
    all_experts: bool = AllExpertsOpt,
    expert_min_tokens: int = typer.Option(64, "--expert-min-tokens", help="Mixtures of experts: an expert with fewer calibration tokens is rounded to nearest (named in the report)."),
    act_range: Optional[str] = typer.Option(None, "--act-range", help="w8a8, fp8 static: input scale from minmax (default), percentile (p99.99) or mse of |x| (int8 only)."),
    act_strategy: Optional[str] = typer.Option(None, "--act-strategy", help="w8a8: tensor (static scales, calibrated; default) or token (dynamic); fp8: token (default) or tensor."),
    act_asymmetric: Optional[bool] = typer.Option(None, "--act-asymmetric/--act-symmetric", help="w8a8 with --act-strategy token: per-token zero points (configs/w8a8-token.yaml) or inputs around zero."),
    smooth_down: Optional[float] = typer.Option(None, "--smooth-down", help="w8a8: SmoothQuant alpha of the up_proj -> down_proj site alone (default: --smooth; configs/w8a8-token.yaml: 0.5)."),
    smooth: Optional[float] = typer.Option(None, "--smooth", help="w8a8, fp8: SmoothQuant alpha, 0 to 1 (0: off; configs/w8a8.yaml: 0.8)."),
    evaluate_after: Optional[bool] = typer.Option(None, "--eval/--no-eval", help="Measure perplexity and KL divergence of the output against the source (default: with --target-bpw / --max-size, 40 windows)."),
    text: Optional[Path] = typer.Option(None, "--text", help="With --eval: text file to score."),
    ctx: int = typer.Option(512, "--ctx", help="With --eval: window length in tokens."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="With --eval: number of windows."),
    show_tensors: bool = typer.Option(False, "--show-tensors", help="List every tensor in the report."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Choose each tensor's type (GGUF, or compressed-tensors for safetensors) from its measured damage to average this many bits per quantized weight (with --calib; --imatrix / --stats quantize with that matrix)."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Choose each tensor's type (GGUF, or compressed-tensors for safetensors) from its measured damage so that the output fits this size, e.g. 2.5GB."),
    save_plan: Optional[Path] = typer.Option(None, "--save-plan", help="With --target-bpw / --max-size: write the chosen plan as a preset YAML (for --config)."),
    size_types: Optional[str] = typer.Option(None, "--types", help="With --target-bpw / --max-size: the only types to choose from, comma separated (e.g. Q4_K,Q5_K,Q6_K,Q8_0)."),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Quantize a checkpoint and write it as safetensors (transformers, vLLM) or GGUF (llama.cpp)."""
    def work() -> Any:
        from qtool.recipes import choose_format, recipe_from_options
        from qtool.pipeline import QuantizeOptions, quantize as run_quantize
        from qtool.report import render_quantize

        if output is None and not dry_run:
            raise BadArgument("missing -o/--output: where to write the quantized model")
        # Every option is checked before any download, read or write.
        from qtool.recipes import check_quantize_options

        sized = target_bpw is not None or max_size is not None
        # A sized output is scored by default (it was made to trade quality for size): 40 windows unless
        # --chunks says otherwise; the default text missing then only warns.
        implied_eval = sized and evaluate_after is None and not dry_run
        scored = bool(evaluate_after) or implied_eval
        windows = chunks if chunks is not None or not implied_eval else SIZED_EVAL_WINDOWS
        if target_bpw is not None and max_size is not None:
            raise BadArgument("--target-bpw and --max-size both set the size; pass one")
        if (save_plan is not None or size_types is not None) and not sized:
            raise BadArgument("--save-plan and --types are for the plan --target-bpw / --max-size choose; add one of them")
        chosen_method = check_quantize_options(output=output, method=method, calib_samples=calib_samples,
                                               calib_seqlen=calib_seqlen, all_experts=all_experts,
                                               expert_min_tokens=expert_min_tokens, stats=stats, imatrix=imatrix,
                                               sized=sized)
        if scored:
            from qtool.evaluation import check_options as check_eval_options

            check_eval_options(text_file=text, ctx=ctx, chunks=windows, baseline=model)
        elif text is not None or chunks is not None:
            raise BadArgument("--text and --chunks set what --eval scores; add --eval")
        out_format = choose_format(fmt, gguf_type, output, config)
        if sized:
            from qtool.recipes import sized_recipe_base

            recipe = sized_recipe_base(fmt=out_format, config=config, include=include, skip=skip,
                                       gguf_type=gguf_type, scheme=scheme, bits=bits)
        else:
            recipe = recipe_from_options(fmt=out_format, bits=bits, scheme=scheme, gguf_type=gguf_type,
                                         config=config, block_size=block_size, group_size=group_size,
                                         double_quant=False if no_double_quant else None, include=include,
                                         skip=skip, act_range=act_range, act_strategy=act_strategy, smooth=smooth,
                                         act_asymmetric=act_asymmetric, smooth_down=smooth_down)
        options = QuantizeOptions(format=out_format, force=force, dry_run=dry_run,
                                  max_shard_size=_parse_size(max_shard_size), device=device, revision=revision,
                                  method=chosen_method, calib=calib, calib_samples=calib_samples,
                                  calib_seqlen=calib_seqlen, stats=stats, imatrix=imatrix, all_experts=all_experts,
                                  expert_min_tokens=expert_min_tokens, target_bpw=target_bpw,
                                  max_size=_parse_size(max_size, "--max-size") if max_size else None,
                                  save_plan=save_plan,
                                  size_types=[t.strip() for t in size_types.split(",") if t.strip()] if size_types else None)
        report = run_quantize(model, output or Path("."), recipe, options)
        if report is None:      # a rank of a torchrun calibration other than 0: rank 0 reports
            return
        quality = None
        if scored and not dry_run:
            from qtool.errors import NetworkError, NotFound
            from qtool.evaluation import evaluate, render_eval

            try:
                quality = evaluate([report.output], text_file=text, ctx=ctx, chunks=windows, baseline=model,
                                   device=device)
            except (NetworkError, NotFound) as missing:
                if not implied_eval:
                    raise
                ui.warn(f"the output was not scored: {missing.message} (--no-eval skips the scoring)")
        if quality is not None:
            report.evaluation = dataclasses.asdict(quality)
            _show(as_json, report, lambda: (render_quantize(report, stdout, show_tensors=show_tensors),
                                            render_eval(quality, stdout)))
        else:
            _show(as_json, report, lambda: render_quantize(report, stdout, show_tensors=show_tensors))

    _run(debug, quiet, work, as_json)


@app.command(name="eval")
def eval_command(
    models: List[str] = typer.Argument(..., help="Models to score: anything quantize reads, or its outputs."),
    ppl: bool = typer.Option(True, "--ppl/--no-ppl", help="Perplexity (the default measure)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Score this text file instead of --dataset."),
    dataset: str = typer.Option("wikitext2", "--dataset", help="wikitext2 (test split, from the Hub cache)."),
    ctx: int = typer.Option(512, "--ctx", help="Window length in tokens."),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="Score at most this many windows."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Sliding windows moved by this many tokens."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Compare with this model: ppl delta, KL divergence, top-1 agreement."),
    max_ppl_increase: Optional[float] = typer.Option(None, "--max-ppl-increase", help="Fail (exit 8) when ppl rises more than this percent over --baseline."),
    max_kld: Optional[float] = typer.Option(None, "--max-kld", help="Fail (exit 8) when mean KL divergence exceeds this."),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    dtype: str = typer.Option("fp32", "--dtype", help="Compute dtype: fp32 or bf16."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto; cuda spreads a model one GPU cannot hold over all visible GPUs."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Weights per GPU when spreading, e.g. 70GiB (default: 90% of free memory)."),
    runtime: str = typer.Option("dequantized", "--runtime", help="dequantized (weights decoded by qtool, W8A8 inputs quantized as the file says; any format) or native (transformers' own bitsandbytes / compressed-tensors modules; local folders)."),
    as_json: bool = JsonOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Measure perplexity (and damage against a baseline) on WikiText-2 or your own text."""
    def work() -> Any:
        from qtool.evaluation import check_gates, evaluate, render_eval

        if not ppl:
            raise BadArgument("--no-ppl leaves nothing to measure; perplexity is the only measure so far")
        if (max_ppl_increase is not None or max_kld is not None) and baseline is None:
            raise BadArgument("--max-ppl-increase and --max-kld need --baseline MODEL to compare with")
        report = evaluate(list(models), text_file=text, dataset=dataset, ctx=ctx, chunks=chunks, stride=stride,
                          baseline=baseline, device=device, batch_size=batch_size, dtype=dtype, runtime=runtime,
                          max_ppl_increase=max_ppl_increase, max_kld=max_kld,
                          gpu_memory=_parse_size(gpu_memory, "--gpu-memory") if gpu_memory else None)
        # The gate is judged after the numbers are out, so a failing CI run still shows them; with --json
        # the one document holds both the report and the gate's error.
        try:
            check_gates(report)
        except QualityGateFailed as exc:
            if not as_json:
                render_eval(report, stdout)
                raise
            raise _fail(as_json, exc.exit_code, type(exc).__name__, exc.message, report=report) from None
        _show(as_json, report, lambda: render_eval(report, stdout))

    _run(debug, quiet, work, as_json)


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="Model to run over the calibration text."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to save the statistics (.safetensors)."),
    calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text: FILE or wikitext2-train."),
    calib_samples: int = typer.Option(128, "--calib-samples"),
    calib_seqlen: int = typer.Option(512, "--calib-seqlen"),
    seed: int = typer.Option(0, "--seed"),
    all_experts: bool = AllExpertsOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt, quiet: bool = QuietOpt, debug: bool = DebugOpt,
) -> None:
    """Collect activation statistics (per-channel ranges, X^T X) for calibration-aware quantization."""
    def work() -> None:
        from qtool.pipeline import calibrate_model
        from qtool.recipes import check_calibration_counts

        check_calibration_counts(calib_samples, calib_seqlen)
        report = calibrate_model(model, output, calib=calib, samples=calib_samples, seqlen=calib_seqlen,
                                 seed=seed, device=device, force=force, all_experts=all_experts)

        def render() -> None:
            from qtool.report import render_experts

            expert_tokens = {name: counts for layer in report["layers"] for name, counts in layer["expert_tokens"].items()}
            if expert_tokens:
                render_experts(expert_tokens, stdout, all_experts=all_experts)
            stdout.print(f"wrote {output}")

        _show(as_json, report, render)

    _run(debug, quiet, work, as_json)


def run(argv: Optional[List[str]] = None) -> None:
    """The command line: every way out of a run is one of the exit codes in README.md, with one line on
    stderr, and with --json one JSON document on stdout."""
    signals.install()
    # Libraries' warnings can quote names read from a file: they go out escaped, as ours do.
    warnings.showwarning = lambda message, category, *_, **__: ui.warn(f"{category.__name__}: {message}")
    args = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in args
    try:
        code = app(args=args, prog_name="qtool", standalone_mode=False)
    except typer.Abort as exc:   # click's wrapper of a Ctrl-C or SIGTERM it caught
        cause = exc.__cause__ or exc.__context__
        signal_exc = cause if isinstance(cause, KeyboardInterrupt) else KeyboardInterrupt()
        raise SystemExit(_interrupted(as_json, signal_exc).exit_code) from None
    except KeyboardInterrupt as exc:
        raise SystemExit(_interrupted(as_json, exc).exit_code) from None
    except typer.exceptions.TyperException as exc:   # usage errors: unknown option, bad value, missing argument
        if getattr(exc, "ctx", None) is not None:
            ui.stderr.print(exc.ctx.get_usage())
        if not exc.format_message() and not as_json:   # bare `qtool`: the help above says it all
            raise SystemExit(BadArgument.exit_code) from None
        raise SystemExit(_fail(as_json, BadArgument.exit_code, BadArgument.__name__, exc.format_message()).exit_code) \
            from None
    except Exception as exc:   # outside a command's _run (its own imports): a bug, still one line
        raise SystemExit(_internal_error(as_json, "--debug" in args, exc).exit_code) from None
    if code == EXIT_INTERRUPTED and signals.raised and not _reported:
        # typer turns a signal that lands outside a command's _run (while parsing) into a silent 130.
        signal_exc = Terminated() if signals.raised[-1] == signal.SIGTERM else KeyboardInterrupt()
        code = _interrupted(as_json, signal_exc).exit_code
    raise SystemExit(code or 0)


if __name__ == "__main__":
    run()
