"""Statistics of the inputs of one Linear layer, accumulated batch by batch.

What the calibration-aware methods need from the activations X (tokens x in_features):
- per-input-channel absmax and mean square (AWQ scaling, llama.cpp-style importance weights);
- per-tensor min/max and |x| percentiles (static int8 activation scales);
- X^T X (GPTQ's Hessian), fp32, only when a method asks for it (in_features^2 floats per site).

Percentiles come from a seeded uniform subsample of |x| (a fixed number of values per batch), so
memory stays bounded whatever the number of tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PERCENTILES = (99.0, 99.9, 99.99)
_SAMPLE_PER_UPDATE = 1 << 16
_SKETCH_POINTS = 4096


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """``values`` sorted, on the CPU: numpy's vectorized sort there (15x torch's on a million floats)."""
    if values.is_cuda:
        return torch.sort(values)[0].cpu()
    return torch.from_numpy(np.sort(values.numpy()))


@dataclass
class InputStats:
    in_features: int
    tokens: int
    absmax: torch.Tensor              # [in_features]
    mean_square: torch.Tensor         # [in_features]
    act_min: float
    act_max: float
    percentiles: dict[str, float]     # "p99.9" -> that percentile of |x|
    hessian: torch.Tensor | None = None   # [in_features, in_features], sum of x^T x over tokens
    abs_sample: torch.Tensor | None = field(default=None, repr=False)   # sorted equal-mass quantiles of |x|


class InputObserver:
    def __init__(self, in_features: int, *, want_hessian: bool, device: torch.device | str = "cpu",
                 seed: int = 0, sample_per_update: int = _SAMPLE_PER_UPDATE) -> None:
        self.in_features = in_features
        self.tokens = 0
        self.absmax = torch.zeros(in_features, device=device)
        self.sum_square = torch.zeros(in_features, device=device, dtype=torch.float64)
        # Kept on the device until finish(): a float() per batch would make the host wait for the GPU.
        self._act_min = torch.full((1,), float("inf"), device=device)
        self._act_max = torch.full((1,), float("-inf"), device=device)
        self.hessian = torch.zeros(in_features, in_features, device=device) if want_hessian else None
        self._samples: list[torch.Tensor] = []
        self._sample_per_update = sample_per_update
        self._generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.in_features).to(torch.float32)
        self.tokens += x.shape[0]
        # One pass per extreme (not abs, then amax, min and max over the whole batch).
        low, high = x.amin(dim=0), x.amax(dim=0)     # (torch.aminmax along dim 0 is 5x slower on CPU)
        self.absmax = torch.maximum(self.absmax, torch.maximum(-low, high))
        self.sum_square += (x * x).sum(dim=0, dtype=torch.float64)
        self._act_min = torch.minimum(self._act_min, low.min())
        self._act_max = torch.maximum(self._act_max, high.max())
        if self.hessian is not None:
            self.hessian.addmm_(x.T, x)
        flat = x.reshape(-1)
        count = min(self._sample_per_update, flat.numel())
        picks = torch.randint(0, flat.numel(), (count,), generator=self._generator, device=flat.device)
        self._samples.append(flat[picks].abs())

    def _combine(self) -> None:
        """Every rank's sums merged (qtool.calibration.distributed): each then holds the statistics of
        all the calibration windows."""
        from qtool.calibration import distributed

        tokens = distributed.all_sum(torch.tensor([self.tokens], dtype=torch.float64, device=self.absmax.device))
        self.tokens = int(tokens.item())
        distributed.all_max(self.absmax)
        distributed.all_sum(self.sum_square)
        distributed.all_min(self._act_min)
        distributed.all_max(self._act_max)
        if self.hessian is not None:
            distributed.all_sum(self.hessian)
        local = torch.cat(self._samples) if self._samples else torch.zeros(0, device=self.absmax.device)
        self._samples = [distributed.all_gather_rows(local)]

    def finish(self, hessian_on_device: bool = False) -> InputStats:
        """The statistics, on the CPU (``hessian_on_device``: X^T X stays where it was summed, for a
        method that uses it there at once); over all ranks when calibration is spread over processes."""
        from qtool.calibration import distributed

        if distributed.active():
            self._combine()
        sample = torch.cat(self._samples) if self._samples else torch.zeros(0)
        sample = _sorted(sample) if sample.numel() else torch.zeros(1)
        percentiles = {f"p{p:g}": float(sample[min(sample.numel() - 1, int(round(p / 100 * (sample.numel() - 1))))])
                       for p in PERCENTILES}
        # Keep an equal-mass sketch of the |x| distribution (sorted quantiles), not the whole sample.
        sketch = sample[torch.linspace(0, sample.numel() - 1, min(_SKETCH_POINTS, sample.numel())).round().long()]
        tokens = max(self.tokens, 1)
        return InputStats(self.in_features, self.tokens, self.absmax.cpu(), (self.sum_square / tokens).float().cpu(),
                          float(self._act_min), float(self._act_max), percentiles,
                          self.hessian if self.hessian is None or hessian_on_device else self.hessian.cpu(), sketch.contiguous())

