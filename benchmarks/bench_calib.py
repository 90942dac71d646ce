"""Cost of the calibration pass on a 1.1B model: peak memory and time per decoder layer.

    python benchmarks/bench_calib.py [--samples 32] [--seqlen 512]

The model is bench_gguf's synthetic 1.1B Llama (TinyLlama's shape, bf16, two shards, SmolLM2's
tokenizer), built once into .bench/. ``qtool calibrate MODEL --calib groups_merged.txt -o
stats.safetensors`` runs as a child process; its wall time and its own peak RSS come from
bench_gguf's ``run`` (the child's own VmHWM), the time of every layer from the per-layer records
``qtool calibrate`` saves with the statistics (the same records as its ``--json``).

Why 32 x 512 tokens by default: the pass runs every block over every token (plus X^T X, which
``qtool calibrate`` always collects), so time grows linearly with the tokens; 16k tokens keeps
one run at minutes on a 2-core machine. Memory: ``qtool calibrate`` writes each block's
statistics (dominated by X^T X) to the file as the block finishes, so the peak holds one block's
weights and statistics plus the two hidden-state buffers (samples x seqlen x hidden x 4 bytes
each), which the JSON reports so that the peak at the default 128 samples can be read off (+0.8 GB
of buffers for this model). Target: peak RSS < 6 GB.

No peer is run: llama.cpp's ``llama-imatrix`` needs a GGUF conversion of the model first and
collects less (no X^T X, no percentiles), so its numbers would not measure the same work.
A rich table goes to stderr, the JSON to ``$QTOOL_BENCH_JSON`` when set, else to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_gguf import BENCH, QTOOL, run, synthetic_model  # noqa: E402

TARGET_RSS_BYTES = 6 * 10**9
CALIB_TEXT = REPO.parent / "shared" / "data" / "calibration" / "groups_merged.txt"


@dataclass
class Layer:
    layer: int
    seconds: float


@dataclass
class Result:
    model: str
    parameters: int
    threads: int
    calib: str
    samples: int
    seqlen: int
    tokens: int
    seconds: float
    peak_rss_bytes: int
    hidden_buffers_bytes: int       # the two samples x seqlen x hidden fp32 buffers of the pass
    stats_bytes: int                # the saved statistics file
    seconds_per_layer_mean: float
    seconds_per_layer_max: float
    tokens_per_second: float
    meets_rss_target: bool
    layers: list[Layer] = field(default_factory=list)
    target_peak_rss_bytes: int = TARGET_RSS_BYTES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib", type=Path, default=CALIB_TEXT)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from qtool.calibration import load_stats

    console = Console(stderr=True, width=max(120, Console(stderr=True).width))
    BENCH.mkdir(exist_ok=True)
    if not args.calib.is_file():
        console.print(f"calibration text {args.calib} not found (../shared/data next to the repository)")
        return 2
    console.print("preparing: synthetic 1.1B checkpoint (cached in .bench/)")
    model, parameters = synthetic_model()
    out = BENCH / "calib-stats.safetensors"
    step = run(QTOOL + ["calibrate", str(model), "--calib", str(args.calib), "--calib-samples", str(args.samples),
                        "--calib-seqlen", str(args.seqlen), "-o", str(out), "--force", "--quiet"])
    stats = load_stats(out)
    stats_bytes = out.stat().st_size
    out.unlink()
    hidden = int(json.loads((model / "config.json").read_text())["hidden_size"])
    tokens = stats.samples * stats.seqlen
    layers = [Layer(r.layer, r.seconds) for r in stats.records]
    per_layer = [layer.seconds for layer in layers]
    result = Result(
        model=str(model), parameters=parameters, threads=torch.get_num_threads(), calib=stats.calib,
        samples=stats.samples, seqlen=stats.seqlen, tokens=tokens, seconds=round(step.seconds, 2),
        peak_rss_bytes=step.peak_rss_bytes, hidden_buffers_bytes=2 * tokens * hidden * 4, stats_bytes=stats_bytes,
        seconds_per_layer_mean=round(sum(per_layer) / len(per_layer), 3), seconds_per_layer_max=max(per_layer),
        tokens_per_second=round(tokens / sum(per_layer), 1),
        meets_rss_target=step.peak_rss_bytes < TARGET_RSS_BYTES, layers=layers)

    table = Table(title=f"qtool calibrate, synthetic {parameters / 1e9:.2f}B bf16, {result.samples} x "
                        f"{result.seqlen} tokens ({result.threads} threads)")
    for column in ("wall s", "s/layer mean", "s/layer max", "tokens/s", "peak RSS", "hidden buffers",
                   "stats file", "target"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_row(f"{result.seconds:.1f}", f"{result.seconds_per_layer_mean:.2f}", f"{result.seconds_per_layer_max:.2f}",
                  f"{result.tokens_per_second:.0f}", f"{result.peak_rss_bytes / 1e9:.2f} GB",
                  f"{result.hidden_buffers_bytes / 1e9:.2f} GB", f"{result.stats_bytes / 1e9:.2f} GB",
                  "rss ok" if result.meets_rss_target else "rss >= 6 GB")
    console.print(table)
    payload = json.dumps(asdict(result), indent=2)
    if os.environ.get("QTOOL_BENCH_JSON"):
        Path(os.environ["QTOOL_BENCH_JSON"]).write_text(payload)
    else:
        print(payload)
    return 0 if result.meets_rss_target else 1


if __name__ == "__main__":
    sys.exit(main())
