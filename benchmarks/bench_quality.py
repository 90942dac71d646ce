"""Quality per bit of 4-bit recipes on SmolLM2-135M: llama.cpp's numbers (issue 6) and qtool's.

    python benchmarks/bench_quality.py [--samples 32] [--seqlen 512] [--chunks 40] [--ctx 512]
                                       [--recipes NAME,...] [--no-llamacpp] [--sequential]

``make bench-quality`` runs the best recipe (``gptq-q4_0-down-q4_k-ts``, the one
``configs/gguf-q4_0-gptq.yaml --method gptq`` writes) with round to nearest and imatrix Q4_0 beside
it: ``--recipes rtn-q4_0,imatrix-q4_0,gptq-q4_0-down-q4_k-ts --samples 128 --sequential``.

Calibration: ``../shared/data/calibration/groups_merged.txt`` (``--calib``), seeded windows; the
statistics pass (with X^T X) runs once and is cached under ``.bench/quality/``. Evaluation:
WikiText-2 test (``../shared/data/wikitext-2-raw/wiki.test.raw``), windows of ``--ctx`` tokens,
``--chunks`` windows, second half scored (llama-perplexity's protocol), through qtool.evaluation on
the dequantized weights of each recipe. GGUF recipes are also written as GGUF files and scored by
llama.cpp itself (llama-cpp-python, same windows, llama.cpp's own tokenization) to confirm.

Bits per weight are over the Linear weights of the decoder blocks (as in issue 6's table), from
the bytes the sinks write for them. A rich table goes to stderr, the JSON to
``$QTOOL_BENCH_JSON`` when set, else to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

BENCH_DIR = REPO / ".bench" / "quality"
DATA = REPO.parent / "shared" / "data"
DEFAULT_CALIB = DATA / "calibration" / "groups_merged.txt"
DEFAULT_TEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
GOAL_BITS, GOAL_DELTA_PCT = 4.5, 5.0

# Issue 6's table: llama.cpp on the same model, text, ctx and windows (F16 22.50).
LLAMACPP_ROWS = [
    ("llama.cpp Q4_0", 4.50, 28.70, 22.50),
    ("llama.cpp Q4_0 + imatrix", 4.50, 24.98, 22.50),
    ("llama.cpp IQ4_XS + imatrix", 4.44, 24.85, 22.50),
    ("llama.cpp Q4_K_M + imatrix", 5.53, 23.21, 22.50),
    ("bitsandbytes NF4 + DQ (torch)", 4.13, 29.15, 22.38),
]


@dataclass
class Recipe:
    name: str
    method: str                      # rtn | imatrix | gptq
    scheme: str                      # default scheme of the block Linears
    params: dict = field(default_factory=dict)
    rules: list = field(default_factory=list)      # (glob, scheme, params) overrides, first match wins
    act_order: bool = True
    static_groups: bool = False
    damp: float = 0.01
    damp_diag: float = 1.0
    refit_scales: bool = True         # GPTQ: least-squares scales once the levels are chosen
    true_sequential: bool = False    # with --sequential: o_proj / down_proj calibrated on quantized q/k/v, gate/up
    gguf: bool = False               # also write a GGUF and score it with llama.cpp


RECIPES = {
    "rtn-q4_0": Recipe("qtool RTN Q4_0", "rtn", "Q4_0", gguf=True),
    "imatrix-q4_0": Recipe("qtool imatrix Q4_0", "imatrix", "Q4_0", gguf=True),
    "gptq-plain-q4_0": Recipe("qtool GPTQ Q4_0 (act-order, no diag damping)", "gptq", "Q4_0", damp_diag=0.0),
    "gptq-q4_0": Recipe("qtool GPTQ Q4_0 (act-order, diag damping 1)", "gptq", "Q4_0", gguf=True),
    "rtn-q4_k": Recipe("qtool RTN Q4_K", "rtn", "Q4_K", gguf=True),
    "imatrix-q4_k": Recipe("qtool imatrix Q4_K", "imatrix", "Q4_K", gguf=True),
    "gptq-q4_k": Recipe("qtool GPTQ Q4_K (act-order, diag damping 1)", "gptq", "Q4_K", gguf=True),
    "gptq-q4_0-down-q4_k": Recipe("qtool GPTQ Q4_0, down_proj Q4_K (act-order, diag damping 1)", "gptq", "Q4_0",
                                  rules=[("*.mlp.down_proj.weight", "Q4_K", {})], gguf=True),
    "rtn-iq4_nl": Recipe("qtool RTN IQ4_NL", "rtn", "IQ4_NL", gguf=True),
    "gptq-iq4_nl": Recipe("qtool GPTQ IQ4_NL (act-order, diag damping 1)", "gptq", "IQ4_NL", gguf=True),
    "gptq-iq4_nl-down-q4_k": Recipe("qtool GPTQ IQ4_NL, down_proj Q4_K (act-order, diag damping 1)", "gptq", "IQ4_NL",
                                    rules=[("*.mlp.down_proj.weight", "Q4_K", {})], gguf=True),
    "gptq-q4_0-down-q4_k-ts": Recipe("qtool GPTQ Q4_0, down_proj Q4_K, true sequential", "gptq", "Q4_0",
                                     rules=[("*.mlp.down_proj.weight", "Q4_K", {})], gguf=True, true_sequential=True),
    "rtn-int4-g64": Recipe("qtool RTN int4-asym g64", "rtn", "int4-asym", {"group_size": 64}),
    "gptq-int4-g64": Recipe("qtool GPTQ int4-asym g64 (act-order, diag damping 1)", "gptq", "int4-asym", {"group_size": 64}),
    "gptq-int4-sym-g32": Recipe("qtool GPTQ int4-sym g32 (act-order, diag damping 1)", "gptq", "int4-sym", {"group_size": 32}),
    # bitsandbytes NF4, blocks of 64, double quant (the scales the methods chose, double-quantized); gguf=False.
    "rtn-nf4": Recipe("qtool RTN NF4 + DQ (bitsandbytes' quantizer)", "rtn", "nf4"),
    "imatrix-nf4": Recipe("qtool imatrix NF4 + DQ", "imatrix", "nf4"),
    "gptq-nf4": Recipe("qtool GPTQ NF4 + DQ (act-order, static groups, diag damping 1)", "gptq", "nf4"),
    # AWQ scaling folded into the norms / up_proj rows: gguf=False, since _write_gguf writes the source's
    # unfolded norms (`qtool quantize --method awq` writes the folded ones).
    "awq-q4_0": Recipe("qtool AWQ Q4_0", "awq", "Q4_0"),
    "awq-imatrix-q4_0": Recipe("qtool AWQ + imatrix Q4_0", "awq+imatrix", "Q4_0"),
    "awq-gptq-q4_0-down-q4_k": Recipe("qtool AWQ + GPTQ Q4_0, down_proj Q4_K (act-order, diag damping 1)", "awq+gptq",
                                      "Q4_0", rules=[("*.mlp.down_proj.weight", "Q4_K", {})]),
}
DEFAULT_RECIPES = ["rtn-q4_0", "imatrix-q4_0", "gptq-q4_0", "gptq-int4-g64"]


@dataclass
class Row:
    name: str
    tool: str                        # who measured: "llama.cpp (issue 6)", "qtool eval", "llama.cpp (this run)"
    bits_per_weight: float | None
    ppl: float
    stderr: float | None
    base_ppl: float
    delta_pct: float
    seconds: float | None = None     # quantization time
    mean_layer_error: float | None = None
    meets_goal: bool | None = None


@dataclass
class Report:
    model: str
    calib: str
    samples: int
    seqlen: int
    text: str
    ctx: int
    chunks: int
    calibration_seconds: float
    calibration_layer_seconds: list[float]
    rows: list[Row]
    best: str | None
    goal: str = f"<= {GOAL_BITS} bits/weight over block Linears and ppl within +{GOAL_DELTA_PCT}% of the unquantized model"


def _stats(source, args) -> tuple[object, float, list[float]]:
    from qtool.calibration.data import calibration_set
    from qtool.tokenizer import load_tokenizer
    from qtool.calibration.runner import calibrate, load_stats, save_stats

    path = BENCH_DIR / f"stats-{args.samples}x{args.seqlen}-seed{args.seed}.safetensors"
    if path.is_file():
        stats = load_stats(path)
        return stats, sum(r.seconds for r in stats.records), [r.seconds for r in stats.records]
    calib = calibration_set(args.calib, load_tokenizer(source), samples=args.samples,
                            seqlen=args.seqlen, seed=args.seed)
    started = time.perf_counter()
    stats = calibrate(source, calib_set=calib, want_hessian=True, device=args.device)
    seconds = time.perf_counter() - started
    save_stats(stats, path)
    return stats, seconds, [r.seconds for r in stats.records]


def _plans(source, recipe: Recipe):
    from qtool.plan import Recipe as PlanRecipe, Rule, build_plan

    rules = [Rule(match, scheme, params=params) for match, scheme, params in recipe.rules]
    plan_recipe = PlanRecipe(scheme=recipe.scheme, params=dict(recipe.params), rules=rules)
    return build_plan(source.tensors(), plan_recipe, int(source.config["num_hidden_layers"]))


def _block_bits(plans, gguf: bool) -> float:
    from qtool.plan import layer_index

    bits = weights = 0
    for plan in plans:
        if plan.keep or layer_index(plan.name) is None or len(plan.shape) != 2:
            continue
        bnb = plan.scheme in ("nf4", "fp4")
        if gguf:
            from qtool.sinks.gguf import packed_nbytes
        elif bnb:
            from qtool.sinks.bnb import packed_nbytes
        else:
            from qtool.sinks.compressed import packed_nbytes
        nbytes = packed_nbytes(plan)
        if not gguf and not bnb:
            nbytes -= 16  # weight_shape (2 x int64) is bookkeeping, not weights
        bits += 8 * nbytes
        weights += plan.shape[0] * plan.shape[1]
    return bits / weights


def _quantize(source, recipe: Recipe, stats, calib_set=None, device: str = "cpu") -> tuple[dict, dict, float, float]:
    """``calib_set`` given: sequential (each block calibrated on the outputs of the quantized blocks
    before it, the forward pass run again); else from the saved statistics of the unquantized model."""
    from qtool.calibration.methods import MethodOptions, calibrated_weights

    plans = _plans(source, recipe)
    options = MethodOptions(method=recipe.method, act_order=recipe.act_order, static_groups=recipe.static_groups,
                            damp=recipe.damp, damp_diag=recipe.damp_diag, true_sequential=recipe.true_sequential,
                            refit_scales=recipe.refit_scales)
    started = time.perf_counter()
    weights, packed, errors = {}, {}, []
    sources = {"calib_set": calib_set} if calib_set is not None else {"stats": stats}
    for item in calibrated_weights(source, plans, options, pack=recipe.gguf, device=device, **sources):
        weights[item.plan.name] = item.weight
        if item.packed is not None:
            packed[item.plan.name] = item.packed
        if not math.isnan(item.error):
            errors.append(item.error)
    seconds = time.perf_counter() - started
    return weights, packed, seconds, (sum(errors) / len(errors) if errors else float("nan"))


def _qtool_ppl(source, text, args) -> tuple[float, float]:
    from qtool.evaluation.model import load_causal_lm
    from qtool.evaluation.perplexity import plan_windows, run_windows, tokenize

    model = load_causal_lm(source, dtype="fp32", device=args.device)
    tokens = tokenize(model, text)
    plan = plan_windows(len(tokens), ctx=args.ctx, chunks=args.chunks,
                        bos_token_id=model.bos_token_id if model.add_bos else None)
    run = run_windows(model, tokens, plan, batch_size=1 if args.device == "cpu" else 8, label=source.description)
    ppl, stderr = run.nll.ppl_and_stderr()
    del model
    return ppl, stderr


def _cached_ppl(label: str, measure, args) -> tuple[float, float]:
    """The unquantized model's (ppl, stderr): the same for every run on the same text and windows,
    so it is measured once and kept under .bench/quality/."""
    text = args.text.stat()
    cache = BENCH_DIR / f"{label}-ctx{args.ctx}-chunks{args.chunks}-{text.st_size}.json"
    if cache.is_file():
        return tuple(json.loads(cache.read_text()))
    result = measure()
    cache.write_text(json.dumps(list(result)))
    return result


def _write_gguf(source, recipe: Recipe, packed: dict, out: Path) -> Path:
    """The recipe as a GGUF file: GGUFSink with the calibrated blocks written as chosen."""
    from qtool import architectures
    from qtool.containers.gguf import gguf_plans
    from qtool.sinks.gguf import GGUFSink
    from qtool.plan import Recipe as PlanRecipe

    class CalibratedGGUFSink(GGUFSink):
        def add(self, plan, tensor):
            if plan.name not in packed:
                return super().add(plan, tensor)
            if self._pending[0] != plan.name:
                raise RuntimeError(f"out of order: {plan.name}")
            data = packed[plan.name].data
            heads = architectures.qk_heads(plan.name, self.source.config)
            if heads is not None:
                data = architectures.permute_qk(data, heads)   # a row permutation: valid on packed rows
            array = data.cpu().contiguous().numpy()
            self._writer.write_tensor_data(array)
            self._pending.pop(0)
            return array.nbytes

    from qtool.plan import Rule

    rules = [Rule(match, scheme, params=params) for match, scheme, params in recipe.rules]
    plans = gguf_plans(source.tensors(), PlanRecipe(scheme=recipe.scheme, params=dict(recipe.params), rules=rules),
                       source.config)
    sink = CalibratedGGUFSink(out, source, plans, force=True, options={"gguf_type": recipe.scheme})
    try:
        for plan in plans:
            sink.add(plan, source.load(plan.name))
        return sink.finish("")
    except BaseException:
        sink.abort()
        raise


def _llamacpp_ppl(path: Path, text: str, args) -> tuple[float, float]:
    """llama.cpp's perplexity on the same windows (its tokenizer, BOS rule, second half scored), through
    the tests' llama.cpp helpers (which load without the AMX-repacked buffers llama.cpp 0.3.36 crashes in)."""
    from tests._eval_helpers import llama_cpp_perplexity, llama_cpp_tokens

    tokens, add_bos, bos_id = llama_cpp_tokens(path, text)
    windows = min(args.chunks, len(tokens) // args.ctx)
    ppl, values = llama_cpp_perplexity(path, tokens, ctx=args.ctx, chunks=windows, add_bos=add_bos, bos_id=bos_id,
                                       threads=args.threads)
    stderr = float(ppl * math.sqrt(values.var() / max(len(values) - 1, 1)))
    return ppl, stderr


def _render(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M, WikiText-2 test, ctx {report.ctx}, {report.chunks} windows "
                        f"(calibration: {report.samples} x {report.seqlen} tokens of {Path(report.calib).name})")
    for column in ("recipe", "measured by", "bits/weight (block linears)", "ppl", "delta", "quantize s", "goal"):
        table.add_column(column, justify="left" if column in ("recipe", "measured by") else "right")
    for row in report.rows:
        goal = "" if row.meets_goal is None else ("yes" if row.meets_goal else "no")
        table.add_row(row.name, row.tool, "-" if row.bits_per_weight is None else f"{row.bits_per_weight:.2f}",
                      f"{row.ppl:.2f}" + (f" ± {row.stderr:.2f}" if row.stderr else ""),
                      f"{row.delta_pct:+.1f}%", "-" if row.seconds is None else f"{row.seconds:.0f}", goal)
    console = Console(stderr=True, width=160)
    console.print(table)
    console.print(f"calibration pass: {report.calibration_seconds:.0f} s "
                  f"({report.calibration_seconds / max(len(report.calibration_layer_seconds), 1):.1f} s per layer)")
    console.print(f"best recipe meeting the goal ({report.goal}): {report.best or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where calibration, GPTQ and evaluation run")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help=f"comma-separated, from: {', '.join(RECIPES)}")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp confirmation of GGUF rows")
    parser.add_argument("--sequential", action="store_true",
                        help="calibrate each block on the quantized outputs of the blocks before it (slower)")
    args = parser.parse_args(argv)
    for path in (args.calib, args.text):
        if not path.is_file():
            print(f"error: {path} is missing (clone the repo next to ../shared)", file=sys.stderr)
            return 3
    unknown = [r for r in args.recipes.split(",") if r not in RECIPES]
    if unknown:
        print(f"error: unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    BENCH_DIR.mkdir(parents=True, exist_ok=True)

    from qtool.calibration.methods import OverlaySource
    from qtool.schemes.base import get_scheme
    from qtool.sources.resolve import resolve

    text = args.text.read_text(encoding="utf-8")
    rows: list[Row] = []
    with resolve("smollm2-135m") as source:
        calib_set = None
        if not args.sequential:   # sequential mode collects its statistics as it goes
            stats, calib_seconds, layer_seconds = _stats(source, args)
        else:
            stats, calib_seconds, layer_seconds = None, 0.0, []
            from qtool.calibration.data import calibration_set
            from qtool.tokenizer import load_tokenizer

            calib_set = calibration_set(args.calib, load_tokenizer(source), samples=args.samples,
                                        seqlen=args.seqlen, seed=args.seed)
        base_ppl, base_err = _cached_ppl("qtool-base", lambda: _qtool_ppl(source, text, args), args)
        rows.append(Row("unquantized (GGUF source, fp32)", "qtool eval", None, base_ppl, base_err, base_ppl, 0.0))
        rows[:0] = [Row(name, "llama.cpp (issue 6)", bits, ppl, None, base, 100 * (ppl / base - 1))
                    for name, bits, ppl, base in LLAMACPP_ROWS]
        llama_base = None
        for key in args.recipes.split(","):
            recipe = RECIPES[key]
            plans = _plans(source, recipe)
            gguf = get_scheme(recipe.scheme).family == "gguf"
            bits = _block_bits(plans, gguf)
            weights, packed, seconds, mean_error = _quantize(source, recipe, stats, calib_set, args.device)
            ppl, err = _qtool_ppl(OverlaySource(source, weights), text, args)
            delta = 100 * (ppl / base_ppl - 1)
            rows.append(Row(recipe.name, "qtool eval", bits, ppl, err, base_ppl, delta, seconds,
                            mean_error if math.isfinite(mean_error) else None,  # JSON has no NaN
                            bits <= GOAL_BITS + 1e-9 and delta <= GOAL_DELTA_PCT))
            print(f"{recipe.name}: {bits:.2f} bits/weight, ppl {ppl:.3f} ({delta:+.1f}%)", file=sys.stderr, flush=True)
            if recipe.gguf and not args.no_llamacpp:
                if llama_base is None:
                    base_file = _write_gguf(source, Recipe("F32", "rtn", "F32"), {}, BENCH_DIR / "smollm2-f32.gguf")
                    llama_base = _cached_ppl("llamacpp-base", lambda: _llamacpp_ppl(base_file, text, args), args)
                    rows.append(Row("unquantized (F32 GGUF)", "llama.cpp (this run)", None, llama_base[0],
                                    llama_base[1], llama_base[0], 0.0))
                out = _write_gguf(source, recipe, packed, BENCH_DIR / f"smollm2-{key}.gguf")
                l_ppl, l_err = _llamacpp_ppl(out, text, args)
                l_delta = 100 * (l_ppl / llama_base[0] - 1)
                rows.append(Row(recipe.name + " (GGUF)", "llama.cpp (this run)", bits, l_ppl, l_err, llama_base[0],
                                l_delta, None, None, bits <= GOAL_BITS + 1e-9 and l_delta <= GOAL_DELTA_PCT))
                print(f"  llama.cpp on {out.name}: ppl {l_ppl:.3f} ({l_delta:+.1f}%)", file=sys.stderr, flush=True)
    meeting = [r for r in rows if r.meets_goal and r.tool == "qtool eval"]
    best = min(meeting, key=lambda r: r.ppl).name if meeting else None
    report = Report("smollm2-135m", str(args.calib), args.samples, args.seqlen, str(args.text), args.ctx,
                    args.chunks, calib_seconds, layer_seconds, rows, best)
    _render(report)
    payload = json.dumps(asdict(report), indent=2)
    target = os.environ.get("QTOOL_BENCH_JSON")
    if target:
        Path(target).write_text(payload)
    else:
        print(payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
