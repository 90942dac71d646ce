"""Static int8 activation scales (W8A8) from calibration statistics.

A Linear's input is quantized per tensor with one static scale: ``x_q = clamp(round(x / scale))``,
``scale = clip / (2**(bits-1) - 1)``, so ``clip`` is the |x| mapped to the largest level and
anything beyond it is clipped. How ``clip`` is chosen from what the calibration pass keeps of the
inputs (:class:`~qtool.calibration.observers.InputStats`), ``--act-range``:

- ``minmax``: the largest |x| seen; nothing is clipped, but one outlier stretches the step of all
  values;
- ``percentile``: that percentile of |x| (``act_percentile``, p99.99 by default): the rarest values
  are clipped;
- ``mse``: the threshold minimizing the mean squared quantize-dequantize error over the |x|
  distribution the statistics describe (the stored sketch of equal-mass quantiles for the body,
  the recorded percentiles and the absmax for the tail: :func:`abs_distribution`), searched on a
  log grid below the absmax.

``--act-strategy token`` is compressed-tensors' dynamic per-token alternative: the runtime takes
each token's absmax as it goes, and no scale is stored.

Pure functions on tensors and statistics; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from qtool.calibration.observers import InputStats
from qtool.errors import BadArgument
from qtool.plan import TensorPlan
from qtool.schemes.base import get_scheme
from qtool.schemes.int8 import ACT_RANGES

DEFAULT_ACT_RANGE = "minmax"   # the best static choice measured on smoothed SmolLM2 (see configs/w8a8.yaml)
DEFAULT_PERCENTILE = 99.99
ACT_BITS = 8
# The MSE search: clip = absmax * 2**(-k / _MSE_STEPS_PER_OCTAVE) for k = 0 .. _MSE_OCTAVES * steps.
# Activations of LLMs are heavy-tailed (a few channels 100x the rest), so the best clip can lie far
# below the absmax: the grid spans 10 octaves (down to absmax / 1024), 16 points per octave (4.4%).
_MSE_STEPS_PER_OCTAVE = 16
_MSE_OCTAVES = 10
_MSE_POINTS = 4096


@dataclass
class ActivationScale:
    """The static scale chosen for one Linear's inputs."""

    method: str        # minmax | percentile | mse
    absmax: float      # largest |x| the calibration saw
    clip: float        # |x| mapped to the largest level; larger values are clipped
    scale: float       # clip / (2**(bits-1) - 1)
    bits: int = ACT_BITS


def qmax(bits: int = ACT_BITS) -> int:
    return (1 << (bits - 1)) - 1


def minmax_clip(act_min: float, act_max: float) -> float:
    return max(abs(act_min), abs(act_max))


def percentile_clip(stats: InputStats, percentile: float = DEFAULT_PERCENTILE) -> float:
    """That percentile of |x|: the one the observer recorded, else read off the |x| sketch."""
    if not 0 < percentile <= 100:
        raise BadArgument(f"act_percentile {percentile}: choose a percentile in (0, 100], e.g. 99.99")
    recorded = stats.percentiles.get(f"p{percentile:g}")
    if recorded is not None:
        return float(recorded)
    if stats.abs_sample is None or stats.abs_sample.numel() == 0:
        raise BadArgument(f"act_percentile {percentile}: the statistics hold only "
                          f"{', '.join(sorted(stats.percentiles))}; use one of those or recreate them with `qtool calibrate`")
    return float(torch.quantile(stats.abs_sample.to(torch.float32), percentile / 100))


def quantization_mse(abs_values: torch.Tensor, clips: torch.Tensor, bits: int = ACT_BITS,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of symmetric round-to-nearest quantization of ``abs_values`` (|x|, so the
    error of x and -x is the same) for each clipping threshold in ``clips``: [len(clips)].
    ``weights``: the probability mass of each value (default: equal)."""
    levels = qmax(bits)
    values = abs_values.to(torch.float32).reshape(1, -1)
    scales = (clips.to(torch.float32) / levels).clamp_min(torch.finfo(torch.float32).tiny).reshape(-1, 1)
    squared = (torch.clamp(torch.round(values / scales), max=levels) * scales - values) ** 2
    if weights is None:
        return squared.mean(dim=1)
    return squared @ (weights.to(torch.float32) / weights.sum())


def abs_distribution(stats: InputStats, points: int = _MSE_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(|x| values, their probability mass): the |x| distribution rebuilt from the statistics.

    The sketch (equal-mass quantiles of a subsample) resolves the body but not the tail beyond its
    last points, and for int8 the best clip lies far in the tail (clipped mass of 1e-4 and less).
    So the quantile function is taken from the sketch up to its last point but one, then from the
    recorded percentiles, then the absmax at level 1 - 1/N (N = values seen), and evaluated on a
    grid uniform in t = -ln(1 - level), which puts as many points in each decade of the tail as
    in the body. Between knots the value is linear in t: for power-law tails that errs on the
    heavy side, so the clip errs large (outliers kept) rather than small.
    """
    absmax = minmax_clip(stats.act_min, stats.act_max)
    total = max(stats.tokens * stats.in_features, 2)
    sketch = stats.abs_sample.to(torch.float64).reshape(-1) if stats.abs_sample is not None else torch.zeros(0)
    level = torch.linspace(0, 1, sketch.numel(), dtype=torch.float64)[:-1]
    value = sketch[:-1]
    last = float(level[-1]) if level.numel() else 0.0
    recorded = sorted((float(key[1:]) / 100, float(v)) for key, v in stats.percentiles.items())
    recorded = [(u, v) for u, v in recorded if last < u < 1 - 1 / total]
    level = torch.cat([level, torch.tensor([u for u, _ in recorded] + [1 - 1 / total], dtype=torch.float64)])
    value = torch.cat([value, torch.tensor([v for _, v in recorded] + [absmax], dtype=torch.float64)])
    value = torch.cummax(value.clamp(max=absmax), dim=0).values      # a quantile function never decreases
    knots = -torch.log1p(-level)
    grid = torch.linspace(0, float(knots[-1]), points, dtype=torch.float64)
    right = torch.searchsorted(knots, grid).clamp(1, knots.numel() - 1)
    left = right - 1
    span = (knots[right] - knots[left]).clamp_min(1e-12)
    fraction = ((grid - knots[left]) / span).clamp(0, 1)
    values = value[left] + fraction * (value[right] - value[left])
    # Mass of each grid point: d(level) = e^-t dt; the level above 1 - 1/N is the absmax itself.
    mass = torch.exp(-grid) * (grid[1] - grid[0]) if points > 1 else torch.ones(1, dtype=torch.float64)
    values = torch.cat([values, torch.tensor([absmax], dtype=torch.float64)])
    mass = torch.cat([mass, torch.tensor([1 / total], dtype=torch.float64)])
    return values.to(torch.float32), mass.to(torch.float32)


def mse_clip(abs_values: torch.Tensor, absmax: float, bits: int = ACT_BITS,
             weights: torch.Tensor | None = None) -> float:
    """The clip on the log grid below ``absmax`` with the smallest quantization MSE over the values
    (with their mass ``weights``; ties go to the larger clip)."""
    if absmax <= 0 or abs_values.numel() == 0:
        return absmax
    steps = torch.arange(_MSE_OCTAVES * _MSE_STEPS_PER_OCTAVE + 1, dtype=torch.float64)
    clips = (absmax * torch.pow(2.0, -steps / _MSE_STEPS_PER_OCTAVE)).to(torch.float32)
    errors = quantization_mse(abs_values, clips, bits, weights)
    return float(clips[int(torch.argmin(errors))])


def choose_scale(stats: InputStats, method: str = DEFAULT_ACT_RANGE, *, bits: int = ACT_BITS,
                 percentile: float = DEFAULT_PERCENTILE, levels: float | None = None) -> ActivationScale:
    """``levels``: the largest input level the clip maps to (default: the int grid's, 2^(bits-1) - 1; FP8's is
    448, a non-uniform grid the MSE search does not model)."""
    if method == "mse" and levels is not None and levels != qmax(bits):
        raise BadArgument("--act-range mse searches the clip for an int8 grid; use minmax or percentile for FP8 inputs")
    absmax = minmax_clip(stats.act_min, stats.act_max)
    if method == "minmax":
        clip = absmax
    elif method == "percentile":
        clip = min(percentile_clip(stats, percentile), absmax)
    elif method == "mse":
        if stats.abs_sample is None:
            raise BadArgument("--act-range mse needs the |x| sample of the statistics; recreate them with `qtool calibrate`")
        values, mass = abs_distribution(stats)
        clip = mse_clip(values, absmax, bits, mass)
    else:
        raise BadArgument(f"--act-range {method}: choose one of {', '.join(ACT_RANGES)}")
    # An input that was always zero still needs a usable (non-zero) scale.
    clip = clip if clip > 0 else 1.0
    return ActivationScale(method, absmax, clip, clip / (levels or qmax(bits)), bits)


def act_strategy(plan: TensorPlan) -> str:
    """How the plan's scheme has the runtime quantize the inputs: its record's choices, the first by default."""
    choices = get_scheme(plan.scheme).act_strategies
    strategy = str(plan.params.get("act_strategy", choices[0] if choices else ""))
    if strategy not in choices:
        raise BadArgument(f"--act-strategy {strategy}: {plan.scheme} offers "
                          f"{', '.join(choices) if choices else 'none (its inputs stay as they are)'}")
    return strategy


def quantizes_inputs(plan: TensorPlan) -> bool:
    """A planned tensor whose scheme has the runtime quantize the Linear's inputs with a static or per-token
    scale (w8a8, fp8): what --act-strategy, --act-range and --smooth apply to."""
    return not plan.keep and bool(get_scheme(plan.scheme).act_strategies)


def act_symmetric(plan: TensorPlan) -> bool:
    """Inputs quantized around zero (the default) or with a per-token zero point: asymmetric inputs
    use all 256 levels on one-sided tokens (SwiGLU outputs, down_proj's inputs, whose largest values
    are mostly of one sign). Only dynamic per-token scales have them: a static per-tensor zero point
    is not something qtool calibrates."""
    symmetric = plan.params.get("act_symmetric", True)
    if not isinstance(symmetric, bool):
        raise BadArgument(f"act_symmetric: {symmetric!r} is not true or false")
    if not symmetric and act_strategy(plan) != "token":
        raise BadArgument("--act-asymmetric needs --act-strategy token (per-token zero points computed by the "
                          "runtime); static per-tensor input scales are symmetric")
    return symmetric


def needs_static_scale(plan: TensorPlan) -> bool:
    """A planned tensor whose scheme quantizes its inputs with a static per-tensor scale."""
    return quantizes_inputs(plan) and act_strategy(plan) == "tensor"


def input_scales(plans: list[TensorPlan], stats: Mapping[str, InputStats]) -> dict[str, ActivationScale]:
    """Static input scale of every planned weight whose inputs take one (W8A8, FP8; by weight name), each
    with its plan's ``act_range`` / ``act_percentile``."""
    scales: dict[str, ActivationScale] = {}
    for plan in plans:
        if not needs_static_scale(plan):
            continue
        found = stats.get(plan.name)
        if found is None:
            raise BadArgument(f"--stats has no statistics for {plan.name}; recreate them with `qtool calibrate` "
                              "on this model")
        scales[plan.name] = choose_scale(found, str(plan.params.get("act_range", DEFAULT_ACT_RANGE)),
                                         percentile=float(plan.params.get("act_percentile", DEFAULT_PERCENTILE)),
                                         levels=get_scheme(plan.scheme).act_max)
    return scales
