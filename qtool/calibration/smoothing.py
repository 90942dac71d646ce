"""SmoothQuant-style smoothing for W8A8: move the inputs' outlier channels into the weights.

A Linear computes ``x @ W.T``; dividing input channel j by ``s_j`` and multiplying column j of W
by ``s_j`` leaves the product unchanged, but flattens the channels that make one int8 scale per
tensor too coarse. The division is folded into what produces the input, so the model needs no
new operation: the RMSNorm weight before q/k/v and before gate/up, and the rows of up_proj for
down_proj (its input is ``act(gate) * up``, linear in up's output channels).
``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` (SmoothQuant; ``alpha`` = how much of the range
moves into the weights, whose int8 per-channel quantization barely notices it). o_proj is left
alone: with grouped-query attention its input channels are shared across heads.

down_proj takes its own alpha (``down_alpha``): on SmolLM2-135M its columns, multiplied by the large
factors of up_proj's outlier channels, are where smoothing costs the int8 weights most (alpha 0.8
everywhere: int8 weights +0.66% ppl after GPTQ, +1.5% round to nearest; with down_proj at 0.5, +0.17%),
while q/k/v and gate/up take alpha 0.8 for free.

Pure numerics plus :class:`SmoothedSource`, a source view that applies the factors lazily,
tensor by tensor, as the pipeline loads them.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from qtool.architectures import ScaleSite
from qtool.calibration.observers import InputStats
from qtool.sources.base import Source

_FLOOR = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel factors s (divide the input, multiply the weight columns)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    act = act_absmax.to(torch.float32).clamp_min(_FLOOR)
    weight = weight_absmax.to(torch.float32).clamp_min(_FLOOR)
    factors = act.pow(alpha) / weight.pow(1 - alpha)
    # A channel never seen active keeps its scale: nothing to move.
    return torch.where(act_absmax > 0, factors.clamp_min(_FLOOR), torch.ones_like(factors))


# name -> list of (operation, factors): "cols" multiplies the weight's columns, "vector" divides a
# norm weight, "rows" divides a weight's rows.
SmoothingOps = dict[str, list[tuple[str, torch.Tensor]]]


def smoothing_ops(names: set[str], n_layers: int, stats: Mapping[str, InputStats],
                  load: Callable[[str], torch.Tensor], alpha: float, sites: Sequence[ScaleSite],
                  selected: Callable[[str], bool] = lambda name: True, down_alpha: float | None = None) -> SmoothingOps:
    """The factors of every decoder block's ``sites`` (the architecture record's ``smoothing_sites``)
    whose Linears are all ``selected`` (planned w8a8) and calibrated; ``load`` reads a weight (for its
    column absmax). ``down_alpha``: the alpha of sites folded into a Linear's rows (up_proj -> down_proj;
    None: ``alpha``); an alpha of 0 leaves a site alone."""
    ops: SmoothingOps = {}
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}."
        for producer, how, linears in ((site.producer, site.how, site.linears) for site in sites):
            site_alpha = down_alpha if down_alpha is not None and how == "rows" else alpha
            if not site_alpha:
                continue
            weights = [f"{prefix}{linear}.weight" for linear in linears]
            if prefix + producer not in names or not all(w in names and w in stats and selected(w) for w in weights):
                continue
            column_absmax = torch.stack([load(w).to(torch.float32).abs().amax(dim=0) for w in weights]).amax(dim=0)
            factors = smoothing_factors(stats[weights[0]].absmax, column_absmax, site_alpha)
            ops.setdefault(prefix + producer, []).append((how, factors))
            for weight in weights:
                ops.setdefault(weight, []).append(("cols", factors))
    return ops


def apply_ops(tensor: torch.Tensor, operations: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The smoothed tensor, computed in float32 and returned in the tensor's dtype."""
    result = tensor.to(torch.float32)
    for how, factors in operations:
        factors = factors.to(result.device)
        if how == "cols":
            result = result * factors
        elif how == "rows":
            result = result / factors.unsqueeze(1)
        else:
            result = result / factors
    return result.to(tensor.dtype)


class SmoothedSource(Source):
    """``base`` with the smoothing applied to the tensors it changes, when they are loaded."""

    def __init__(self, base: Source, ops: SmoothingOps) -> None:
        super().__init__(spec=base.spec, description=base.description, config=base.config,
                         revision=base.revision, is_quantized=base.is_quantized)
        self.base = base
        self.ops = ops

    def tensors(self) -> list:
        return self.base.tensors()

    def load(self, name: str) -> torch.Tensor:
        tensor = self.base.load(name)
        operations = self.ops.get(name)
        return apply_ops(tensor, operations) if operations else tensor

    def tokenizer_dir(self):
        return self.base.tokenizer_dir()

    def extra_files(self) -> dict:
        return self.base.extra_files()
