"""Calibration spread over processes with torch.distributed: ``torchrun --nproc-per-node N -m qtool quantize ...``.

Each rank runs the calibration forwards on its share of the calibration windows (window ``i`` goes to
rank ``i % N``), so the forward passes, the dominant cost, split N ways. Every statistic a method
reads is then combined over the ranks (X^T X, token counts and mean squares summed, absmax and the
activation range by max/min, the |x| samples gathered), so each rank holds the same statistics. GPTQ's
rows are then shared among the ranks and gathered (qtool.calibration.methods._quantize_rows), so each
rank keeps the same weights for the next block; rank 0 alone writes the output. One GPU per rank
(``cuda:LOCAL_RANK``, NCCL) on GPU machines, ``gloo`` on the CPU.

The sums come in another order than one process adds them, so the statistics agree with a
one-process run to float32 rounding, not bit for bit (tests/test_distributed.py states the bounds).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from qtool.errors import BadArgument


def requested() -> bool:
    """Whether this process was started as one of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def start(device: str) -> str:
    """Join the process group torchrun describes (once) and return this rank's device: ``cuda`` becomes
    ``cuda:LOCAL_RANK``. A single process returns ``device`` unchanged."""
    if not requested():
        return device
    if not dist.is_available():
        raise BadArgument("torchrun: this torch build has no torch.distributed; run one process")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if ":" not in device:
            device = f"cuda:{local}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if dist.get_rank() > 0:
        from qtool import ui

        ui.configure(quiet=True)     # one progress display: rank 0's
    return device


def local_windows(tokens: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows (every N-th, starting at its rank)."""
    if not active():
        return tokens
    return tokens[dist.get_rank()::dist.get_world_size()]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_max(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_min(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``tensor`` (lengths may differ), concatenated in rank order."""
    if not active():
        return tensor
    size = torch.tensor([tensor.numel()], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.numel()] = tensor
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(count)] for part, count in zip(parts, sizes)])


def same_names(names: list[str]) -> list[str]:
    """The union of every rank's ``names``, sorted (every rank then takes part in the same collectives)."""
    if not active():
        return names
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted({name for part in gathered for name in part or []})


def all_gather_objects(value: object) -> list:
    """Every rank's ``value`` (CPU tensors in it), in rank order. The objects travel pickled between this
    run's own processes; nothing read from a file is unpickled."""
    if not active():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
