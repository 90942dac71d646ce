"""qtool vs llama.cpp: a synthetic 1.1B bf16 checkpoint (two shards) to GGUF Q8_0, Q4_0 and Q4_K_M.

Peer, measured in the same run: llama.cpp's own path, built from the llama-cpp-python sdist's
vendored sources: ``convert_hf_to_gguf.py --outtype f16`` then ``llama-quantize`` (built with
cmake into .bench/). qtool: ``qtool quantize MODEL --format gguf --type TYPE``.

Reports wall time and peak RSS of every step, the ratio qtool / llama.cpp, and the targets
(qtool <= 0.5x llama.cpp's total wall time, peak RSS < 1 GB). qtool's C kernels are compiled on
first use and cached; that one-time cost is measured separately (a warm-up conversion of a tiny
model) and reported, not hidden.

i-quant mixes (types named IQ*: llama-quantize refuses the 1-2 bit ones without an importance matrix)
are made by both tools with one importance matrix, ``llama-imatrix`` over 4 x 512 tokens of the
calibration text on llama.cpp's F16 file (made once, not counted in either time): ``llama-quantize
--imatrix`` and ``qtool quantize --imatrix``.

Environment: QTOOL_LLAMA_SDIST (path to llama_cpp_python-*.tar.gz; else /tmp/llsdist/*.tar.gz,
else ``pip download``), QTOOL_LLAMA_BIN (a folder with llama-quantize and llama-imatrix already built;
else they are built), QTOOL_BENCH_TYPES (default "Q8_0,Q4_0,Q4_K_M"), QTOOL_BENCH_JSON (where
run_all.py wants the JSON).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import measure  # noqa: E402
BENCH = REPO / ".bench"
PYTHON = sys.executable
QTOOL = [PYTHON, "-m", "qtool"]
CALIBRATION = REPO.parent / "shared" / "data" / "calibration" / "groups_merged.txt"
TARGET_RATIO = 0.5
TARGET_RSS_BYTES = 10**9


@dataclass
class Step:
    command: str
    seconds: float
    peak_rss_bytes: int


@dataclass
class Row:
    type: str
    qtool_seconds: float
    qtool_peak_rss_bytes: int
    qtool_bytes: int
    llamacpp_seconds: float
    llamacpp_convert_seconds: float
    llamacpp_quantize_seconds: float
    llamacpp_peak_rss_bytes: int
    llamacpp_bytes: int
    ratio: float
    meets_time_target: bool
    meets_rss_target: bool


@dataclass
class Result:
    model: str
    parameters: int
    threads: int
    qtool_compile_warmup_seconds: float
    rows: list[Row] = field(default_factory=list)


def run(command: list[str], *, env: dict | None = None, cwd: Path | None = None) -> Step:
    """Run a command; its wall time and its own peak RSS (see _measure)."""
    measured = measure(command, env=env, cwd=cwd)
    if measured.exit_code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({measured.exit_code}):\n{measured.stderr[-3000:]}")
    return Step(" ".join(command), measured.seconds, measured.peak_rss_bytes)


def synthetic_model(shape_name: str = "1.1b") -> tuple[Path, int]:
    """A bf16 checkpoint of qtool.synthetic's shape (1.1B: TinyLlama's) in two shards, with SmolLM2's
    tokenizer (its 49152 tokens set the vocabulary, so llama.cpp's converter accepts it), cached in .bench/."""
    from qtool.sources.resolve import resolve
    from qtool.synthetic import SHAPES, synthetic_parameters, write_synthetic_llama

    folder = BENCH / f"synthetic-{shape_name}-bf16"
    shape = dict(SHAPES[shape_name], vocab_size=49152)
    if not (folder / "config.json").is_file():
        with resolve("smollm2-135m") as smollm2:
            write_synthetic_llama(folder, **shape, shards=2, tokenizer_from=smollm2.tokenizer_dir())
    return folder, synthetic_parameters(**shape)


def llama_sources() -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python sdist, unpacked into .bench/."""
    existing = sorted(BENCH.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if existing:
        return existing[-1]
    sdist = os.environ.get("QTOOL_LLAMA_SDIST") or next(iter(sorted(glob.glob("/tmp/llsdist/*.tar.gz"))), None)
    if sdist is None:
        download = BENCH / "sdist"
        subprocess.check_call([PYTHON, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "llama-cpp-python==0.3.36", "-d", str(download)])
        sdist = str(next(download.glob("llama_cpp_python-*.tar.gz")))
    with tarfile.open(sdist) as archive:
        archive.extractall(BENCH, filter="data")
    return sorted(BENCH.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def llama_tool(sources: Path, tool: str = "llama-quantize") -> Path:
    """llama.cpp's ``tool`` from QTOOL_LLAMA_BIN, else built from ``sources``."""
    if os.environ.get("QTOOL_LLAMA_BIN"):
        return Path(os.environ["QTOOL_LLAMA_BIN"]) / tool
    # A build folder of our own: other benchmarks configure .bench/llama-build their way.
    build = BENCH / "llama-quantize-build"
    binary = build / "bin" / tool
    if not binary.is_file():
        subprocess.check_call(["cmake", "-S", str(sources), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                               "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"], stdout=subprocess.DEVNULL)
        subprocess.check_call(["cmake", "--build", str(build), "--target", tool, "-j",
                               str(os.cpu_count() or 2)], stdout=subprocess.DEVNULL)
    return binary


def main(shape_name: str = "1.1b", default_types: str = "Q8_0,Q4_0,Q4_K_M",
         target_rss_bytes: int = TARGET_RSS_BYTES) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    BENCH.mkdir(exist_ok=True)
    types = os.environ.get("QTOOL_BENCH_TYPES", default_types).split(",")
    threads = os.cpu_count() or 2
    console.print(f"preparing: synthetic {shape_name} checkpoint, llama.cpp sources and llama-quantize "
                  "(cached in .bench/)")
    model, parameters = synthetic_model(shape_name)
    sources = llama_sources()
    quantize_binary = llama_tool(sources)
    convert_env = {"PYTHONPATH": str(sources / "gguf-py") + os.pathsep + str(sources)}
    out = BENCH / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()

    # The first conversion builds qtool's C kernels (cached afterwards): do that on a tiny model, and
    # report the time.
    from qtool.synthetic import SHAPES, write_synthetic_llama
    from qtool.sources.resolve import resolve

    tiny = BENCH / "synthetic-warmup"
    if not (tiny / "config.json").is_file():
        with resolve("smollm2-135m") as smollm2:
            write_synthetic_llama(tiny, **dict(SHAPES["1.1b"], num_layers=1, vocab_size=49152),
                                  tokenizer_from=smollm2.tokenizer_dir())
    warmup = 0.0
    # One C library serves every type; the i-quant mixes would need an importance matrix for this model.
    for type_name in [name for name in types if not name.startswith("IQ")] or ["Q4_0"]:
        warmup += run(QTOOL + ["quantize", str(tiny), "--format", "gguf", "--type", type_name,
                               "-o", str(out / "warmup.gguf"), "--force", "--quiet"]).seconds

    # llama.cpp: one F16 conversion, shared by the three quantizations (counted in each total).
    f16 = out / "llamacpp-f16.gguf"
    convert = run([PYTHON, str(sources / "convert_hf_to_gguf.py"), str(model), "--outtype", "f16",
                   "--outfile", str(f16)], env=convert_env)
    imatrix = BENCH / f"synthetic-{shape_name}-imatrix.gguf"
    if any(type_name.startswith("IQ") for type_name in types) and not imatrix.is_file():
        run([str(llama_tool(sources, "llama-imatrix")), "-m", str(f16), "-f", str(CALIBRATION), "-c", "512",
             "--chunks", "4", "-t", str(threads), "-o", str(imatrix)])
    result = Result(model=str(model), parameters=parameters, threads=threads, qtool_compile_warmup_seconds=warmup)
    for type_name in types:
        weighted = ["--imatrix", str(imatrix)] if type_name.startswith("IQ") else []
        ours_path = out / f"qtool-{type_name}.gguf"
        ours = run(QTOOL + ["quantize", str(model), "--format", "gguf", "--type", type_name, *weighted,
                            "-o", str(ours_path), "--force", "--quiet"])
        theirs_path = out / f"llamacpp-{type_name}.gguf"
        theirs = run([str(quantize_binary), *weighted, str(f16), str(theirs_path), type_name, str(threads)])
        llama_total = convert.seconds + theirs.seconds
        ratio = ours.seconds / llama_total
        result.rows.append(Row(
            type=type_name, qtool_seconds=ours.seconds, qtool_peak_rss_bytes=ours.peak_rss_bytes,
            qtool_bytes=ours_path.stat().st_size, llamacpp_seconds=llama_total,
            llamacpp_convert_seconds=convert.seconds, llamacpp_quantize_seconds=theirs.seconds,
            llamacpp_peak_rss_bytes=max(convert.peak_rss_bytes, theirs.peak_rss_bytes),
            llamacpp_bytes=theirs_path.stat().st_size, ratio=ratio, meets_time_target=ratio <= TARGET_RATIO,
            meets_rss_target=ours.peak_rss_bytes < target_rss_bytes))
        ours_path.unlink()
        theirs_path.unlink()

    table = Table(title=f"GGUF conversion of a synthetic {parameters / 1e9:.2f}B bf16 model ({threads} threads)")
    for column in ("type", "qtool s", "llama.cpp s (convert+quantize)", "ratio", "qtool RSS", "llama.cpp RSS",
                   "qtool size", "llama.cpp size", "targets"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(row.type, f"{row.qtool_seconds:.1f}",
                      f"{row.llamacpp_seconds:.1f} ({row.llamacpp_convert_seconds:.1f}+{row.llamacpp_quantize_seconds:.1f})",
                      f"{row.ratio:.2f}x", f"{row.qtool_peak_rss_bytes / 2**20:.0f} MiB",
                      f"{row.llamacpp_peak_rss_bytes / 2**20:.0f} MiB", f"{row.qtool_bytes / 2**20:.0f} MiB",
                      f"{row.llamacpp_bytes / 2**20:.0f} MiB",
                      ("time ok" if row.meets_time_target else f"time > {TARGET_RATIO}x") + ", "
                      + ("rss ok" if row.meets_rss_target else f"rss >= {target_rss_bytes / 1e9:g} GB"))
    console.print(table)
    console.print(f"qtool's warm-up conversion of a one-layer model (builds the C kernels once): {warmup:.1f} s")
    payload = json.dumps(asdict(result), indent=2)
    if os.environ.get("QTOOL_BENCH_JSON"):
        Path(os.environ["QTOOL_BENCH_JSON"]).write_text(payload)
    print(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
