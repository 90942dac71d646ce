"""qtool vs llama.cpp on the i-quants: SmolLM2-135M, one importance matrix, every i-quant mix.

Peer, in the same run: ``llama-imatrix`` over the calibration text (``../shared/data/calibration``, 128
windows of 512), ``llama-quantize --imatrix`` to each mix. qtool, from the same F16 GGUF: (a) ``qtool
quantize --type MIX --imatrix`` with llama.cpp's own matrix, and (b) ``--method imatrix --calib`` with
qtool's own calibration (128 windows of 512 of the same text). Every file is scored by
``llama-perplexity`` on WikiText-2 test (40 windows of 512: perplexity and mean KLD against the F16
model) and on a second text (the GNU FDL 1.3 from /usr/share/common-licenses: perplexity), and timed.
llama-perplexity runs with --no-repack: its AMX repacking of IQ4_XS weights crashes on this project's
CPUs (llama.cpp as vendored by llama-cpp-python 0.3.36).

llama.cpp's tools come from QTOOL_LLAMA_BIN (a folder holding llama-imatrix, llama-quantize and
llama-perplexity), else are built with cmake from the llama-cpp-python sdist's sources into .bench/ (as
bench_gguf.py does). QTOOL_BENCH_TYPES: the mixes (default every i-quant mix); QTOOL_BENCH_JSON: where
run_all.py wants the JSON.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure  # noqa: E402
from bench_gguf import BENCH, PYTHON, REPO, llama_sources  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CALIBRATION = DATA / "calibration" / "groups_merged.txt"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
SECOND_TEXT = Path("/usr/share/common-licenses/GFDL-1.3")
QTOOL = [PYTHON, "-m", "qtool"]
MIXES = "IQ4_XS,IQ3_M,IQ3_S,IQ3_XS,IQ3_XXS,IQ2_M,IQ2_S,IQ2_XS,IQ2_XXS,IQ1_M,IQ1_S"
TOOLS = ("llama-imatrix", "llama-quantize", "llama-perplexity")


@dataclass
class Row:
    mix: str
    maker: str                 # llama.cpp, qtool (llama.cpp's imatrix), qtool (own calibration)
    bytes: int
    seconds: float
    ppl: float
    kld: float
    same_top: float            # % of positions whose top token equals the F16 model's
    ppl_second: float


def tools() -> Path:
    given = os.environ.get("QTOOL_LLAMA_BIN")
    if given:
        return Path(given)
    build = BENCH / "llama-tools-build"
    if not all((build / "bin" / tool).is_file() for tool in TOOLS):
        subprocess.check_call(["cmake", "-S", str(llama_sources()), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                               "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"], stdout=subprocess.DEVNULL)
        subprocess.check_call(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 2)],
                              stdout=subprocess.DEVNULL)
    return build / "bin"


def checked(command: list[str]):
    result = measure(command)
    if result.exit_code != 0:
        raise SystemExit(f"failed ({result.exit_code}): {' '.join(command)}\n{result.stderr[-2000:]}")
    return result


def output(command: list[str]) -> str:
    """stdout and stderr of a command that must succeed (llama-perplexity prints its statistics to both)."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
    return result.stdout + result.stderr


def score(bin_dir: Path, model: Path, base_logits: Path, threads: str) -> tuple[float, float, float, float]:
    """(WikiText-2 ppl, mean KLD, same top %, second-text ppl) by llama-perplexity."""
    first = output([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(WIKITEXT), "-c", "512",
                    "--chunks", "40", "-t", threads, "--no-repack", "--kl-divergence-base", str(base_logits), "--kl-divergence"])
    ppl = float(re.search(r"Mean PPL\(Q\)\s*:\s*([\d.]+)", first).group(1))
    kld = float(re.search(r"Mean\s+KLD:\s*(-?[\d.]+)", first).group(1))
    same = float(re.search(r"Same top p:\s*([\d.]+)", first).group(1))
    second = output([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(SECOND_TEXT), "-c", "512",
                     "-t", threads, "--no-repack"])
    return ppl, kld, same, float(re.search(r"Final estimate: PPL = ([\d.]+)", second).group(1))


def report(rows: list[Row], title: str, benchmark: str, console) -> None:
    """The rows as a table, then as the JSON document (also where QTOOL_BENCH_JSON says)."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("mix", "made by", "size MB", "time s", "ppl", "KLD", "same top %", "ppl 2nd text"):
        table.add_column(column, justify="left" if column in ("mix", "made by") else "right")
    for row in rows:
        table.add_row(row.mix, row.maker, f"{row.bytes / 1e6:.3f}", f"{row.seconds:.1f}", f"{row.ppl:.3f}",
                      f"{row.kld:.4f}", f"{row.same_top:.2f}", f"{row.ppl_second:.3f}")
    console.print(table)
    payload = {"benchmark": benchmark, "rows": [asdict(row) for row in rows]}
    print(json.dumps(payload, indent=1))
    if os.environ.get("QTOOL_BENCH_JSON"):
        Path(os.environ["QTOOL_BENCH_JSON"]).write_text(json.dumps(payload, indent=1))


def prepare(console) -> tuple[Path, Path, str, Path, Path]:
    """(llama.cpp's tools, the work folder, threads, SmolLM2 as F16 GGUF, llama-imatrix's matrix of the
    calibration text); the files are made once (delete .bench/iquants to redo)."""
    bin_dir, work = tools(), BENCH / "iquants"
    work.mkdir(parents=True, exist_ok=True)
    threads = str(os.cpu_count() or 2)
    f16 = work / "smollm2-f16.gguf"
    if not f16.is_file():
        checked([*QTOOL, "quantize", "smollm2-135m", "--type", "F16", "-o", str(f16), "-q", "--force"])
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        made = checked([str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(CALIBRATION), "-c", "512",
                        "--chunks", "128", "-o", str(imatrix), "--no-ppl", "-t", threads])
        console.print(f"llama-imatrix: {made.seconds:.0f} s")
    return bin_dir, work, threads, f16, imatrix


def main() -> int:
    from rich.console import Console

    console = Console(width=150)
    bin_dir, work, threads, f16, imatrix = prepare(console)
    stats = work / "qtool-stats.safetensors"
    if not stats.is_file():
        made = checked([*QTOOL, "calibrate", str(f16), "--calib", str(CALIBRATION), "--calib-samples", "128",
                        "--calib-seqlen", "512", "-o", str(stats), "--force", "-q"])
        console.print(f"qtool calibrate: {made.seconds:.0f} s")
    base_logits = work / "f16.kld"
    output([str(bin_dir / "llama-perplexity"), "-m", str(f16), "-f", str(WIKITEXT), "-c", "512", "--chunks", "40",
            "-t", threads, "--no-repack", "--kl-divergence-base", str(base_logits)])
    rows: list[Row] = []
    base = score(bin_dir, f16, base_logits, threads)
    rows.append(Row("F16", "-", f16.stat().st_size, 0.0, *base))
    for mix in os.environ.get("QTOOL_BENCH_TYPES", MIXES).split(","):
        makers = {
            "llama.cpp": [str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), str(f16), "{out}", mix, threads],
            "qtool, llama.cpp's imatrix": [*QTOOL, "quantize", str(f16), "--type", mix, "--imatrix", str(imatrix),
                                           "-o", "{out}", "--force", "-q"],
            "qtool, own calibration": [*QTOOL, "quantize", str(f16), "--type", mix, "--method", "imatrix", "--stats",
                                       str(stats), "-o", "{out}", "--force", "-q"],
        }
        for maker, command in makers.items():
            out = work / f"{mix}-{maker.split(',')[0].replace('.', '')}{'-own' if 'own' in maker else ''}.gguf"
            made = checked([str(out) if part == "{out}" else part for part in command])
            rows.append(Row(mix, maker, out.stat().st_size, made.seconds, *score(bin_dir, out, base_logits, threads)))
            console.print(f"{mix} {maker}: {rows[-1].ppl:.3f} ppl, KLD {rows[-1].kld:.4f}")
    report(rows, "i-quants on SmolLM2-135M (llama-perplexity; WikiText-2 40 x 512, second text: GFDL-1.3)",
           "iquants", console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
