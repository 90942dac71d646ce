"""Perplexity throughput: ``qtool eval`` against llama.cpp's ``llama-perplexity``, same file, same text.

    python benchmarks/bench_eval.py [--chunks 40] [--ctx 512] [--threads 2] [--types F16,Q8_0]
                                    [--dtypes fp32,bf16] [--batch-size 4] [--device cpu|cuda]

The model is the packaged SmolLM2-135M, written as GGUF files (``--types``) under ``.bench/models``.
``llama-perplexity`` is built once from the llama-cpp-python sdist's vendored llama.cpp sources
(``--sdist``, default ``/tmp/llsdist/llama_cpp_python-*.tar.gz``) with cmake into ``.bench/``. Both
tools score WikiText-2 test (``../shared/data``) with windows of ``--ctx`` tokens, ``--chunks``
windows, on ``--threads`` CPU threads.

Tokens/s is what each tool reads (windows x ctx) per second of compute: for llama-perplexity the
time between its "calculating perplexity" and "Final estimate" log lines, for qtool its forward +
log-softmax time (model loading and tokenization excluded on both sides). A rich table goes to stderr, the JSON to
``$QTOOL_BENCH_JSON`` when set, else to stdout.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BENCH_DIR = REPO / ".bench"
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TARGET_RATIO = 1.2


@dataclass
class Run:
    tool: str                 # "llama-perplexity" or "qtool"
    model_file: str
    gguf_type: str
    compute: str              # llama.cpp: "ggml cpu"; qtool: "<dtype> <device> batch <n>"
    ppl: float
    stderr: float
    tokens_per_s: float
    seconds: float
    ratio_vs_llama: float | None = None


@dataclass
class Report:
    text: str
    ctx: int
    chunks: int | None          # None: the whole text
    threads: int
    device: str
    cpu: str
    torch: str
    llama_perplexity: str | None
    target_ratio: float = TARGET_RATIO
    runs: list[Run] = field(default_factory=list)
    best_ratio: dict[str, float] = field(default_factory=dict)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def find_sdist(explicit: str | None) -> Path | None:
    candidates = [explicit] if explicit else sorted(glob.glob("/tmp/llsdist/llama_cpp_python-*.tar.gz"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build_llama_perplexity(sdist: Path | None, jobs: int) -> Path | None:
    """``.bench/llama-build/bin/llama-perplexity``, configured and built on first use."""
    binary = BENCH_DIR / "llama-build" / "bin" / "llama-perplexity"
    if binary.is_file():
        return binary
    if sdist is None or shutil.which("cmake") is None:
        print("llama-perplexity: no sdist or no cmake; skipping the llama.cpp side", file=sys.stderr)
        return None
    BENCH_DIR.mkdir(exist_ok=True)
    source_root = BENCH_DIR / sdist.name.removesuffix(".tar.gz")
    if not source_root.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(BENCH_DIR, filter="data")
    llama_src = source_root / "vendor" / "llama.cpp"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    print(f"building llama-perplexity from {llama_src} (once) ...", file=sys.stderr, flush=True)
    subprocess.run(["cmake", "-S", str(llama_src), "-B", str(BENCH_DIR / "llama-build"), *generator,
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DGGML_NATIVE=ON"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(BENCH_DIR / "llama-build"), "--target", "llama-perplexity",
                    "-j", str(jobs)], check=True, stdout=subprocess.DEVNULL)
    return binary if binary.is_file() else None


def model_file(gguf_type: str, source: Path | None = None) -> Path:
    """The packaged SmolLM2 (or the GGUF ``source``) as a ``gguf_type`` GGUF, written once with gguf-py."""
    from qtool.sources.resolve import smollm2_path
    from tests._eval_helpers import write_gguf_variant

    folder = BENCH_DIR / "models"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"smollm2-135m-{gguf_type}.gguf"
    if not path.is_file():
        partial = path.with_suffix(".partial")
        write_gguf_variant(source or smollm2_path(), partial, gguf_type)
        partial.rename(path)
    return path


_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
# llama.cpp's log lines start with a minutes.seconds.milliseconds.microseconds timestamp.
_STAMP = r"(\d+)\.(\d+)\.(\d+)\.(\d+) I "
_START = re.compile(_STAMP + r"perplexity: calculating perplexity over (\d+) chunks, n_ctx=(\d+)")
_END = re.compile(_STAMP + r"Final estimate")


def _seconds(match: re.Match) -> float:
    minutes, seconds, millis, micros = (int(match.group(i)) for i in range(1, 5))
    return 60 * minutes + seconds + millis / 1e3 + micros / 1e6


def run_llama_perplexity(binary: Path, path: Path, gguf_type: str, text: Path, *, ctx: int, chunks: int,
                         threads: int) -> Run:
    done = subprocess.run([str(binary), "-m", str(path), "-f", str(text), "-c", str(ctx),
                           "--chunks", str(chunks or -1), "-t", str(threads), "-tb", str(threads)],
                          capture_output=True, text=True)
    log = done.stdout + done.stderr
    final, start, end = _FINAL.search(log), _START.search(log), _END.search(log)
    if done.returncode != 0 or not final or not start or not end:
        raise RuntimeError(f"llama-perplexity failed (exit {done.returncode}):\n{log[-3000:]}")
    # From "calculating perplexity" to "Final estimate": every window's decode and scoring,
    # without model loading and tokenization (as qtool's figure).
    seconds = _seconds(end) - _seconds(start)
    tokens = int(start.group(5)) * int(start.group(6))
    return Run("llama-perplexity", path.name, gguf_type, f"ggml cpu, {threads} threads", float(final.group(1)),
               float(final.group(2)), tokens / seconds, round(seconds, 2))


def run_qtool(path: Path, gguf_type: str, text: Path, *, ctx: int, chunks: int, dtype: str, device: str,
              batch_size: int) -> Run:
    from qtool.evaluation import evaluate

    # One untimed batch first: CUDA/cuBLAS and oneDNN set themselves up on their first calls.
    evaluate([str(path)], text_file=text, ctx=ctx, chunks=batch_size, device=device, dtype=dtype,
             batch_size=batch_size)
    report = evaluate([str(path)], text_file=text, ctx=ctx, chunks=chunks, device=device, dtype=dtype,
                      batch_size=batch_size)
    row = report.models[0]
    return Run("qtool", path.name, gguf_type, f"{dtype} {report.device}, batch {batch_size}", row.ppl, row.stderr,
               row.tokens_per_s, row.seconds)


def render(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    windows = report.chunks if report.chunks else "all"
    table = Table(title=f"perplexity throughput: {windows} x {report.ctx} tokens, {report.threads} threads, "
                        f"{report.cpu}")
    for column in ("file", "tool", "compute", "ppl", "tokens/s", "vs llama-perplexity"):
        table.add_column(column, justify="right" if column in ("ppl", "tokens/s", "vs llama-perplexity") else "left")
    for run in report.runs:
        ratio = f"{run.ratio_vs_llama:.2f}x" if run.ratio_vs_llama is not None else ""
        table.add_row(run.gguf_type, run.tool, run.compute, f"{run.ppl:.4f} ± {run.stderr:.4f}",
                      f"{run.tokens_per_s:,.0f}", ratio)
    console = Console(stderr=True, width=160)
    console.print(table)
    for gguf_type, ratio in report.best_ratio.items():
        verdict = "meets" if ratio >= report.target_ratio else "misses"
        console.print(f"{gguf_type}: best qtool / llama-perplexity = {ratio:.2f}x ({verdict} the "
                      f"{report.target_ratio}x target)", highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=40, help="windows to score; 0 for the whole text")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--types", default="F16,Q8_0", help="GGUF types of the model file, comma separated")
    parser.add_argument("--dtypes", default="fp32,bf16", help="qtool compute dtypes, comma separated")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--source", type=Path, default=None,
                        help="GGUF to convert (default: the packaged SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--sdist", default=None, help="llama-cpp-python sdist with the vendored llama.cpp")
    parser.add_argument("--llama-perplexity", type=Path, default=None, help="a llama-perplexity binary to use")
    parser.add_argument("--no-llama", action="store_true", help="only qtool (e.g. on a GPU machine)")
    args = parser.parse_args(argv)
    chunks = args.chunks or None

    import torch

    torch.set_num_threads(args.threads)
    binary = None if args.no_llama else (args.llama_perplexity
                                         or build_llama_perplexity(find_sdist(args.sdist), args.threads))
    report = Report(text=str(args.text), ctx=args.ctx, chunks=chunks, threads=args.threads,
                    device=args.device, cpu=cpu_name(), torch=torch.__version__,
                    llama_perplexity=str(binary) if binary else None)
    if args.device.startswith("cuda") and torch.cuda.is_available():
        report.device = f"{args.device} ({torch.cuda.get_device_name()})"
    for gguf_type in args.types.split(","):
        path = model_file(gguf_type, args.source)
        llama_rate = None
        if binary is not None:
            llama_run = run_llama_perplexity(binary, path, gguf_type, args.text, ctx=args.ctx, chunks=args.chunks,
                                             threads=args.threads)
            report.runs.append(llama_run)
            llama_rate = llama_run.tokens_per_s
        for dtype in args.dtypes.split(","):
            run = run_qtool(path, gguf_type, args.text, ctx=args.ctx, chunks=chunks, dtype=dtype,
                            device=args.device, batch_size=args.batch_size)
            if llama_rate:
                run.ratio_vs_llama = run.tokens_per_s / llama_rate
                report.best_ratio[gguf_type] = max(report.best_ratio.get(gguf_type, 0.0), run.ratio_vs_llama)
            report.runs.append(run)
    render(report)
    payload = json.dumps(asdict(report), indent=2)
    target = os.environ.get("QTOOL_BENCH_JSON")
    if target:
        Path(target).write_text(payload)
    else:
        print(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
