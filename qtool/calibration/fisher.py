"""How much a change of each Linear weight costs the model's output distribution: the diagonal of the
Fisher information of every decoder Linear's weight, the output matrix and the embeddings, from one
forward and backward pass per calibration window.

To second order the KL divergence a small weight change dW adds is ``1/2 dW^T F dW``; keeping F's
diagonal, ``1/2 sum F_ij dW_ij^2`` with ``F_ij = E[(d log p(y) / dW_ij)^2]``, y the next tokens sampled
from the model's own distribution (the Fisher's definition: no labels from the text). The gradient is the
window's, summed over its positions, so a weight whose error reaches an output token through many
positions at once (a value projection under broad attention) is weighed as it acts. Per token of
calibration text, this predicts the KL divergence each quantized tensor adds (tests/test_sizing.py checks
it against the measured one): what --target-bpw / --max-size allocate bits by (qtool.sizing).

Memory is bounded as calibration's is: the backward pass runs block by block, from the output head down,
with the decoder blocks loaded one at a time (calibration's Skeleton). A forward pass first keeps every
block's input hidden states, for every window, in a temporary file the OS pages (blocks x tokens x hidden,
float32); then each block is run again on its kept inputs, one window at a time, and given the gradient
of its outputs, which yields its weights' gradients for that window and the gradient of its inputs, handed
to the block below. Each block's Fisher is finished (and handed to ``keep``) before the next block loads.
Mixtures of experts: experts run as one Linear set each (calibration's unfused experts), so each expert
gets its own Fisher.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qtool.sources.base import Source


@dataclass
class Sensitivity:
    fisher: dict[str, Any]   # weight name -> keep(E[(d log p / dW)^2] per element, per token; float32 CPU)
    tokens: int


def _paged(folder: Path, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor of ``shape`` backed by a file in ``folder`` (its pages leave memory when it is short)."""
    path = folder / "block-inputs.f32"
    count = math.prod(shape)
    with open(path, "wb") as handle:
        handle.truncate(count * 4)
    return torch.from_file(str(path), shared=True, size=count, dtype=torch.float32).view(shape)


def measure_sensitivity(source: Source, windows: torch.Tensor, *, device: str | torch.device = "cpu",
                        seed: int = 0, keep: Callable[[torch.Tensor], Any] = lambda fisher: fisher
                        ) -> Sensitivity:
    """The Fisher diagonal of every Linear weight of the decoder blocks, of the output matrix and of the
    input embeddings (tied embeddings once, with the gradient of both uses), by checkpoint weight name,
    over ``windows`` (n, seqlen) of token ids, next tokens sampled from the model (see module doc)."""
    from qtool.calibration.runner import BATCH_TOKENS, Skeleton, batches, block_output

    device = torch.device(device)
    skeleton = Skeleton(source, device)
    names = [info.name for info in source.tensors()]
    count, seqlen = windows.shape
    ids = windows.to(device)
    position_ids = torch.arange(seqlen, device=device).unsqueeze(0)
    n_layers = len(skeleton.layers)
    fisher: dict[str, Any] = {}
    tables: dict[Any, Any] = {}

    def block_inputs(index: int) -> tuple[nn.Module, dict[str, nn.Linear], dict[str, Any]]:
        block, linears = skeleton.block(index, source, [n for n in names if n.startswith(f"model.layers.{index}.")],
                                        device)
        with torch.no_grad():    # saved by autograd below: not inference tensors
            run = {"position_embeddings": skeleton.position_embeddings(index, probe, position_ids, tables),
                   "attention_mask": skeleton.attention_mask(index, seqlen, device), "position_ids": position_ids}
        return block, linears, run

    # float32 throughout (no reduced-precision products, unlike calibration's forwards): the sampled next
    # tokens would follow their rounding, and the plans with them.
    with tempfile.TemporaryDirectory(prefix="qtool-fisher-") as folder:
        embeddings = source.load(skeleton.embed_name).to(device=device, dtype=torch.float32)
        with torch.no_grad():
            hidden = nn.functional.embedding(ids, embeddings) * skeleton.embed_scale
        vocab, width = embeddings.shape
        probe = hidden[:1].clone()    # the rotary tables' dtype and device
        del embeddings
        inputs = _paged(Path(folder), (n_layers, *hidden.shape))
        outputs = torch.empty_like(hidden)
        for index in range(n_layers):
            block, _, run = block_inputs(index)
            inputs[index].copy_(hidden)
            with torch.no_grad():
                for part in batches(count, max(1, BATCH_TOKENS // seqlen)):
                    outputs[part] = block_output(block(hidden[part], **run))
            hidden, outputs = outputs, hidden
            skeleton.release(index)
        del outputs

        # The head: sampled next tokens, the gradient of the last block's outputs, the output matrix's Fisher.
        head = skeleton.head(source, device)
        output = head.lm_head.weight
        output.requires_grad_(True)
        output_fisher = torch.zeros_like(output)
        tied = not any(skeleton.model_name(name) == "lm_head.weight" for name in names)
        output_rows: list[torch.Tensor] = []    # tied: each window's output gradient at its tokens' rows
        generator = torch.Generator(device="cpu").manual_seed(seed)
        gradients = torch.empty_like(hidden)
        for window in range(count):
            given = hidden[window:window + 1].clone().requires_grad_(True)
            logits = head(input_ids=ids[window:window + 1], hidden_states=given).logits.float()[0]
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits, dim=-1).cpu(), 1, generator=generator)
            output.grad = None
            nn.functional.cross_entropy(logits, sampled.squeeze(-1).to(device), reduction="sum").backward()
            output_fisher.addcmul_(output.grad, output.grad)
            if tied:
                output_rows.append(output.grad[ids[window].unique()].clone())
            gradients[window] = given.grad[0]
        del hidden, output, logits
        head.to("meta")
        if not tied:
            fisher["lm_head.weight"] = keep(output_fisher.div_(ids.numel()).cpu())
            del output_fisher

        for index in reversed(range(n_layers)):
            block, linears, run = block_inputs(index)
            for module in linears.values():
                module.weight.requires_grad_(True)
            sums = {name: torch.zeros_like(module.weight) for name, module in linears.items()}
            for window in range(count):
                given = inputs[index, window:window + 1].to(device).requires_grad_(True)
                for module in linears.values():
                    module.weight.grad = None
                result = block_output(block(given, **run))
                result.backward(gradients[window:window + 1])
                for name, module in linears.items():
                    if module.weight.grad is not None:     # an expert no token of the window reached has none
                        sums[name].addcmul_(module.weight.grad, module.weight.grad)
                gradients[window] = given.grad[0]
            for name, total in sums.items():
                fisher[name] = keep(total.div_(ids.numel()).cpu())
            del block, linears, sums, result, given
            skeleton.release(index)
        del inputs

        # The embeddings: each window's gradient lands on its tokens' rows; a tied output matrix's gradient
        # at those rows is part of the same parameter's gradient, so its square's cross term is added there.
        embedding_fisher = output_fisher if tied else torch.zeros(vocab, width, device=device)
        for window in range(count):
            rows, where = ids[window].unique(return_inverse=True)
            gradient = torch.zeros(len(rows), width, device=device).index_add_(
                0, where, gradients[window] * skeleton.embed_scale)
            cross = 2 * output_rows[window] + gradient if tied else gradient
            embedding_fisher[rows] += gradient * cross
    fisher[skeleton.embed_name] = keep(embedding_fisher.div_(ids.numel()).cpu())
    return Sensitivity(fisher, int(ids.numel()))
