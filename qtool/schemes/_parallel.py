"""Running a CPU scheme's chunks on a few Python threads, torch's intra-op threads off.

torch's own CPU parallelism splits every op over its threads and waits for all of them at the
end of the op. The schemes' CPU paths run a dozen cheap ops per cache-sized chunk, so that wait
happens thousands of times per tensor, and when the cores are shared with other processes a
descheduled thread stalls every op (measured: 5 to 8x slower than one thread on this 2-core
machine under load). Instead, each worker thread takes whole chunks and runs single-threaded
torch ops on them (torch releases the GIL inside ops): no per-op synchronisation, and a slow
worker only delays its own chunks.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

WORKERS = max(1, min(8, os.cpu_count() or 1))
# Elements per chunk of the GGML types' CPU paths (C kernels and torch): big enough that a call's
# overhead is negligible, small enough that the workers share a tensor evenly (the last chunk of a
# tensor is one worker's alone; the lattice searches take 30-40 ms per 2^18 elements on one core).
CPU_CHUNK_ELEMENTS = 1 << 18
_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.RLock()


@contextmanager
def cpu_workers() -> Iterator[None]:
    """torch single-threaded for the block (restored after): the CPU path of a scheme runs all
    its ops inside, small ones included (a 2-thread op on a busy machine costs milliseconds)."""
    with _LOCK:
        threads = torch.get_num_threads()
        if threads != 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if threads != 1:
                torch.set_num_threads(threads)


class _SharedStarts:
    """The chunks' starts as one iterator that every worker draws from (under a lock): a worker takes
    the next chunk when it finishes one, so a slow or descheduled worker holds back only its own."""

    def __init__(self, starts: Sequence[int]) -> None:
        self._iterator = iter(starts)
        self._lock = threading.Lock()

    def __iter__(self) -> _SharedStarts:
        return self

    def __next__(self) -> int:
        with self._lock:
            return next(self._iterator)


def run_chunks(starts: Sequence[int], work: Callable[[Iterable[int]], None], workers: int | None = None) -> None:
    """Call ``work(shared)`` on k = min(workers, len(starts)) threads (the caller's one included), each
    iterating one shared iterator over ``starts`` (each start reaches one worker), with torch
    single-threaded meanwhile; exceptions propagate."""
    global _POOL
    k = max(1, min(workers or WORKERS, len(starts)))
    with cpu_workers():
        if k == 1:
            work(starts)
            return
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="qtool-cpu")
        shared = _SharedStarts(starts)
        futures = [_POOL.submit(work, shared) for _ in range(1, k)]
        try:
            work(shared)
        finally:
            for future in futures:
                future.result()
