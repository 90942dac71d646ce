"""qtool vs llama.cpp on a mixture of experts (issue #18): a synthetic Mixtral of about 1B parameters
(8 blocks of 16 experts, 2 routed per token, bf16, two shards; ``qtool.synthetic.SHAPES["moe-1b"]``)
to GGUF Q4_K_M, side by side with llama.cpp's ``convert_hf_to_gguf.py`` + ``llama-quantize`` in the
same run (bench_gguf.py's procedure and table).

Targets: qtool at most 0.5x llama.cpp's total wall time, peak RSS under 1.5 GB (qtool's GGUF sink holds
one block's experts of a matrix at most, the merged tensor being written when its last expert has come).
QTOOL_BENCH_TYPES overrides the types (default Q4_K_M).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gguf import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("moe-1b", default_types="Q4_K_M", target_rss_bytes=int(1.5e9)))
