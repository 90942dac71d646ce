"""Perplexity and KL divergence, windowed the way llama.cpp's llama-perplexity does it.

Protocol (``tools/perplexity/perplexity.cpp``):

- The whole text is tokenized once, with BOS first when the tokenizer adds one.
- Default: consecutive, non-overlapping windows of ``ctx`` tokens; ``n = len(tokens) // ctx``
  windows, ``--chunks`` keeps the first ones. When the vocab adds BOS, the first token of every
  window is replaced by BOS. Only the second half is scored: the logits at positions
  ``ctx//2 .. ctx-2`` predict tokens ``ctx//2+1 .. ctx-1`` (``ctx - 1 - ctx//2`` tokens a window),
  so every scored token has at least ``ctx//2`` tokens of context.
- ``stride``: llama-perplexity's ``--ppl-stride`` variant. Windows of ``ctx`` tokens start every
  ``stride`` tokens and the last ``stride`` predictions of each are scored. Its BOS substitution
  happens after the window was evaluated, so it never reaches the model: no BOS here either.
- ppl = exp(mean NLL); its standard error is ``ppl * sqrt((E[nll^2] - E[nll]^2) / (N - 1))``.
- Against a baseline (``--kl-divergence``): per scored token, KL(P_base || P_model) over the
  whole vocabulary, top-1 agreement ("same top p"), the change of the probability of the right
  token (Δp) and the ppl ratio / difference with uncertainties from the covariance of the two
  NLL series, with llama.cpp's formulas. llama.cpp stores the baseline's log-probs as uint16 and
  drops terms with log p < -16; here both distributions are exact float32 (differences ~1e-5).

Both models run window by window over the same token batch, so nothing vocabulary-sized is
kept beyond the current batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from qtool import ui
from qtool.errors import BadArgument
from qtool.evaluation.model import LoadedModel


@dataclass(frozen=True)
class WindowPlan:
    ctx: int
    starts: list[int]          # token offset of each window
    first: int                 # first logit position scored; it predicts token first + 1
    bos_token_id: int | None   # put first in every window (llama.cpp with add_bos vocabularies)

    @property
    def windows(self) -> int:
        return len(self.starts)

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1 - self.first


def check_windows(ctx: int, chunks: int | None, stride: int | None) -> None:
    """--ctx / --chunks / --stride on their own (before any text or model is read)."""
    if ctx < 4:
        raise BadArgument(f"--ctx {ctx}: the window must hold at least 4 tokens")
    if chunks is not None and chunks < 1:
        raise BadArgument(f"--chunks {chunks}: must be at least 1")
    if stride is not None and not 0 < stride < ctx:
        raise BadArgument(f"--stride {stride}: must be between 1 and --ctx - 1 ({ctx - 1})")


def plan_windows(n_tokens: int, *, ctx: int = 512, chunks: int | None = None, stride: int | None = None,
                 bos_token_id: int | None = None) -> WindowPlan:
    """Window offsets for ``n_tokens`` tokens, as llama-perplexity picks them."""
    check_windows(ctx, chunks, stride)
    if stride is None:
        if n_tokens < 2 * ctx:
            raise BadArgument(f"the text has {n_tokens} tokens; --ctx {ctx} needs at least {2 * ctx}: "
                              "pass a longer --text or a smaller --ctx")
        n_windows = n_tokens // ctx
        if chunks is not None:
            n_windows = min(n_windows, chunks)
        return WindowPlan(ctx, [i * ctx for i in range(n_windows)], ctx // 2, bos_token_id)
    if n_tokens <= ctx:
        raise BadArgument(f"the text has {n_tokens} tokens; --ctx {ctx} needs more: "
                          "pass a longer --text or a smaller --ctx")
    n_windows = (n_tokens - ctx + stride - 1) // stride
    if chunks is not None:
        n_windows = min(n_windows, chunks)
    return WindowPlan(ctx, [i * stride for i in range(n_windows)], ctx - stride - 1, None)


def window_batch(tokens: torch.Tensor, plan: WindowPlan, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, ctx], targets [B, scored]) for the windows ``indices``."""
    offsets = torch.tensor([plan.starts[i] for i in indices], dtype=torch.long)
    positions = offsets[:, None] + torch.arange(plan.ctx, dtype=torch.long)[None, :]
    inputs = tokens[positions]
    targets = inputs[:, plan.first + 1:].clone()
    if plan.bos_token_id is not None:
        inputs[:, 0] = plan.bos_token_id
    return inputs, targets


def tokenize(model: LoadedModel, text: str) -> torch.Tensor:
    """The whole text as one token stream, BOS first when the tokenizer adds one (llama.cpp's add_bos)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if model.add_bos:
        ids = [model.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def window_log_probs(model: LoadedModel, inputs: torch.Tensor, first: int) -> torch.Tensor:
    """float32 log-probabilities [B, ctx - 1 - first, vocab] for the scored positions."""
    keep = inputs.shape[1] - first
    out = model.model(input_ids=inputs.to(model.device, non_blocking=True), logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def mean_and_uncertainty(total: float, total_sq: float, count: int) -> tuple[float, float]:
    """llama.cpp's (mean, standard error of the mean) from sums; 0 uncertainty for tiny samples."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    variance = total_sq / count - mean * mean
    return mean, (math.sqrt(variance / (count - 1)) if variance > 0 and count > 10 else 0.0)


def covariance(total_a: float, total_b: float, total_ab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (total_ab / count - (total_a / count) * (total_b / count)) / (count - 1)


@dataclass
class NllSeries:
    """Per-token negative log-likelihoods, kept (small: one float per scored token) for the stats."""
    parts: list[torch.Tensor] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def add(self, nll: torch.Tensor) -> None:
        values = nll.detach().reshape(-1).double().cpu()
        self.parts.append(values)
        self.total += float(values.sum())
        self.count += values.numel()

    def values(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0, dtype=torch.float64)

    @property
    def running_ppl(self) -> float:
        return math.exp(self.total / self.count) if self.count else float("nan")

    def ppl_and_stderr(self) -> tuple[float, float]:
        """llama-perplexity's final estimate: ppl and ppl * stderr(mean NLL)."""
        values = self.values()
        count = values.numel()
        mean = float(values.mean())
        ppl = math.exp(mean)
        variance = float((values * values).mean()) - mean * mean
        stderr = ppl * math.sqrt(variance / (count - 1)) if variance > 0 and count > 1 else 0.0
        return ppl, stderr


@dataclass
class DivergenceSeries:
    kld: list[torch.Tensor] = field(default_factory=list)
    p_diff: list[torch.Tensor] = field(default_factory=list)
    same_top: int = 0
    count: int = 0

    def add(self, kld: torch.Tensor, p_diff: torch.Tensor, same_top: torch.Tensor) -> None:
        self.kld.append(kld.detach().reshape(-1).double().cpu())
        self.p_diff.append(p_diff.detach().reshape(-1).double().cpu())
        self.same_top += int(same_top.sum())
        self.count += same_top.numel()


@dataclass
class Comparison:
    """What llama-perplexity --kl-divergence reports, for one model against the baseline."""
    ppl_ratio: float
    ppl_ratio_stderr: float
    ppl_delta: float
    ppl_delta_stderr: float
    delta_pct: float
    ln_ratio: float
    ln_ratio_stderr: float
    correlation: float            # of the two per-token NLL series (llama.cpp's Cor(ln PPL(Q), ln PPL(base)))
    mean_kld: float
    kld_stderr: float
    kld_median: float
    kld_p99: float
    kld_max: float
    top1_agreement: float         # fraction of scored positions where both models rank the same token first
    top1_stderr: float
    rms_dp: float                 # RMS of p_model(right token) - p_base(right token)
    rms_dp_stderr: float


def compare(nll: NllSeries, nll_base: NllSeries, divergence: DivergenceSeries) -> Comparison:
    values, base_values = nll.values(), nll_base.values()
    count = values.numel()
    log_ppl = mean_and_uncertainty(float(values.sum()), float((values * values).sum()), count)
    log_base = mean_and_uncertainty(float(base_values.sum()), float((base_values * base_values).sum()), count)
    cov = covariance(float(values.sum()), float(base_values.sum()), float((values * base_values).sum()), count)
    denominator = log_ppl[1] * log_base[1]
    correlation = cov / denominator if denominator > 0 else 0.0
    ln_ratio = log_ppl[0] - log_base[0]
    ln_ratio_stderr = math.sqrt(max(log_ppl[1] ** 2 + log_base[1] ** 2 - 2.0 * cov, 0.0))
    ppl, ppl_base = math.exp(log_ppl[0]), math.exp(log_base[0])
    ppl_unc, ppl_base_unc = ppl * log_ppl[1], ppl_base * log_base[1]
    delta_unc = math.sqrt(max(ppl_unc ** 2 + ppl_base_unc ** 2 - 2.0 * ppl * ppl_base * cov, 0.0))

    kld = torch.cat(divergence.kld)
    p_diff = torch.cat(divergence.p_diff)
    kl_mean, kl_unc = mean_and_uncertainty(float(kld.sum()), float((kld * kld).sum()), kld.numel())
    p_diff_sq = p_diff * p_diff
    mse, mse_unc = mean_and_uncertainty(float(p_diff_sq.sum()), float((p_diff_sq * p_diff_sq).sum()), p_diff.numel())
    rms = math.sqrt(mse)
    top1 = divergence.same_top / divergence.count
    top1_unc = math.sqrt(top1 * (1.0 - top1) / (divergence.count - 1)) if divergence.count > 1 else 0.0
    return Comparison(
        ppl_ratio=math.exp(ln_ratio), ppl_ratio_stderr=math.exp(ln_ratio) * ln_ratio_stderr,
        ppl_delta=ppl - ppl_base, ppl_delta_stderr=delta_unc, delta_pct=100.0 * (ppl / ppl_base - 1.0),
        ln_ratio=ln_ratio, ln_ratio_stderr=ln_ratio_stderr, correlation=correlation,
        mean_kld=kl_mean, kld_stderr=kl_unc, kld_median=float(kld.median()),
        kld_p99=float(torch.quantile(kld, 0.99)) if kld.numel() <= 16_000_000 else float("nan"),
        kld_max=float(kld.max()), top1_agreement=top1, top1_stderr=top1_unc,
        rms_dp=rms, rms_dp_stderr=0.5 / rms * mse_unc if rms > 0 else 0.0)


@dataclass
class PassResult:
    nll: NllSeries
    seconds: float                       # model forward + log-softmax time
    windows: int
    tokens_evaluated: int                # windows * ctx: what the model read
    base_nll: NllSeries | None = None
    base_seconds: float = 0.0
    divergence: DivergenceSeries | None = None


def run_windows(model: LoadedModel, tokens: torch.Tensor, plan: WindowPlan, *, batch_size: int = 1,
                baseline: LoadedModel | None = None, label: str | None = None) -> PassResult:
    """Score every window of ``plan`` with ``model`` (and ``baseline`` on the same inputs)."""
    if batch_size < 1:
        raise BadArgument(f"--batch-size {batch_size}: must be at least 1")
    if baseline is not None and baseline.vocab_size != model.vocab_size:
        raise BadArgument(f"--baseline {baseline.description} has {baseline.vocab_size} logits, "
                          f"{model.description} has {model.vocab_size}: KL divergence needs the same vocabulary")
    nll = NllSeries()
    base_nll = NllSeries() if baseline is not None else None
    divergence = DivergenceSeries() if baseline is not None else None
    seconds = base_seconds = 0.0
    if plan.windows and str(model.device) != "cpu":
        # Untimed first batch: CUDA's lazy initialisation (cuBLAS handles, kernel selection, the
        # allocator's first blocks) would otherwise be billed to the first window's tokens/s.
        inputs, _ = window_batch(tokens, plan, range(min(batch_size, plan.windows)))
        with torch.inference_mode():
            for warm in (model, baseline):
                if warm is not None:
                    window_log_probs(warm, inputs, plan.first)
                    _synchronize(warm.device)
    with torch.inference_mode(), ui.task(f"perplexity {label or model.description}", total=plan.windows) as progress:
        for begin in range(0, plan.windows, batch_size):
            indices = range(begin, min(begin + batch_size, plan.windows))
            inputs, targets = window_batch(tokens, plan, indices)
            started = time.perf_counter()
            log_probs = window_log_probs(model, inputs, plan.first)
            targets = targets.to(log_probs.device)
            token_nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
            _synchronize(model.device)
            seconds += time.perf_counter() - started
            nll.add(token_nll)
            if baseline is not None:
                started = time.perf_counter()
                base_log_probs = window_log_probs(baseline, inputs, plan.first).to(log_probs.device)
                _synchronize(baseline.device)
                base_seconds += time.perf_counter() - started
                base_token_nll = -base_log_probs.gather(-1, targets[..., None]).squeeze(-1)
                kld = (base_log_probs.exp() * (base_log_probs - log_probs)).sum(-1)
                same_top = base_log_probs.argmax(-1) == log_probs.argmax(-1)
                p_diff = torch.exp(-token_nll) - torch.exp(-base_token_nll)
                base_nll.add(base_token_nll)
                divergence.add(kld, p_diff, same_top)
                del base_log_probs
            del log_probs
            progress.advance(len(indices), status=f"ppl {nll.running_ppl:.4f}")
    return PassResult(nll=nll, seconds=seconds, windows=plan.windows, tokens_evaluated=plan.windows * plan.ctx,
                      base_nll=base_nll, base_seconds=base_seconds, divergence=divergence)
