"""AWQ-style activation-aware scaling (Lin et al. 2023), folded into the model.

For Linears sharing one input x (q/k/v after input_layernorm, gate/up after
post_attention_layernorm, down_proj after up_proj, o_proj after v_proj where no grouped-query
attention ties channels together), scaling input channel j up by ``s_j`` in the weights and down
by ``s_j`` in what produces x leaves the float model unchanged, but gives the channels that carry
large activations more of the quantization grid. ``s = a^alpha`` normalized (``a`` = per-channel
activation magnitude), and ``alpha`` is searched on a grid: each candidate quantizes ``W diag(s)``
on the plan's grid, and the one minimizing the group's layer-output error
``sum tr(dW H dW^T)`` (``H = X^T X``, ``dW = W - Q(W diag(s)) diag(1/s)``) wins. alpha = 0 is
s = 1, the plain quantization, so the search never does worse on that objective.

The folds are SmoothQuant's (:mod:`qtool.calibration.smoothing`): the same sites and the same
operations ("vector" divides a norm weight, "rows" divides a producer Linear's rows, "cols"
multiplies the consumers' columns), applied lazily by ``SmoothedSource``.

Activation magnitude: the statistics keep each channel's mean square, so ``a`` is its root (the
paper uses mean |x|; both rank channels by the same energy, RMS weighs outliers a little more).
Pure numerics on tensors; :mod:`qtool.calibration.methods` drives it block by block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from qtool.calibration.observers import InputStats
from qtool.architectures import ScaleSite
from qtool.calibration.smoothing import SmoothingOps, apply_ops

_FLOOR = 1e-5
DEFAULT_GRID = 20


@dataclass(frozen=True)
class Site:
    producer: str             # full tensor name folded with 1/s (a norm weight, or a Linear's rows)
    how: str                  # "vector" or "rows"
    linears: tuple[str, ...]  # full weight names of the Linears reading the scaled input


@dataclass
class Choice:
    site: Site
    alpha: float
    scales: torch.Tensor       # [in_features], multiply the Linears' columns, divide the producer
    errors: list[float]        # the group's layer-output error per alpha of the grid (alpha = 0 first)


def block_sites(layer: int, names: Iterable[str], shapes: dict[str, tuple[int, ...]],
                candidates: Sequence[ScaleSite]) -> list[Site]:
    """The ``candidates`` (the architecture record's ``awq_sites``) of decoder block ``layer`` whose
    producer and Linears all exist; a Linear's rows only when they are the Linears' input columns one
    to one (v_proj -> o_proj without grouped-query attention) and it has no bias."""
    prefix = f"model.layers.{layer}."
    names = set(names)
    sites = []
    for producer, how, linears in ((site.producer, site.how, site.linears) for site in candidates):
        weights = tuple(f"{prefix}{linear}.weight" for linear in linears)
        if prefix + producer not in names or not all(w in names for w in weights):
            continue
        if how == "rows":
            if f"{prefix}{producer[: -len('.weight')]}.bias" in names:
                continue   # a bias would need the same division
            rows = shapes[prefix + producer][0]
            if any(shapes[w][1] != rows for w in weights):
                continue   # grouped-query attention: o_proj's channels repeat v's across heads
        sites.append(Site(prefix + producer, how, weights))
    return sites


def alpha_grid(steps: int = DEFAULT_GRID) -> list[float]:
    """alpha = 0, 1/steps, ..., 1 (0 first: the unscaled quantization)."""
    if steps < 1:
        raise ValueError(f"AWQ grid needs at least one step, got {steps}")
    return [step / steps for step in range(steps + 1)]


def channel_scales(act_scale: torch.Tensor, alpha: float) -> torch.Tensor:
    """``act_scale^alpha``, normalized so that max * min = 1 (the product's size stays put);
    channels never active get the smallest scale, not zero."""
    act = act_scale.to(torch.float32).clamp_min(_FLOOR)
    scales = act.pow(alpha)
    return scales / torch.sqrt(scales.max() * scales.min())


def output_error(weight: torch.Tensor, effective: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T) with dW = weight - effective: the summed squared error of X W^T over the
    calibration tokens (float32; the search only compares values of the same size)."""
    diff = weight.to(torch.float32) - effective.to(torch.float32)
    return float(((diff @ hessian) * diff).sum())


# Quantize a stored (scaled) weight on its grid; the second argument is the factors its input columns
# were multiplied by (None: none), for quantizers that weight columns by the scaled inputs' statistics.
Quantizer = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Operations = list[tuple[str, torch.Tensor]]


@dataclass
class Member:
    """A Linear whose quantization a site's scales change: a consumer (columns scaled) or the
    producer (rows divided)."""

    weight: torch.Tensor            # the unscaled float weight
    hessian: torch.Tensor           # X^T X of its input in the unscaled model
    quantize: Quantizer
    operations: Operations          # the folds already chosen for it (earlier sites)


def stored_and_effective(weight: torch.Tensor, operations: Operations, quantize: Quantizer) -> torch.Tensor:
    """The weight the unscaled model effectively computes with, once ``weight`` is folded with
    ``operations``, quantized, and the folds undone."""
    stored = apply_ops(weight.to(torch.float32), operations) if operations else weight.to(torch.float32)
    columns = [factors for how, factors in operations if how == "cols"]
    return effective_weight(quantize(stored, columns[0] if columns else None), operations)


# A candidate must beat the best so far by this much: float32 sums of tr(dW H dW^T) carry ~1e-6
# relative rounding, and a near-tie must not pick a scaling that float64 would call worse.
_MARGIN = 1e-5


def search(site: Site, consumers: list[Member], producer: Member | None, act_scale: torch.Tensor,
           alphas: list[float]) -> Choice:
    """The alpha of ``alphas`` (0 first) minimizing the summed layer-output error of the site's
    consumers and (for a "rows" site) its quantized producer, each in its current state plus the
    candidate's fold. alpha = 0 leaves every member as it is, so the sum never grows."""
    members = [(member, "cols") for member in consumers]
    if producer is not None:
        members.append((producer, site.how))
    device = consumers[0].weight.device
    hessians = [member.hessian.to(device, torch.float32) for member, _ in members]
    errors: list[float] = []
    best = 0
    for alpha in alphas:
        scales = channel_scales(act_scale, alpha).to(device)
        error = 0.0
        for (member, how), hessian in zip(members, hessians):
            effective = stored_and_effective(member.weight, [*member.operations, (how, scales)], member.quantize)
            error += output_error(member.weight, effective, hessian)
        errors.append(error)
        if error < errors[best] * (1 - _MARGIN):
            best = len(errors) - 1
    return Choice(site, alphas[best], channel_scales(act_scale, alphas[best]).to(device), errors)


def scaled_stats(stats: InputStats, scales: torch.Tensor) -> InputStats:
    """The statistics of the input divided by ``scales`` (exact: x' = x / s channel-wise)."""
    scales = scales.to(torch.float32).cpu()
    hessian = stats.hessian
    if hessian is not None:
        hessian = hessian / scales.to(hessian.device).unsqueeze(1) / scales.to(hessian.device).unsqueeze(0)
    return dataclasses.replace(stats, absmax=stats.absmax / scales, mean_square=stats.mean_square / scales.square(),
                               hessian=hessian, abs_sample=None)


def fold_ops(choices: list[Choice]) -> SmoothingOps:
    """The fold of every chosen scaling: producers divided, consumers' columns multiplied."""
    ops: SmoothingOps = {}
    for choice in choices:
        scales = choice.scales.to(torch.float32).cpu()
        ops.setdefault(choice.site.producer, []).append((choice.site.how, scales))
        for weight in choice.site.linears:
            ops.setdefault(weight, []).append(("cols", scales))
    return ops


def effective_weight(stored: torch.Tensor, operations: Operations) -> torch.Tensor:
    """What a stored (scaled) weight computes in the unscaled model: undo its own folds."""
    result = stored.to(torch.float32)
    for how, factors in operations:
        factors = factors.to(result.device)
        if how == "cols":
            result = result / factors
        elif how == "rows":
            result = result * factors.unsqueeze(1)
        else:
            raise ValueError(f"a Linear weight has no {how!r} fold")
    return result
