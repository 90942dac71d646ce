"""qtool --max-size vs llama.cpp's fixed mixes at the same file size: SmolLM2-135M, one importance matrix.

Peer, in the same run: ``llama-imatrix`` over the calibration text (``../shared/data/calibration``, 128
windows of 512) and ``llama-quantize --imatrix`` to each mix (default Q4_K_M, Q3_K_M, IQ3_M, IQ2_M). qtool,
from the same F16 GGUF: ``qtool quantize --max-size BYTES`` with the size of llama.cpp's file, the same
importance matrix (``--imatrix``) and the same calibration text for its sensitivity pass (``--calib``).
Every file is scored by ``llama-perplexity`` on WikiText-2 test (40 windows of 512: perplexity, mean KLD
against the F16 model, same top token) and on a second text (the GNU FDL 1.3: perplexity), and timed.

The packaged SmolLM2 is a Q4_1 checkpoint: its "F16" weights lie on Q4_1's grid (and Q5_1's, which holds
it), so those two types would reproduce them almost exactly, an advantage no real checkpoint gives. qtool
chooses here from every other GGUF type (``--types``), as llama.cpp's mixes never use them either.

The F16 file, the importance matrix and llama.cpp's files are shared with bench_iquants.py
(.bench/iquants). QTOOL_LLAMA_BIN: llama.cpp's tools (see bench_iquants.py); QTOOL_BENCH_TYPES: the mixes;
QTOOL_BENCH_JSON: where run_all.py wants the JSON.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_iquants import CALIBRATION, QTOOL, WIKITEXT, Row, checked, output, prepare, report, score  # noqa: E402

MIXES = "Q4_K_M,Q3_K_M,IQ3_M,IQ2_M"
SOURCE_GRID = ("Q4_1", "Q5_1")      # the packaged model's own grid: see above


def main() -> int:
    from rich.console import Console

    console = Console(width=150)
    bin_dir, work, threads, f16, imatrix = prepare(console)
    base_logits = work / "f16.kld"
    if not base_logits.is_file():
        output([str(bin_dir / "llama-perplexity"), "-m", str(f16), "-f", str(WIKITEXT), "-c", "512", "--chunks",
                "40", "-t", threads, "--no-repack", "--kl-divergence-base", str(base_logits)])
    from qtool.sizing import candidate_types

    types = [name for name in candidate_types("gguf", True) if name not in SOURCE_GRID]
    rows: list[Row] = []
    for mix in os.environ.get("QTOOL_BENCH_TYPES", MIXES).split(","):
        theirs = work / f"{mix}-llamacpp.gguf"
        made = None
        if not theirs.is_file():
            made = checked([str(bin_dir / "llama-quantize"), "--imatrix", str(imatrix), str(f16), str(theirs), mix,
                            threads])
        size = theirs.stat().st_size
        rows.append(Row(mix, "llama.cpp", size, made.seconds if made else 0.0,
                        *score(bin_dir, theirs, base_logits, threads)))
        ours = work / f"{mix}-size-qtool.gguf"
        made = checked([*QTOOL, "quantize", str(f16), "--max-size", str(size), "--imatrix", str(imatrix),
                        "--calib", str(CALIBRATION), "--types", ",".join(types), "--no-eval", "-o", str(ours),
                        "--force", "-q"])
        rows.append(Row(mix, "qtool --max-size", ours.stat().st_size, made.seconds,
                        *score(bin_dir, ours, base_logits, threads)))
        for row in rows[-2:]:
            console.print(f"{mix} {row.maker}: {row.bytes:,} bytes, {row.ppl:.3f} ppl, KLD {row.kld:.4f}")
    report(rows, "qtool --max-size vs llama.cpp's mixes on SmolLM2-135M (llama-perplexity; WikiText-2 40 x 512, "
                 "second text: GFDL-1.3)", "sizing", console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
