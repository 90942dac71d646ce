"""How much a change of each Linear weight costs the model's output distribution: the diagonal of the
Fisher information of every Linear's weight and the embeddings, from one forward and backward pass per calibration
window.

To second order the KL divergence a small weight change dW adds is ``1/2 dW^T F dW``; keeping F's
diagonal, ``1/2 sum F_ij dW_ij^2`` with ``F_ij = E[(d log p(y) / dW_ij)^2]``, y the next tokens sampled
from the model's own distribution (the Fisher's definition: no labels from the text). The gradient is the
window's, summed over its positions, so a weight whose error reaches an output token through many
positions at once (a value projection under broad attention) is weighed as it acts. Per token of
calibration text, this predicts the KL divergence each quantized tensor adds (tests/test_sizing.py checks
it against the measured one): what --target-bpw / --max-size allocate bits by (qtool.sizing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Sensitivity:
    fisher: dict[str, torch.Tensor]   # weight name -> E[(d log p / dW)^2] per element, per token (float32, CPU)
    tokens: int


def measure_sensitivity(model: nn.Module, windows: torch.Tensor, *, seed: int = 0) -> Sensitivity:
    """The Fisher diagonal of every nn.Linear weight of ``model`` and of its input embeddings (named
    ``<module>.weight``; tied embeddings once, with the gradient of both uses), over ``windows`` (n,
    seqlen) of token ids, next tokens sampled from the model."""
    linears = {f"{name}.weight": module for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Embedding)) and module is not None}
    requires = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in linears.values():
        module.weight.requires_grad_(True)
    # One accumulator per parameter: a tied output matrix shares the embeddings' (and their gradient).
    by_parameter: dict[int, torch.Tensor] = {}
    fisher = {name: by_parameter.setdefault(id(module.weight), torch.zeros_like(module.weight, dtype=torch.float32))
              for name, module in linears.items()}
    owners = {id(module.weight): module for module in linears.values()}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    tokens = 0
    try:
        for window in windows:
            ids = window.unsqueeze(0).to(device)
            logits = model(input_ids=ids).logits.float()[0]
            with torch.no_grad():
                probabilities = torch.softmax(logits, dim=-1).cpu()
                sampled = torch.multinomial(probabilities, 1, generator=generator).squeeze(-1).to(device)
            for module in owners.values():
                module.weight.grad = None
            nn.functional.cross_entropy(logits, sampled, reduction="sum").backward()
            del logits, probabilities
            for key, module in owners.items():
                grad = module.weight.grad.float()
                by_parameter[key].addcmul_(grad, grad)
            tokens += int(ids.shape[1])
    finally:
        for module in linears.values():
            module.weight.grad = None
        for parameter, flag in zip(model.parameters(), requires):
            parameter.requires_grad_(flag)
    for value in by_parameter.values():
        value.div_(max(tokens, 1))
    return Sensitivity({name: value.cpu() for name, value in fisher.items()}, tokens)
