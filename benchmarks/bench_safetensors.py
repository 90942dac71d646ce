"""qtool NF4 / int8-sym end to end against transformers + bitsandbytes, same checkpoint, same run.

    python benchmarks/bench_safetensors.py [--schemes nf4,int8-sym] [--model .bench/synthetic-1.1b] [--repeat N]

The checkpoint is a synthetic TinyLlama-shaped 1.1B Llama (random bf16, two shards) generated once
into ``.bench/synthetic-1.1b``. Each side runs as a child process from start to files on disk:

- qtool: ``qtool quantize MODEL -o OUT --scheme S --format safetensors --force --quiet``;
- peer: ``AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=BitsAndBytesConfig(...),
  device_map="cpu")`` then ``save_pretrained(OUT)`` (what a user of transformers does).

Wall time is measured around the child, peak RSS is the child's own VmHWM (benchmarks/_measure.py) and CPU time
its user + system time (``os.wait4``). With ``--repeat N`` the two sides alternate N times and the
median run of each is reported (the machine's load varies; CPU seconds vary less than wall time).
Targets (issue 3): qtool at most 0.25x the peer's wall time and under 1.2 GB peak RSS. A rich table
goes to stderr, the JSON to ``$QTOOL_BENCH_JSON`` when set, else to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure  # noqa: E402

BENCH_DIR = REPO / ".bench"
TARGET_TIME_RATIO = 0.25
TARGET_RSS_BYTES = 1.2e9

_PEER = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    scheme, model, out = sys.argv[1:4]
    if scheme == "int8-sym":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=scheme, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    quantized = AutoModelForCausalLM.from_pretrained(model, quantization_config=config, device_map="cpu",
                                                     dtype=torch.bfloat16)
    quantized.save_pretrained(out)
""")


@dataclass
class Run:
    tool: str
    scheme: str
    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    output_bytes: int
    exit_code: int


@dataclass
class Comparison:
    scheme: str
    time_ratio: float | None              # qtool / transformers
    qtool_peak_rss_gb: float
    meets_time_target: bool
    meets_rss_target: bool


@dataclass
class Report:
    model: str
    threads: int
    runs: list[Run] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    targets: dict = field(default_factory=lambda: {"time_ratio_max": TARGET_TIME_RATIO,
                                                   "peak_rss_bytes_max": TARGET_RSS_BYTES})


def ensure_model(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    from qtool.synthetic import SHAPES, write_synthetic_llama

    print(f"generating the synthetic 1.1B checkpoint in {folder} (once) ...", file=sys.stderr, flush=True)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_synthetic_llama(staging, **SHAPES["1.1b"], shards=2)
    staging.rename(folder)
    return folder


def timed(command: list[str], tool: str, scheme: str, out: Path) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    measured = measure(command, cwd=REPO)
    code = measured.exit_code
    if code != 0:
        print(f"{tool} {scheme} failed ({code}):\n{measured.stderr[-2000:]}", file=sys.stderr)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors")) if out.is_dir() else 0
    return Run(tool, scheme, measured.seconds, measured.cpu_seconds, measured.peak_rss_bytes, size, code)


def median_run(runs: list[Run]) -> Run:
    ok = sorted((run for run in runs if run.exit_code == 0), key=lambda run: run.seconds)
    return ok[(len(ok) - 1) // 2] if ok else runs[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", default="nf4,int8-sym")
    parser.add_argument("--model", type=Path, default=BENCH_DIR / "synthetic-1.1b")
    parser.add_argument("--skip-peer", action="store_true", help="time qtool only")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side (alternating); the median is reported")
    args = parser.parse_args()

    import torch

    model = ensure_model(args.model)
    report = Report(model=str(model), threads=torch.get_num_threads())
    qtool = [sys.executable, "-m", "qtool"]
    for scheme in args.schemes.split(","):
        out = BENCH_DIR / f"out-qtool-{scheme}"
        peer_out = BENCH_DIR / f"out-transformers-{scheme}"
        ours_runs: list[Run] = []
        peer_runs: list[Run] = []
        for _ in range(max(1, args.repeat)):
            # Warm the page cache the same way for both sides: each reads the whole checkpoint once first.
            for path in model.glob("*.safetensors"):
                with open(path, "rb") as handle:
                    while handle.read(1 << 24):
                        pass
            ours_runs.append(timed(qtool + ["quantize", str(model), "-o", str(out), "--scheme", scheme,
                                            "--format", "safetensors", "--force", "--quiet"], "qtool", scheme, out))
            shutil.rmtree(out, ignore_errors=True)
            if not args.skip_peer:
                peer_runs.append(timed([sys.executable, "-c", _PEER, scheme, str(model), str(peer_out)],
                                       "transformers+bnb", scheme, peer_out))
                shutil.rmtree(peer_out, ignore_errors=True)
        ours = median_run(ours_runs)
        report.runs.append(ours)
        ratio = None
        if peer_runs:
            peer = median_run(peer_runs)
            report.runs.append(peer)
            if peer.exit_code == 0 and ours.exit_code == 0:
                ratio = ours.seconds / peer.seconds
        report.comparisons.append(Comparison(
            scheme, ratio, ours.peak_rss_bytes / 1e9,
            meets_time_target=ratio is not None and ratio <= TARGET_TIME_RATIO,
            meets_rss_target=ours.peak_rss_bytes < TARGET_RSS_BYTES))

    from rich.console import Console
    from rich.table import Table

    repeats = f", median of {args.repeat} runs" if args.repeat > 1 else ""
    table = Table(title=f"safetensors quantization, {model.name} ({report.threads} threads{repeats})")
    for column in ("tool", "scheme", "wall s", "CPU s", "peak RSS GB", "output GB", "vs transformers"):
        table.add_column(column, justify="right" if column not in ("tool", "scheme") else "left")
    ratios = {c.scheme: c.time_ratio for c in report.comparisons}
    for run in report.runs:
        ratio = ratios.get(run.scheme) if run.tool == "qtool" else None
        table.add_row(run.tool, run.scheme, f"{run.seconds:.1f}" if run.exit_code == 0 else "failed",
                      f"{run.cpu_seconds:.1f}", f"{run.peak_rss_bytes / 1e9:.2f}", f"{run.output_bytes / 1e9:.2f}",
                      f"{ratio:.2f}x" if ratio is not None else "")
    Console(stderr=True).print(table)
    document = json.dumps(asdict(report), indent=2)
    target = os.environ.get("QTOOL_BENCH_JSON")
    if target:
        Path(target).write_text(document)
    else:
        print(document)
    return 0 if all(run.exit_code == 0 for run in report.runs) else 1


if __name__ == "__main__":
    sys.exit(main())
