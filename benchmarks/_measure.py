"""Running a benchmarked command: wall time, CPU time and its own peak RSS.

The peak is the child's VmHWM, polled while it runs: wait4's ru_maxrss would report at least the
benchmark process's own RSS, which Linux carries over into a forked child's maximum across exec
(a benchmark that has just generated a checkpoint in-process is large).
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measured:
    seconds: float
    cpu_seconds: float               # user + system of the child (and its waited-for children)
    peak_rss_bytes: int
    exit_code: int
    stderr: str


def _high_water_rss(pid: int) -> int:
    """VmHWM of a running process (bytes), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(command: list[str], *, env: dict | None = None, cwd: Path | None = None) -> Measured:
    with tempfile.TemporaryFile() as log:   # a file, not a pipe: chatty tools cannot block on it
        started = time.perf_counter()
        process = subprocess.Popen(command, env={**os.environ, **(env or {})}, cwd=cwd,
                                   stdout=subprocess.DEVNULL, stderr=log)
        peak = 0
        while True:
            peak = max(peak, _high_water_rss(process.pid))
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        stderr = log.read().decode(errors="replace")
    return Measured(seconds, usage.ru_utime + usage.ru_stime, peak, process.returncode, stderr)
