"""`make bench`: run every benchmarks/bench_*.py (except the quality one, `make bench-quality`),
print each one's table, then one summary JSON of all results on stdout.

Each benchmark script prints its own rich table on stderr and writes its JSON result to the path in
the QTOOL_BENCH_JSON environment variable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = {"bench_quality.py"}


def main() -> int:
    scripts = [p for p in sorted(HERE.glob("bench_*.py")) if p.name not in SKIP]
    only = set(sys.argv[1:])
    results, failed = {}, []
    for script in scripts:
        if only and script.stem not in only:
            continue
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            json_path = Path(handle.name)
        print(f"== {script.name}", file=sys.stderr, flush=True)
        env = {**os.environ, "QTOOL_BENCH_JSON": str(json_path)}
        code = subprocess.call([sys.executable, str(script)], env=env)
        if code != 0:
            failed.append(script.name)
        try:
            results[script.stem] = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError):
            results[script.stem] = {"error": f"exit code {code}, no JSON result"}
        json_path.unlink(missing_ok=True)
    print(json.dumps(results, indent=2))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
