"""A mixture of experts' fused experts, split back into one set of Linears per expert for calibration.

transformers 5 runs a block's experts from fused 3-D parameters (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) outside any nn.Linear, so hooks on Linears never see their inputs.
Checkpoints store one matrix per expert (``experts.3.w1``, ``experts.3.gate_proj``), which is also what
qtool quantizes; :class:`UnfusedExperts` holds those matrices as Linears named like the checkpoint
(after transformers' renamings) and computes what the fused module computes: each token's top-k experts,
``down(act(gate(x)) * up(x))`` weighted by the router. The calibration pass then observes each expert's
own inputs, and a method's new weights are used by the next forward pass like any Linear's.

Which stored matrix is the gate, the up and the down projection is read from transformers' own
load-time converters (the ones merging ``experts.*.w1`` and ``experts.*.w3`` into ``gate_up_proj``).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from qtool.errors import Unsupported

if TYPE_CHECKING:
    from qtool.architectures import FusedExperts

_FUSED = ("gate_up_proj", "down_proj")
_STORED_LEAF = re.compile(r"experts\.\*\.([^.]+)\.weight$")


def expert_leaves(converters: list[Any]) -> dict[str, tuple[str, ...]]:
    """{fused parameter: the per-expert matrices merged into it, in order} from transformers' converters:
    {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)} for Mixtral."""
    leaves: dict[str, tuple[str, ...]] = {}
    for converter in converters:
        targets = list(getattr(converter, "target_patterns", None) or [])
        fused = next((name for name in _FUSED if len(targets) == 1 and targets[0].endswith(f"experts.{name}")), None)
        stored = [_STORED_LEAF.search(pattern) for pattern in getattr(converter, "source_patterns", None) or []]
        if fused and stored and all(stored):
            leaves[fused] = tuple(match.group(1) for match in stored)
    return leaves


class _Expert(nn.Module):
    """``down(combine(gate(x), up(x)))``: ``combine`` is act(gate) * up, or the fused module's own gate
    function (gpt-oss's clamped SwiGLU)."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int,
                 combine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bias: bool = False) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        with torch.device("meta"):
            setattr(self, gate, nn.Linear(hidden, intermediate, bias=bias))
            setattr(self, up, nn.Linear(hidden, intermediate, bias=bias))
            setattr(self, down, nn.Linear(intermediate, hidden, bias=bias))
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.combine(gate(x), up(x)))


class UnfusedExperts(nn.ModuleList):
    """The experts of one block, one :class:`_Expert` each (children ``0`` .. ``E-1``).

    ``all_experts``: every token goes through every expert (their statistics see all tokens), while the
    output still sums only the router's choices. ``routed``: tokens the router sent to each expert
    since the last :meth:`take_routed`."""

    def __init__(self, experts: list[_Expert]) -> None:
        super().__init__(experts)
        self.all_experts = False
        self.routed = [0] * len(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            rows, slot = torch.where(top_k_index == index)
            self.routed[index] += int(rows.numel())
            if self.all_experts:
                result = expert(hidden_states)[rows]
            elif rows.numel():
                result = expert(hidden_states[rows])
            else:
                continue
            out.index_add_(0, rows, result * top_k_weights[rows, slot, None].to(result.dtype))
        return out

    def take_routed(self) -> list[int]:
        counts, self.routed = self.routed, [0] * len(self)
        return counts


def _interleaved_gate(module: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    # gpt-oss's experts apply their gate to gate and up interleaved column by column.
    return lambda gate, up: module._apply_gate(torch.stack((gate, up), dim=-1).flatten(-2))


def unfuse_experts(block: nn.Module, leaves: dict[str, tuple[str, ...]], fused: FusedExperts | None = None) -> list[str]:
    """Replace every fused experts module of ``block`` (on the meta device) by :class:`UnfusedExperts`;
    returns their module paths. ``fused``: the architecture's own layout of experts stored fused (gpt-oss:
    input-major, biased, its own gate function). Unsupported for fused experts of another layout or when
    neither transformers nor the record says how checkpoints store them."""
    paths = []
    for path, module in list(block.named_modules()):
        params = dict(module.named_parameters(recurse=False))
        if "gate_up_proj" not in params and "down_proj" not in params:
            continue
        gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
        if fused is not None and set(params) == set(fused.stored) and hasattr(module, "_apply_gate"):
            count, hidden, double_intermediate = gate_up.shape
            experts = [_Expert(fused.leaves, hidden, double_intermediate // 2, _interleaved_gate(module), bias=True)
                       for _ in range(count)]
        else:
            shaped = (gate_up is not None and down is not None and set(params) == set(_FUSED) and gate_up.dim() == 3
                      and down.dim() == 3 and hasattr(module, "act_fn"))
            names = (*leaves.get("gate_up_proj", ()), *leaves.get("down_proj", ()))
            if not shaped or len(names) != 3:
                raise Unsupported(f"calibration: the experts of {type(module).__name__} ({sorted(params)}) have no "
                                  "per-expert layout qtool can run; use --method rtn")
            count, double_intermediate, hidden = gate_up.shape
            act_fn = module.act_fn
            experts = [_Expert(names, hidden, double_intermediate // 2, lambda gate, up: act_fn(gate) * up)
                       for _ in range(count)]
        parent_path, _, leaf = path.rpartition(".")
        setattr(block.get_submodule(parent_path) if parent_path else block, leaf, UnfusedExperts(experts))
        paths.append(path)
    return paths
