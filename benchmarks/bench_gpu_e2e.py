"""End to end on a GPU: a synthetic Llama-shaped bf16 checkpoint to NF4 safetensors and to Q4_K_M GGUF
with ``--device cuda``, and bf16 eval throughput against transformers' own forward.

    python benchmarks/bench_gpu_e2e.py --workdir /tmp/e2e --tokenizer DIR --text wiki.test.raw [--shape 8b]

1. ``qtool.synthetic.write_synthetic_llama`` writes the checkpoint (random weights, 4 shards, the
   tokenizer from ``--tokenizer``: any Hugging Face tokenizer folder whose ids fit the vocabulary).
2. ``qtool.pipeline.quantize`` (what ``qtool quantize MODEL --bits 4 -o DIR --device cuda`` and
   ``qtool quantize MODEL --format gguf --type Q4_K_M -o FILE --device cuda`` run), timed whole and
   split into phases by wrapping, in this process only: *read* (the source's ``load`` of a tensor
   and its copy to the GPU, synchronized), *quantize* (every scheme's ``quantize``, synchronized)
   and *write* (the rest: packed results back to the host, the sink's bytes on disk, the final
   rename).
3. ``qtool.evaluation.evaluate`` on the checkpoint (bf16, cuda, ``--batch-size`` windows of
   ``--ctx`` tokens), and transformers' ``AutoModelForCausalLM`` forward over the same windows in
   the same process: tokens per second of model compute for both.

A table goes to stdout, then the same numbers as JSON (also to ``$QTOOL_BENCH_JSON`` when set).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qtool import pipeline  # noqa: E402
from qtool.plan import Recipe  # noqa: E402
from qtool.recipes import recipe_from_options  # noqa: E402
from qtool.schemes.base import all_schemes  # noqa: E402
from qtool.synthetic import SHAPES, write_synthetic_llama  # noqa: E402


@dataclass
class QuantizeRun:
    what: str
    wall_s: float
    read_s: float
    quantize_s: float
    write_s: float
    input_gb: float
    output_gb: float
    report_seconds: float


@dataclass
class EvalRun:
    what: str
    tokens: int
    seconds: float
    tokens_per_s: float
    ppl: float | None = None


@dataclass
class Report:
    device: str
    torch: str
    shape: dict
    parameters: int
    checkpoint_gb: float
    generate_s: float
    quantize: list[QuantizeRun] = field(default_factory=list)
    eval: list[EvalRun] = field(default_factory=list)


class PhaseTimer:
    """Wraps a source's ``load`` and every scheme's ``quantize`` to add up their synchronized time."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.read = 0.0
        self.quantize = 0.0
        self._restore: list = []

    def _timed(self, function, bucket: str, to_device: bool = False):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = function(*args, **kwargs)
            if to_device:
                result = result.to(self.device)
            torch.cuda.synchronize()
            setattr(self, bucket, getattr(self, bucket) + time.perf_counter() - started)
            return result
        return wrapper

    def __enter__(self) -> PhaseTimer:
        for scheme in all_schemes().values():
            original = scheme.quantize
            scheme.quantize = self._timed(original, "quantize")
            self._restore.append((scheme, "quantize"))
        original_resolve = pipeline.resolve
        timer = self

        def resolve(*args, **kwargs):
            context = original_resolve(*args, **kwargs)

            class Wrapped:
                def __enter__(self_inner):
                    source = context.__enter__()
                    source.load = timer._timed(source.load, "read", to_device=True)
                    return source

                def __exit__(self_inner, *exc):
                    return context.__exit__(*exc)
            return Wrapped()

        pipeline.resolve = resolve
        self._original_resolve = original_resolve
        return self

    def __exit__(self, *exc) -> None:
        for scheme, name in self._restore:
            delattr(scheme, name)      # back to the class's method
        pipeline.resolve = self._original_resolve


def cli_recipe(fmt: str, bits: int | None = None, gguf_type: str | None = None) -> Recipe:
    """The recipe ``qtool quantize --bits 4`` / ``--format gguf --type Q4_K_M`` builds."""
    return recipe_from_options(fmt=fmt, bits=bits, scheme=None, gguf_type=gguf_type, config=None, block_size=None,
                               group_size=None, double_quant=None, include=[], skip=[])


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_quantize(what: str, model: Path, out: Path, recipe: Recipe, fmt: str, input_bytes: int) -> QuantizeRun:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    options = pipeline.QuantizeOptions(format=fmt, device="cuda", force=True)
    torch.cuda.synchronize()
    with PhaseTimer("cuda") as timer:
        started = time.perf_counter()
        report = pipeline.quantize(str(model), out, recipe, options)
        wall = time.perf_counter() - started
    run = QuantizeRun(what=what, wall_s=round(wall, 2), read_s=round(timer.read, 2), quantize_s=round(timer.quantize, 2),
                      write_s=round(wall - timer.read - timer.quantize, 2), input_gb=round(input_bytes / 1e9, 2),
                      output_gb=round(folder_bytes(Path(report.output)) / 1e9, 2),
                      report_seconds=round(report.seconds, 2))
    print(f"  {what}: {run.wall_s} s (read {run.read_s}, quantize {run.quantize_s}, write+other {run.write_s}), "
          f"{run.output_gb} GB out", file=sys.stderr, flush=True)
    return run


def transformers_forward(model_dir: Path, windows: torch.Tensor, batch_size: int, repeat: int) -> EvalRun:
    """transformers' own bf16 forward over the same windows: tokens/s of the forward passes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    times = []
    with torch.inference_mode():
        model(windows[:batch_size].cuda())          # warm-up
        for _ in range(repeat):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for start in range(0, windows.shape[0], batch_size):
                logits = model(windows[start:start + batch_size].cuda()).logits
                torch.log_softmax(logits.float(), dim=-1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    tokens = windows.numel()
    del model
    torch.cuda.empty_cache()
    return EvalRun(what="transformers forward bf16 (+ log_softmax)", tokens=tokens, seconds=round(seconds, 3),
                   tokens_per_s=round(tokens / seconds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="Hugging Face tokenizer folder")
    parser.add_argument("--text", type=Path, required=True, help="text to evaluate on (WikiText-2 test)")
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip", default="", help="comma list of steps to skip: nf4, gguf, eval")
    parser.add_argument("--spread-gib", type=float, default=None,
                        help="also evaluate with this many GiB of weights per GPU, spread over every visible GPU")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu_e2e: no CUDA device", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    shape = SHAPES[args.shape]
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.workdir / f"llama-{args.shape}"
    started = time.perf_counter()
    if not (model_dir / "config.json").exists():
        write_synthetic_llama(model_dir, **shape, shards=4, tokenizer_from=args.tokenizer)
    generate_s = time.perf_counter() - started
    checkpoint_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    print(f"  checkpoint {checkpoint_bytes / 1e9:.2f} GB written in {generate_s:.1f} s", file=sys.stderr, flush=True)
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"]
    kv = hidden // shape["num_heads"] * shape["num_kv_heads"]
    parameters = (2 * shape["vocab_size"] * hidden + layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter
                                                               + 2 * hidden) + hidden)
    report = Report(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=dict(shape, name=args.shape),
                    parameters=parameters, checkpoint_gb=round(checkpoint_bytes / 1e9, 2), generate_s=round(generate_s, 1))

    if "nf4" not in skip:
        report.quantize.append(run_quantize("NF4 + double quant safetensors", model_dir, args.workdir / "nf4",
                                            cli_recipe("safetensors", bits=4), "safetensors", checkpoint_bytes))
        shutil.rmtree(args.workdir / "nf4", ignore_errors=True)
    if "gguf" not in skip:
        report.quantize.append(run_quantize("Q4_K_M GGUF", model_dir, args.workdir / "model.gguf",
                                            cli_recipe("gguf", gguf_type="Q4_K_M"), "gguf", checkpoint_bytes))
        (args.workdir / "model.gguf").unlink(missing_ok=True)

    if "eval" not in skip:
        from transformers import AutoTokenizer

        from qtool.evaluation import evaluate

        torch.cuda.empty_cache()
        evaluated = evaluate([str(model_dir)], text_file=args.text, ctx=args.ctx, chunks=args.chunks, device="cuda",
                             batch_size=args.batch_size, dtype="bf16")
        row = evaluated.models[0]
        report.eval.append(EvalRun(what="qtool eval bf16", tokens=row.tokens_evaluated, seconds=row.seconds,
                                   tokens_per_s=round(row.tokens_per_s), ppl=row.ppl))
        if args.spread_gib and torch.cuda.device_count() > 1:
            torch.cuda.empty_cache()
            spread = evaluate([str(model_dir)], text_file=args.text, ctx=args.ctx, chunks=args.chunks, device="cuda",
                              batch_size=args.batch_size, dtype="bf16", gpu_memory=int(args.spread_gib * 2**30)).models[0]
            report.eval.append(EvalRun(what=f"qtool eval bf16, {torch.cuda.device_count()} GPUs x {args.spread_gib:g} GiB",
                                       tokens=spread.tokens_evaluated, seconds=spread.seconds,
                                       tokens_per_s=round(spread.tokens_per_s), ppl=spread.ppl))
        torch.cuda.empty_cache()
        # The same number of windows of the same text (without qtool's BOS handling).
        ids = AutoTokenizer.from_pretrained(model_dir)(args.text.read_text(encoding="utf-8"))["input_ids"]
        windows = torch.tensor(ids[:args.chunks * args.ctx]).view(args.chunks, args.ctx)
        report.eval.append(transformers_forward(model_dir, windows, args.batch_size, repeat=3))

    print(f"\n{report.device}, torch {report.torch}; synthetic {args.shape} Llama ({parameters / 1e9:.2f} B parameters, "
          f"{report.checkpoint_gb} GB bf16, written in {report.generate_s} s)")
    print(f"{'quantize':<34} {'wall s':>7} {'read':>6} {'quant':>6} {'write':>6} {'GB out':>7}")
    for run in report.quantize:
        print(f"{run.what:<34} {run.wall_s:7.1f} {run.read_s / run.wall_s:6.0%} {run.quantize_s / run.wall_s:6.0%} "
              f"{run.write_s / run.wall_s:6.0%} {run.output_gb:7.2f}")
    for run in report.eval:
        print(f"{run.what:<44} {run.tokens:>8} tokens {run.seconds:8.3f} s {run.tokens_per_s:>10,} tokens/s")
    text_json = json.dumps(asdict(report), indent=2)
    if os.environ.get("QTOOL_BENCH_JSON"):
        Path(os.environ["QTOOL_BENCH_JSON"]).write_text(text_json + "\n")
    print(text_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
