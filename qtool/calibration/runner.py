"""The calibration pass: decoder blocks one at a time, hooks on their Linear layers.

The samples are embedded once; then block i runs on the hidden states block i-1 produced. Only
one block's weights (loaded from the Source tensor by tensor) and two hidden-state buffers
(inputs and outputs of the current block, samples x seqlen x hidden, fp32; a true-sequential walk
keeps a third, the attention's output, see _FinalOutputs) are in memory at any time, never the
whole model.

:func:`walk_blocks` is the engine: it yields each block after collecting the statistics of its
Linear inputs; whoever consumes it may replace the block's Linear weights by quantized ones
before asking for the next block, and the block is then run again so that the next block sees
the quantized outputs (GPTQ's sequential mode). :func:`calibrate` consumes it without changing
anything and returns the statistics; :mod:`qtool.calibration.methods` quantizes with it.
"""
from __future__ import annotations

import contextlib
import os
import inspect
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qtool import ui
from qtool.architectures import block_record, merged_expert_name
from qtool.atomic import STATS_FORMAT
from qtool.evaluation.model import load_conversions, build_on_meta, checked_hf_config, hf_config, stored_buffers  # noqa: F401 - hf_config re-exported
from qtool.calibration import distributed
from qtool.calibration.experts import expert_leaves, unfuse_experts
from qtool.calibration.data import DEFAULT_CALIB, DEFAULT_SAMPLES, DEFAULT_SEQLEN, CalibrationSet, calibration_set
from qtool.tokenizer import load_tokenizer
from qtool.calibration.observers import InputObserver, InputStats
from qtool.errors import BadArgument, CorruptFile, NotFound, QtoolError, Unsupported
from qtool.sources.base import Source
from qtool.sources.config_check import check_source_config

BATCH_TOKENS = 4096


@dataclass
class LayerRecord:
    layer: int
    seconds: float
    tokens: int
    errors: dict[str, float] = field(default_factory=dict)   # weight name -> relative layer-output error
    # A mixture of experts' block: its experts (``model.layers.0.mlp.experts``) -> tokens the router sent each.
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class CalibrationStats:
    model: str
    calib: str
    samples: int
    seqlen: int
    seed: int
    linears: dict[str, InputStats]            # weight name (model.layers.0.mlp.down_proj.weight) -> stats
    records: list[LayerRecord] = field(default_factory=list)
    saved_hessian: bool = False               # X^T X went to the file (calibrate(output=...)), not kept here
    all_experts: bool = False                 # every token through every expert (see walk_blocks)

    def save(self, path: str | Path) -> Path:
        return save_stats(self, path)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly view (no tensors) for --json."""
        return {
            "model": self.model, "calib": self.calib, "samples": self.samples, "seqlen": self.seqlen,
            "seed": self.seed, "linears": len(self.linears),
            "has_hessian": self.saved_hessian or any(s.hessian is not None for s in self.linears.values()),
            "all_experts": self.all_experts,
            "layers": [asdict(r) for r in self.records],
        }


@dataclass
class BlockStep:
    """One decoder block between its statistics pass and its output pass."""

    index: int
    n_layers: int
    linears: dict[str, nn.Linear]         # weight name -> module (replace .weight to quantize)
    stats: dict[str, InputStats]          # weight name -> statistics of its inputs
    seconds: float = 0.0                  # time of the statistics pass
    modified: bool = False                # set by the consumer after changing weights
    last_of_block: bool = True            # per-group walks: the block's last group
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)   # experts -> tokens routed to each


class Skeleton:
    """The architecture on the meta device: block modules are materialized one at a time."""

    def __init__(self, source: Source, device: torch.device) -> None:
        self.config = checked_hf_config(source)
        model = build_on_meta(source, self.config, dtype=torch.float32, keep_buffers=False)
        base = getattr(model, "model", None)
        layers = getattr(base, "layers", None)
        if layers is None or not hasattr(base, "embed_tokens"):
            raise Unsupported(f"{type(model).__name__}: calibration supports decoder models with model.layers")
        self.layers = layers
        self.model = model
        self.embed_name = "model.embed_tokens.weight"
        # Gemma scales its embeddings by sqrt(hidden_size) inside the embedding module; Granite in its
        # model's forward, which the blocks run here without.
        self.embed_scale = float(getattr(base.embed_tokens, "scalar_embed_scale", 1.0))
        record = block_record(source.config)
        if record is not None and record.embedding_multiplier:
            self.embed_scale *= float(getattr(self.config, record.embedding_multiplier, None) or 1.0)
        rotary = getattr(base, "rotary_emb", None)
        # Rotary tables are computed at construction: build a real one on the device.
        self.rotary = type(rotary)(config=self.config).to(device) if rotary is not None else None
        # Gemma 3 keeps one table per layer type (sliding / full attention) and takes the type as an argument.
        self.rotary_per_layer_type = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        # sdpa makes a missing mask causal by itself; eager attention (Gemma 2) needs the mask written out.
        self.needs_mask = model.config._attn_implementation != "sdpa"
        # Checkpoint names -> the model's: transformers' load-time renamings (Mixtral's block_sparse_moe.
        # -> mlp.); fused experts become one Linear per expert, named as the checkpoint stores them.
        self.renamings, converters = load_conversions(model)
        leaves = expert_leaves(converters)
        fused = record.fused_experts if record is not None else None
        self.experts = [unfuse_experts(layer, leaves, fused) for layer in layers]

    def model_name(self, name: str) -> str:
        for renaming in self.renamings:
            name, _ = renaming.rename_source_key(name)
        return name

    def position_embeddings(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                            cache: dict[Any, Any]) -> Any:
        """Block ``index``'s rotary (cos, sin), each distinct table computed once."""
        if self.rotary is None:
            return None
        layer_type = self.config.layer_types[index] if self.rotary_per_layer_type else None
        if layer_type not in cache:
            cache[layer_type] = (self.rotary(hidden[:1], position_ids, layer_type) if self.rotary_per_layer_type
                                 else self.rotary(hidden[:1], position_ids))
        return cache[layer_type]

    def attention_mask(self, index: int, seqlen: int, device: torch.device) -> torch.Tensor | None:
        """None where the attention is sdpa and plainly causal over ``seqlen`` tokens; else the additive
        causal mask (1, 1, seqlen, seqlen), limited to the block's sliding window if it has one."""
        window = getattr(getattr(self.layers[index], "self_attn", None), "sliding_window", None)
        sliding = isinstance(window, int) and window < seqlen
        if not self.needs_mask and not sliding:
            return None
        query = torch.arange(seqlen, device=device).unsqueeze(1)
        key = torch.arange(seqlen, device=device).unsqueeze(0)
        allowed = (key <= query) & ((query - key < window) if sliding else True)
        mask = torch.zeros(seqlen, seqlen, device=device)
        return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)[None, None]

    def block(self, index: int, source: Source, names: list[str],
              device: torch.device) -> tuple[nn.Module, dict[str, nn.Linear]]:
        """Block ``index`` with the checkpoint's tensors, and its Linears by checkpoint weight name."""
        block = self.layers[index]
        prefix = f"model.layers.{index}."
        params = dict(block.named_parameters())
        buffers = stored_buffers(block)     # stored too (DeepSeek-V3's routing bias)
        stored_as: dict[str, str] = {}      # the block's parameter -> the checkpoint tensor it holds
        for name in names:
            local = name[len(prefix):]
            if local not in params and local not in buffers:
                local = self.model_name(name)[len(prefix):]
            target = params.get(local, buffers.get(local))
            if target is None:
                continue
            tensor = source.load(name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise CorruptFile(f"tensor {name} has shape {tuple(tensor.shape)}, the config says "
                                  f"{tuple(target.shape)}")
            module_name, _, leaf = local.rpartition(".")
            owner = block.get_submodule(module_name)
            if local in params:
                owner._parameters[leaf] = nn.Parameter(tensor.to(device=device, dtype=torch.float32),
                                                       requires_grad=False)
            else:
                owner._buffers[leaf] = tensor.to(device=device, dtype=torch.float32)
            stored_as[local] = name
        missing = [f"{prefix}{n}" for n, p in (*block.named_parameters(), *stored_buffers(block).items())
                   if p.device.type == "meta"]
        if missing:
            raise CorruptFile(f"the checkpoint has no tensor {missing[0]} (needed by block {index})")
        block.eval()
        linears = {stored_as.get(f"{name}.weight", f"{prefix}{name}.weight"): module
                   for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        return block, linears

    def routed_tokens(self, index: int, linears: dict[str, nn.Linear]) -> dict[str, list[int]]:
        """{experts as the checkpoint names them (``model.layers.0.block_sparse_moe.experts``): tokens the
        router sent to each} since the last call."""
        block = self.layers[index]
        stored = {id(module): name for name, module in linears.items()}
        counts = {}
        for path in self.experts[index]:
            experts = block.get_submodule(path)
            first = next(module for module in experts[0].modules() if isinstance(module, nn.Linear))
            counts[stored[id(first)].rpartition(".experts.")[0] + ".experts"] = experts.take_routed()
        return counts

    def route_all(self, index: int, on: bool) -> None:
        for path in self.experts[index]:
            self.layers[index].get_submodule(path).all_experts = on

    def release(self, index: int) -> None:
        self.layers[index].to("meta")

    def head(self, source: Source, device: torch.device) -> nn.Module:
        """The model's output head on ``device``: called with the last block's hidden states as
        ``hidden_states`` (batch, seqlen, hidden), it returns the logits by the model's own forward (its
        final norm, output matrix, and any logit scaling or soft-capping). Its ``lm_head.weight`` is the
        embeddings' parameter when the checkpoint has no output matrix (tied)."""
        norm = getattr(self.model.model, "norm", None)
        if norm is None or not hasattr(self.model, "lm_head"):
            raise Unsupported(f"{type(self.model).__name__}: no final norm and output matrix (model.norm, lm_head)")
        stored = {self.model_name(info.name): info.name for info in source.tensors()}
        for module, prefix in ((norm, "model.norm."), (self.model.lm_head, "lm_head.")):
            for leaf, parameter in list(module.named_parameters(recurse=False)):
                name = stored.get(prefix + leaf, self.embed_name if prefix + leaf == "lm_head.weight" else None)
                if name is None:
                    raise CorruptFile(f"the checkpoint has no tensor {prefix}{leaf}")
                tensor = source.load(name).to(device=device, dtype=torch.float32)
                if tuple(tensor.shape) != tuple(parameter.shape):
                    raise CorruptFile(f"tensor {name} has shape {tuple(tensor.shape)}, the config says "
                                      f"{tuple(parameter.shape)}")
                module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        self.model.model = _GivenHidden(norm)
        return self.model


class _GivenHidden(nn.Module):
    """Stands in for the decoder under the output head: returns the normed hidden states it is called with."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, *args: Any, hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import MoeModelOutputWithPast   # the widest: MoE heads read router_logits

        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states))


def _cpu_has_bf16_products() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16): oneDNN then runs float32
    products on bfloat16 inputs with float32 sums, 4x faster; elsewhere it would only emulate them."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


@contextlib.contextmanager
def forward_precision(device: torch.device) -> Iterator[None]:
    """Calibration forwards (and their X^T X) with reduced-precision inputs to the matrix products and
    float32 sums: TF32 on a GPU (3x faster GPTQ calibration on an H100 for the same quality, SmolLM2
    int4 GPTQ: WikiText-2 +12.72% / KLD 0.1478 against +12.60% / 0.1484 in float32), bfloat16 on a CPU
    that has it in hardware (docs/PERFORMANCE.md "GPTQ on two CPU cores"). QTOOL_FLOAT32_FORWARDS=1 keeps float32.
    GPTQ's own products never run under it."""
    if os.environ.get("QTOOL_FLOAT32_FORWARDS") == "1":
        yield
        return
    if device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        return
    if device.type != "cpu" or not _cpu_has_bf16_products():
        yield
        return
    previous_cpu = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = previous_cpu


class _FinalOutputs:
    """Outputs of a block's children (self_attn, mlp, ...) whose every Linear is final, kept per batch and
    reused by the block's later passes: a true-sequential walk runs the block once per group, and from
    the pass after o_proj's the attention's output no longer changes (its input is the block's, its
    weights are quantized). Children without a Linear under them (norms) are cheap and not kept. A
    child's input depends only on the Linears that run before it, which the walk finishes first. The
    kept output is handed back as it is: transformers' blocks add it to the residual out of place (the
    true-sequential test of tests/test_calib.py checks every architecture's statistics exactly)."""

    def __init__(self, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self.block = block
        by_module = {module: name for name, module in linears.items()}
        # Each child's Linears, by the names the walk's groups use.
        self.children = {name: [by_module[m] for m in child.modules() if m in by_module]
                         for name, child in block.named_children()}
        self.kept: dict[str, dict[int, Any]] = {}
        self.part = 0        # the batch the block is running now

    @contextlib.contextmanager
    def reused(self, final: set[str], keep: bool = True) -> Iterator[None]:
        """Within: every child whose Linears are all in ``final`` returns its kept output for the batch
        (``keep``: and keeps the output it computes, for the passes to come)."""
        patched = []
        for name, names in self.children.items():
            if names and all(n in final for n in names):
                child = self.block.get_submodule(name)
                child.forward = self._memo(name, child.forward, keep)
                patched.append(child)
        try:
            yield
        finally:
            for child in patched:
                del child.forward

    def _memo(self, name: str, forward: Any, keep: bool) -> Any:
        store = self.kept.setdefault(name, {})

        def memo(*args: Any, **kwargs: Any) -> Any:
            if self.part in store:
                return store[self.part]
            result = forward(*args, **kwargs)
            if keep:
                store[self.part] = result
            return result
        return memo


def block_output(result: Any) -> torch.Tensor:
    """A decoder block's hidden states, whether it returns them alone or first in a tuple."""
    return result[0] if isinstance(result, tuple) else result


def batches(total: int, batch: int) -> list[slice]:
    return [slice(start, min(start + batch, total)) for start in range(0, total, batch)]


def run_block(block: nn.Module, hidden: torch.Tensor, out: torch.Tensor, position_embeddings: Any,
               position_ids: torch.Tensor, batch: int, attention_mask: torch.Tensor | None = None,
               memo: _FinalOutputs | None = None) -> None:
    with forward_precision(hidden.device):
        for number, part in enumerate(batches(hidden.shape[0], batch)):
            if memo is not None:
                memo.part = number
            result = block(hidden[part], attention_mask=attention_mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
            out[part] = block_output(result)


class _Enough(Exception):
    """Raised by a hook once a pass has seen what it needs: the rest of the block's forward is skipped."""


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Enough


def _observe(block: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, outputs: torch.Tensor | None,
             position_embeddings: Any, position_ids: torch.Tensor, batch: int, *, want_hessian: bool,
             device: torch.device, seed: int, attention_mask: torch.Tensor | None = None,
             first_group_only: bool = False, stop_at: dict[str, nn.Linear] | None = None,
             hessian_on_device: bool = False, memo: _FinalOutputs | None = None,
             experts: bool = False) -> tuple[dict[str, InputStats], list[list[str]]]:
    """Run ``block`` over ``hidden`` with hooks on ``linears``: the statistics of each one's inputs,
    and the Linears grouped by shared input in the order the forward pass calls them (q/k/v, o,
    gate/up, down). ``outputs``: where to write the block's outputs (None: not needed).
    ``first_group_only``: statistics of the first group alone (the groups are all found).
    ``stop_at``: Linears the forward pass reaches only after ``linears``: there each batch's pass
    stops (o_proj's statistics need q/k/v and the attention, not the MLP). ``hessian_on_device``:
    see InputObserver.finish. ``memo``: the batch number goes there. ``experts``: the block routes
    tokens to experts (every batch of a first-group pass then runs whole: it counts their tokens)."""
    if outputs is not None and stop_at:
        raise ValueError("a pass that stops early has no block outputs")
    observers: dict[str, InputObserver] = {}
    shared_with: dict[str, str] = {}
    seen_inputs: dict[int, tuple[torch.Tensor, str]] = {}
    groups: dict[str, list[str]] = {}

    # Once every Linear in ``enough`` was called in a batch, the rest of the block is skipped (a pass
    # for statistics alone; the first batch of a first-group pass runs whole: it finds the groups).
    enough: set[str] = set()
    called: set[str] = set()

    def make_hook(weight_name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            observe(module, args)
            called.add(weight_name)
            if enough and enough <= called:
                raise _Enough

        def observe(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if first_group_only and seen_inputs and id(x) not in seen_inputs:
                # Another input than the first group's: only its group is noted.
                seen_inputs[id(x)] = (x, weight_name)
                shared_with.setdefault(weight_name, weight_name)
                groups.setdefault(weight_name, [weight_name])
                return
            # Linears fed the very same tensor (q/k/v, gate/up) share one observer.
            known = seen_inputs.get(id(x))
            if known is not None and known[0] is x:
                shared_with.setdefault(weight_name, known[1])
                if shared_with[weight_name] != weight_name:
                    if weight_name not in groups[known[1]]:
                        groups[known[1]].append(weight_name)
                    return
            else:
                seen_inputs[id(x)] = (x, weight_name)
                shared_with.setdefault(weight_name, weight_name)
            groups.setdefault(weight_name, [weight_name])
            if weight_name not in observers:
                observers[weight_name] = InputObserver(module.in_features, want_hessian=want_hessian,
                                                       device=device, seed=seed)
            observers[weight_name].update(x)
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in linears.items()]
    handles += [module.register_forward_pre_hook(_stop) for module in (stop_at or {}).values()]
    try:
        with torch.inference_mode(), forward_precision(device):
            for number, part in enumerate(batches(hidden.shape[0], batch)):
                seen_inputs.clear()
                called.clear()
                if memo is not None:
                    memo.part = number
                if outputs is None and not experts and not enough:
                    if not first_group_only:
                        enough = set(linears)
                    elif groups:
                        enough = set(next(iter(groups.values())))
                try:
                    result = block(hidden[part], attention_mask=attention_mask, position_ids=position_ids,
                                   position_embeddings=position_embeddings)
                except _Enough:
                    continue
                if outputs is not None:
                    outputs[part] = block_output(result)
            seen_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    finished = {name: observer.finish(hessian_on_device) for name, observer in observers.items()}
    stats = {name: finished[shared_with[name]] for name in linears
             if name in shared_with and shared_with[name] in finished}
    # One group per matrix of all experts (every expert's gate/up, then every down_proj), not one per
    # expert: a true-sequential walk then costs two forward passes for the experts, not two per expert.
    by_matrix: dict[tuple[str, ...], list[str]] = {}
    for group in groups.values():
        key = tuple(sorted((merged_expert_name(name) or (name, 0))[0] for name in group))
        by_matrix.setdefault(key, []).extend(group)
    return stats, list(by_matrix.values())


def _reached_after(later_groups: list[list[str]], linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    """The Linears of later groups whose call means the earlier groups are done: not experts (a block
    calls one expert's gate/up, then its down, then the next expert's)."""
    return {name: linears[name] for group in later_groups for name in group if merged_expert_name(name) is None}


def walk_blocks(source: Source, calib: CalibrationSet, *, device: str | torch.device = "cpu",
                want_hessian: bool = True, seed: int = 0, per_group: bool = False,
                all_experts: bool = False, hessian_on_device: bool = False) -> Iterator[BlockStep]:
    """Yield every decoder block with the statistics of its Linear inputs (see module doc).

    Mixtures of experts: each expert's Linears see the tokens the router sends it (``all_experts``:
    every token, for the statistics only; the block's output still follows the router). An expert no
    token reached has no statistics; it is yielded all the same (with the block's last group).

    ``per_group``: yield each block once per group of Linears sharing an input, in forward order
    (q/k/v, then o, then gate/up, then down), each with statistics taken after the consumer changed
    the earlier groups: o_proj's inputs come from the quantized q/k/v, down_proj's from the
    quantized gate/up (GPTQ's "true sequential" order). Costs one more forward pass per group.

    The architecture is built (and its config checked) when this is called, not at the first step,
    so a config that cannot be used is refused before any progress is shown. ``hessian_on_device``:
    the statistics' X^T X stay on ``device`` (for a method using them there), the rest on the CPU."""
    device = torch.device(device)
    skeleton = Skeleton(source, device)
    return _walk(skeleton, source, calib, device=device, want_hessian=want_hessian, seed=seed, per_group=per_group,
                 all_experts=all_experts, hessian_on_device=hessian_on_device)


def _walk(skeleton: Skeleton, source: Source, calib: CalibrationSet, *, device: torch.device, want_hessian: bool,
          seed: int, per_group: bool, all_experts: bool, hessian_on_device: bool) -> Iterator[BlockStep]:
    names = [info.name for info in source.tensors()]
    n_layers = len(skeleton.layers)
    if distributed.active() and any(skeleton.experts):
        raise Unsupported("torchrun: calibrating a mixture of experts over several processes is not supported "
                          "yet (ranks route tokens to different experts); run one process")
    tokens = distributed.local_windows(calib.tokens).to(device)     # this rank's share (all in one process)
    samples, seqlen = tokens.shape
    batch = max(1, BATCH_TOKENS // seqlen)

    with torch.inference_mode():
        embedding = source.load(skeleton.embed_name).to(device=device, dtype=torch.float32)
        hidden = nn.functional.embedding(tokens, embedding)
        if skeleton.embed_scale != 1.0:
            hidden *= skeleton.embed_scale
        del embedding
        position_ids = torch.arange(seqlen, device=device).unsqueeze(0)
        rotary_tables: dict[Any, Any] = {}
        outputs = torch.empty_like(hidden)

    for index in range(n_layers):
        prefix = f"model.layers.{index}."
        block, linears = skeleton.block(index, source, [n for n in names if n.startswith(prefix)], device)
        skeleton.route_all(index, all_experts)
        with torch.inference_mode():
            position_embeddings = skeleton.position_embeddings(index, hidden, position_ids, rotary_tables)
        attention_mask = skeleton.attention_mask(index, seqlen, device)
        memo = _FinalOutputs(block, linears) if per_group else None
        run = dict(position_embeddings=position_embeddings, position_ids=position_ids, batch=batch,
                   want_hessian=want_hessian, device=device, seed=seed + index, attention_mask=attention_mask,
                   hessian_on_device=hessian_on_device, memo=memo, experts=bool(skeleton.experts[index]))
        started = time.perf_counter()
        # Per group: this pass finds the groups and observes the first; each later group is observed
        # after the earlier ones changed, in a pass that stops where the next group starts, and the
        # block's outputs come from one last pass.
        stats, groups = _observe(block, linears, hidden, None if per_group else outputs, **run,
                                 first_group_only=per_group)
        expert_tokens = skeleton.routed_tokens(index, linears)
        if per_group:
            seen = {name for group in groups for name in group}
            unseen = [name for name in linears if name not in seen]   # experts no token reached
            groups = [*groups[:-1], groups[-1] + unseen] if groups else [unseen]
        steps = ([(linears, stats)] if not per_group else
                 [({n: linears[n] for n in group}, {n: stats[n] for n in group if n in stats}) for group in groups])
        modified = False
        for number, (step_linears, step_stats) in enumerate(steps):
            if number > 0:
                started = time.perf_counter()
                with memo.reused(final={name for group in groups[:number] for name in group}):
                    step_stats = _observe(block, step_linears, hidden, None, **run,
                                          stop_at=_reached_after(groups[number + 1:], linears))[0]
                skeleton.routed_tokens(index, linears)     # the counts are the first pass's
            step = BlockStep(index, n_layers, step_linears, step_stats, time.perf_counter() - started,
                             last_of_block=number == len(steps) - 1, expert_tokens=expert_tokens)
            yield step
            modified = modified or step.modified
        if per_group or modified:
            with torch.inference_mode(), (memo.reused(final=set(linears), keep=False) if memo
                                          else contextlib.nullcontext()):
                run_block(block, hidden, outputs, position_embeddings, position_ids, batch, attention_mask, memo)
        hidden, outputs = outputs, hidden
        skeleton.release(index)
        del block, linears, stats, step, memo


def calibrate(source: Source, *, calib: str | Path = DEFAULT_CALIB, samples: int = DEFAULT_SAMPLES,
              seqlen: int = DEFAULT_SEQLEN, seed: int = 0, device: str = "cpu", want_hessian: bool = True,
              calib_set: CalibrationSet | None = None, output: str | Path | None = None,
              all_experts: bool = False) -> CalibrationStats:
    """Statistics of every decoder-block Linear input over the calibration samples (a mixture of
    experts: of each expert's, and how many tokens the router sent each; ``all_experts``: see
    :func:`walk_blocks`).

    ``output``: also save them there, block by block (``StatsFile``): each block's tensors go to
    disk when the block is done, and the returned statistics keep only the per-channel vectors, so
    memory holds one block's X^T X instead of the whole model's (3.9 GB for a 1.1B Llama)."""
    check_source_config(source)   # before the layer count below is read from it
    if calib_set is None:
        calib_set = calibration_set(calib, load_tokenizer(source, "calibration"), samples=samples,
                                    seqlen=seqlen, seed=seed)
    linears: dict[str, InputStats] = {}
    records: list[LayerRecord] = []
    n_layers = int(source.config.get("num_hidden_layers") or 0)
    steps = walk_blocks(source, calib_set, device=device, want_hessian=want_hessian, seed=seed,
                        all_experts=all_experts)
    with (StatsFile(output) if output is not None else contextlib.nullcontext()) as writer:
        with ui.task(f"calibrating {source.description}", total=n_layers or None) as progress:
            started = time.perf_counter()
            for step in steps:
                if writer is None:
                    linears.update(step.stats)
                else:
                    writer.add(step.stats)
                    linears.update({name: replace(item, hessian=None, abs_sample=None)
                                    for name, item in step.stats.items()})
                seconds = time.perf_counter() - started
                records.append(LayerRecord(step.index, round(seconds, 3), int(calib_set.tokens.numel()),
                                           expert_tokens=step.expert_tokens))
                progress.advance(1, status=f"layer {step.index + 1}/{step.n_layers} {seconds:.1f}s")
                started = time.perf_counter()
        stats = CalibrationStats(source.description, calib_set.description, calib_set.samples, calib_set.seqlen,
                                 seed, linears, records, saved_hessian=writer is not None and want_hessian,
                                 all_experts=all_experts)
        if writer is not None:
            writer.finish(stats)
    return stats


class StatsFile:
    """A statistics file written as the statistics come: ``add`` appends each Linear's tensors to a
    data file beside the output (Linears sharing inputs share them, stored once), ``finish`` writes
    the safetensors header (offsets, and the JSON metadata only known at the end) in front of them
    into a staged file and renames it into place. Used as a context manager, it leaves nothing behind
    when the block raises before ``finish``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._data_path = self.path.with_name(f".{self.path.name}.qtool-data")
        self._staged = self.path.with_name(f".{self.path.name}.qtool-tmp")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, Any] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self._finished = False

    def __enter__(self) -> StatsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self._abort()

    def add(self, linears: dict[str, InputStats]) -> None:
        site_of: dict[int, str] = {}
        for name, item in linears.items():
            site = site_of.setdefault(id(item), name)
            entry: dict[str, Any] = {"site": site}
            if site == name:
                for key in _TENSOR_FIELDS:
                    value = getattr(item, key)
                    if value is not None:
                        self._append(f"{name}.{key}", value)
                entry.update(in_features=item.in_features, tokens=item.tokens, act_min=item.act_min,
                             act_max=item.act_max, percentiles=item.percentiles)
            self._entries[name] = entry

    def _append(self, key: str, tensor: torch.Tensor) -> None:
        from qtool.sinks.safetensors_io import DTYPE_NAMES

        tensor = tensor.detach().contiguous().cpu()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        self._data.write(memoryview(raw))
        self._header[key] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self._offset, self._offset + raw.size]}
        self._offset += raw.size

    def finish(self, stats: CalibrationStats) -> Path:
        import shutil

        self._data.close()
        info = {"model": stats.model, "calib": stats.calib, "samples": stats.samples, "seqlen": stats.seqlen,
                "seed": stats.seed, "linears": self._entries, "records": [asdict(r) for r in stats.records],
                "all_experts": stats.all_experts}
        metadata = {"format": STATS_FORMAT, "stats": json.dumps(info)}
        header = json.dumps({"__metadata__": metadata, **self._header}, separators=(",", ":")).encode("utf-8")
        header += b" " * (-len(header) % 8)       # tensor data 8-byte aligned, as safetensors writes it
        with open(self._staged, "wb") as out, open(self._data_path, "rb") as data:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(data, out, 16 * 2**20)
        self._data_path.unlink()
        self._staged.replace(self.path)
        self._finished = True
        return self.path

    def _abort(self) -> None:
        self._data.close()
        for leftover in (self._data_path, self._staged):
            leftover.unlink(missing_ok=True)


_TENSOR_FIELDS = ("absmax", "mean_square", "hessian", "abs_sample")


def save_stats(stats: CalibrationStats, path: str | Path) -> Path:
    """Write the statistics as one safetensors file; Linears sharing inputs share tensors (stored once)."""
    with StatsFile(path) as writer:
        writer.add(stats.linears)
        return writer.finish(stats)


def load_stats(path: str | Path) -> CalibrationStats:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"--stats {path}: no such file; make one with `qtool calibrate MODEL -o {path.name}`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATS_FORMAT:
                raise BadArgument(f"--stats {path}: not a qtool calibration statistics file "
                                  "(make one with `qtool calibrate`)")
            info = json.loads(metadata["stats"])
            keys = set(handle.keys())
            sites: dict[str, InputStats] = {}
            linears: dict[str, InputStats] = {}
            for name, entry in info["linears"].items():
                site = entry["site"]
                if site not in sites:
                    head = info["linears"][site]
                    values = {key: handle.get_tensor(f"{site}.{key}") if f"{site}.{key}" in keys else None
                              for key in _TENSOR_FIELDS}
                    sites[site] = InputStats(head["in_features"], head["tokens"], values["absmax"],
                                             values["mean_square"], head["act_min"], head["act_max"],
                                             head["percentiles"], values["hessian"], values["abs_sample"])
                linears[name] = sites[site]
    except QtoolError:
        raise
    except Exception as exc:  # safetensors' SafetensorError, bad JSON, missing keys: all a broken file
        raise CorruptFile(f"--stats {path}: unreadable statistics file ({type(exc).__name__}); "
                          "recreate it with `qtool calibrate`") from None
    records = [LayerRecord(**r) for r in info.get("records", [])]
    return CalibrationStats(info["model"], info["calib"], info["samples"], info["seqlen"], info["seed"],
                            linears, records, all_experts=bool(info.get("all_experts", False)))
