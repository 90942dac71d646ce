"""The scale searches llama.cpp's importance-weighted quantizers share (make_qkx3_quants, make_qx_quants)
and the float32 arithmetic they need, as pure torch numerics: sums left to right as C loops add them,
correctly rounded square roots, llama.cpp's rounding. Used by the K-quants (ggml_kweighted.py), the
32-element types (ggml.py), the lattice and 1-bit i-quants; nothing here imports them.
"""
from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int (the 1.5*2^23 trick): round half to even, as torch.round does."""
    return torch.round(values)


def exact_sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded (torch's vectorized float32 sqrt is not always: float64, then float32, is)."""
    return torch.sqrt(values.double()).float()


def sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension left to right in float32, as a C loop adds (keepdim)."""
    total = torch.zeros_like(terms[..., :1])
    for j in range(terms.shape[-1]):
        total = total + terms[..., j:j + 1]
    return total


def running_sum(terms: torch.Tensor) -> torch.Tensor:
    """Left to right from the first term (a C loop that starts from x[0], not from 0)."""
    total = terms[..., :1]
    for j in range(1, terms.shape[-1]):
        total = total + terms[..., j:j + 1]
    return total


def number(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant as a tensor: ``tensor / number`` is a product with a reciprocal on some
    devices, ``number / tensor`` a reciprocal then a product; a tensor divides exactly."""
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def qkx3_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, ...]:
    """make_qkx3_quants(rmin -0.9, rdelta 0.05, 37 steps) on groups (g, n): x ~ scale * l - the_min with
    l in [0, nmax], the_min >= 0, by weighted least squares over the inverse scales (nmax - 0.9 + 0.05 k)
    / (max - min), a fit replacing the plain grid only when strictly better. (scale, the_min, levels)."""
    low = torch.clamp(x.amin(dim=-1, keepdim=True), max=0)
    high = x.amax(dim=-1, keepdim=True)
    flat = ~(high > low)
    low = torch.where(flat, torch.zeros_like(low), low)     # flat groups: any finite span; their result is reset
    sum_w = running_sum(weights)
    sum_x = running_sum(weights * x)

    def weighted_error(scale: torch.Tensor, offset: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        diff = scale * levels + offset - x
        return sequential_sum(weights * (diff * diff))

    def span() -> torch.Tensor:
        return torch.where(flat, torch.ones_like(high), high - low)

    inverse = number(float(nmax), x) / span()
    scale = 1 / inverse
    levels = nearest_int(inverse * (x - low)).clamp_(0, nmax)
    best = weighted_error(scale, low, levels)
    flat_min = -x.amin(dim=-1, keepdim=True).clamp(max=0)
    # Each candidate rounds against the min of the best fit so far (the C loop updates it as it goes).
    for step in range(37):
        trial = np.float32(-0.9) + np.float32(0.05) * np.float32(step) + np.float32(nmax)   # float32, as in C
        trial_levels = nearest_int(number(float(trial), x) / span() * (x - low)).clamp_(0, nmax)
        weighted_levels = weights * trial_levels
        sum_l = sequential_sum(weighted_levels)
        sum_l2 = sequential_sum(weighted_levels * trial_levels)
        sum_xl = sequential_sum(weighted_levels * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        safe_det = torch.where(solvable, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(positive, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        error = weighted_error(this_scale, this_min, trial_levels)
        better = solvable & (error < best)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
        levels = torch.where(better, trial_levels, levels)
    return (torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, flat_min, -low),
            torch.where(flat, torch.zeros_like(levels), levels))


def qx_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(rmse_type 1, with weights) on groups (g, n): x ~ scale * l with l in [-nmax, nmax-1]
    over the inverse scales -(nmax + 0.1 k) / max for k = -9..9 (max: the element of largest magnitude),
    a candidate replacing the best only when strictly better. (scale, levels + nmax); a group below
    GROUP_MAX_EPS gets scale 0 and levels 0."""
    peak = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))
    zero = peak.abs() < GROUP_MAX_EPS
    safe_peak = torch.where(zero, torch.ones_like(peak), peak)
    weighted_x = weights * x

    def fit(step: int) -> tuple[torch.Tensor, ...]:
        numerator = np.float32(nmax) + np.float32(0.1) * np.float32(step)
        levels = nearest_int(number(-float(numerator), x) / safe_peak * x).clamp_(-nmax, nmax - 1)
        return levels, sequential_sum(weighted_x * levels), sequential_sum(weights * levels * levels)

    levels, sum_lx, sum_l2 = fit(0)
    scale = torch.where(sum_l2 != 0, sum_lx / torch.where(sum_l2 != 0, sum_l2, torch.ones_like(sum_l2)),
                        torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in (*range(-9, 0), *range(1, 10)):
        trial_levels, sum_lx, sum_l2 = fit(step)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        trial_scale = sum_lx / torch.where(better, sum_l2, torch.ones_like(sum_l2))
        levels = torch.where(better, trial_levels, levels)
        scale = torch.where(better, trial_scale, scale)
        best = torch.where(better, trial_scale * sum_lx, best)
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, 0, levels + nmax)
