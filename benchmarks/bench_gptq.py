"""GPTQ speed: qtool's int4 GPTQ beside llm-compressor's on a synthetic Llama-shaped checkpoint, where the
time goes, and peak memory.

    python benchmarks/bench_gptq.py --workdir DIR --tokenizer DIR [--shape 8b] [--layers 6]
        [--samples 128] [--seqlen 512] [--group-size 128] [--device cuda] [--calib FILE]
        [--no-llmcompressor] [--methods gptq] [--model PATH] [--config PRESET] [--score TEXT,TEXT]

1. ``qtool.synthetic.write_synthetic_llama`` writes the checkpoint (``--layers`` overrides the shape's
   layer count; the tokenizer comes from ``--tokenizer``), once per workdir. ``--model``: a real
   model instead (anything qtool reads, e.g. the packaged SmolLM2 GGUF); ``--config``: a preset
   instead of int4-sym (``configs/gguf-q4_0-gptq.yaml``: the GGUF Q4_0 recipe).
2. qtool: ``pipeline.quantize`` with int4 symmetric groups (what ``qtool quantize MODEL --scheme
   int4-sym --group-size 128 --method gptq --device cuda`` runs), timed whole and per phase by wrapping
   qtool's own functions in this process (GPU work synchronized at each boundary), after a warm-up
   run on a tiny model (imports, kernel compilation; its time is reported apart): loading a block,
   the calibration forwards with their statistics, GPTQ's column loop, the scale re-fit, the
   layer-error check, packing; the rest (plan, write) is the remainder.
3. llm-compressor (when installed): ``oneshot`` with ``GPTQModifier(scheme="W4A16")`` on every Linear
   but lm_head, the same calibration windows (qtool's, from ``--calib``), then ``save_pretrained``
   (``--group-size`` other than 128: W4A16's weights with that group size).
4. ``--score TEXT,...``: every output scored against the model by ``qtool eval`` (perplexity change,
   mean KLD, top-1 agreement; 40 windows of 512 of each text): the quality table of issue 19.

A table goes to stderr; the JSON (also to ``$QTOOL_BENCH_JSON`` when set) to stdout.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qtool import pipeline  # noqa: E402
from qtool import calibration  # noqa: E402
from qtool.calibration import methods, runner  # noqa: E402
from qtool.recipes import recipe_from_options  # noqa: E402
from qtool.schemes import gptq  # noqa: E402
from qtool.sinks.safetensors_io import SafetensorsSink  # noqa: E402
from qtool.synthetic import SHAPES, write_synthetic_llama  # noqa: E402

DEFAULT_CALIB = REPO.parent / "shared" / "data" / "calibration" / "groups_merged.txt"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Phases:
    """Adds up the wall time of qtool functions by name while active (a call inside another's time
    counts for the inner phase only)."""

    TARGETS = (  # (owner, attribute, phase)
        (runner.Skeleton, "block", "load block"),
        (runner, "_observe", "forward + statistics"),
        (runner, "run_block", "block outputs"),
        (calibration, "calibration_set", "tokenize calibration text"),
        (gptq, "_gptq", "GPTQ column loop"),
        (gptq, "refit_scales", "scale re-fit"),
        (methods, "layer_output_error", "layer error"),
        (methods, "_pack", "pack"),
        (SafetensorsSink, "add", "write tensors"),
        (SafetensorsSink, "finish", "finish output"),
    )

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._stack: list[float] = []          # time spent in inner phases, per open call
        self._restore: list[tuple[object, str, object]] = []

    def _wrap(self, function, phase: str):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            _sync(self.device)
            started = time.perf_counter()
            self._stack.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                _sync(self.device)
                inner = self._stack.pop()
                spent = time.perf_counter() - started
                self.seconds[phase] = self.seconds.get(phase, 0.0) + spent - inner
                if self._stack:
                    self._stack[-1] += spent
        return timed

    def __enter__(self) -> "Phases":
        for owner, name, phase in self.TARGETS:
            original = owner.__dict__[name]
            self._restore.append((owner, name, original))
            setattr(owner, name, self._wrap(original, phase))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None


def run_qtool(model: Path, out: Path, args: argparse.Namespace, method: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    fmt = "gguf" if args.config and "gguf" in args.config.name else "safetensors"
    recipe = recipe_from_options(fmt=fmt, bits=None, scheme=None if args.config else "int4-sym", gguf_type=None,
                                 config=args.config, block_size=None,
                                 group_size=None if args.config else args.group_size, double_quant=None,
                                 include=[], skip=[])
    options = pipeline.QuantizeOptions(format=fmt, device=args.device, force=True, method=method,
                                       calib=str(args.calib), calib_samples=args.samples, calib_seqlen=args.seqlen)
    _peak_reset(args.device)
    with Phases(args.device) as phases:
        started = time.perf_counter()
        pipeline.quantize(str(model), out, recipe, options)
        _sync(args.device)
        wall = time.perf_counter() - started
    shares = {phase: round(seconds, 2) for phase, seconds in sorted(phases.seconds.items(), key=lambda kv: -kv[1])}
    shares["other"] = round(wall - sum(phases.seconds.values()), 2)
    return {"what": f"qtool {method}", "wall_s": round(wall, 2), "phases_s": shares, "peak_gpu_gib": _peak_gib(args.device)}


def run_llmcompressor(model: Path, out: Path, windows: torch.Tensor, args: argparse.Namespace) -> dict | None:
    try:
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
    except ImportError as error:
        print(f"llm-compressor not run: {error}", file=sys.stderr)
        return None
    from transformers import AutoModelForCausalLM

    if out.exists():
        shutil.rmtree(out)
    _peak_reset(args.device)
    started = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    load_s = time.perf_counter() - started
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    if args.group_size == 128:
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    else:   # W4A16 with another group size: the same scheme written out
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}
        recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    started = time.perf_counter()
    oneshot(model=loaded, dataset=data, recipe=recipe, num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    _sync(args.device)
    oneshot_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded.save_pretrained(out, save_compressed=True)
    for tokenizer_file in model.glob("tokenizer*"):      # for scoring the output (--score)
        shutil.copy(tokenizer_file, out / tokenizer_file.name)
    save_s = time.perf_counter() - started
    return {"what": "llm-compressor GPTQ W4A16", "wall_s": round(load_s + oneshot_s + save_s, 2),
            "phases_s": {"load": round(load_s, 2), "oneshot": round(oneshot_s, 2), "save": round(save_s, 2)},
            "peak_gpu_gib": _peak_gib(args.device)}


def score(output: Path, model: Path, texts: list[Path], device: str) -> dict:
    """``qtool eval`` of one output against the model it came from (40 windows of 512 of each text)."""
    scores = {}
    for text in texts:
        command = [sys.executable, "-m", "qtool", "eval", str(output), "--ppl", "--baseline", str(model), "--chunks",
                   "40", "--text", str(text), "--device", device, "--json", "--quiet"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            scores[text.name] = {"error": done.stdout[-400:] + done.stderr[-400:]}
            continue
        result = json.loads(done.stdout)
        quantized = next(m for m in result["models"] if not m.get("is_baseline"))
        scores[text.name] = {key: quantized.get(key) for key in ("ppl", "delta_pct", "mean_kld", "top1_agreement")}
        scores[text.name]["baseline_ppl"] = next(m["ppl"] for m in result["models"] if m.get("is_baseline"))
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="Hugging Face tokenizer folder")
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calib", type=Path, default=DEFAULT_CALIB)
    parser.add_argument("--methods", default="gptq", help="qtool methods to time, comma separated")
    parser.add_argument("--no-llmcompressor", action="store_true")
    parser.add_argument("--profile", type=Path, default=None, help="write cProfile statistics of qtool's runs here")
    parser.add_argument("--model", type=Path, default=None, help="a real model instead of the synthetic one")
    parser.add_argument("--config", type=Path, default=None, help="a preset instead of int4-sym")
    parser.add_argument("--score", default=None, help="texts (comma separated): score every output against the "
                        "model with qtool eval (40 windows of 512 each)")
    args = parser.parse_args(argv)

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_layers"] = args.layers
    model = args.model or args.workdir / f"synthetic-{args.shape}-{shape['num_layers']}l"
    if not args.model and not (model / "config.json").exists():
        write_synthetic_llama(model, tokenizer_from=args.tokenizer, shards=2, **shape)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    # Warm-up on a tiny model: imports and kernel compilation (Triton, C) out of the timed runs, as
    # llm-compressor's run below finds transformers' modules already imported.
    tiny = args.workdir / "synthetic-tiny"
    if not (tiny / "config.json").exists():
        write_synthetic_llama(tiny, tokenizer_from=args.tokenizer, **SHAPES["tiny"])
    started = time.perf_counter()
    warm = argparse.Namespace(**{**vars(args), "samples": 2, "seqlen": 64, "group_size": 32, "config": None})
    for method in args.methods.split(","):
        run_qtool(tiny, args.workdir / "warm-up", warm, method)
    warm_up_s = round(time.perf_counter() - started, 2)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    runs = []
    for method in args.methods.split(","):
        runs.append(run_qtool(model, args.workdir / f"qtool-{method}", args, method))
        print(f"{runs[-1]}", file=sys.stderr, flush=True)     # kept even if a later run is cut short
    if profiler:
        profiler.disable()
        with open(args.profile, "w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(40)
    if not args.no_llmcompressor:
        from transformers import AutoTokenizer

        from qtool.calibration.data import calibration_set

        windows = calibration_set(args.calib, AutoTokenizer.from_pretrained(args.tokenizer), samples=args.samples,
                                  seqlen=args.seqlen).tokens
        peer = run_llmcompressor(model, args.workdir / "llmcompressor", windows, args)
        if peer:
            runs.append(peer)
    if args.score:
        outputs = {run["what"]: args.workdir / ("llmcompressor" if run["what"].startswith("llm-compressor")
                                                else f"qtool-{run['what'].split()[-1]}") for run in runs}
        for run in runs:
            run["scores"] = score(outputs[run["what"]], model, [Path(t) for t in args.score.split(",")], args.device)
            print(f"{run['what']}: {run['scores']}", file=sys.stderr, flush=True)
    result = {"device": device_name, "torch": torch.__version__, "warm_up_s": warm_up_s,
              "model": str(args.model) if args.model else None, "shape": None if args.model else shape,
              "config": str(args.config) if args.config else None,
              "samples": args.samples,
              "seqlen": args.seqlen, "group_size": args.group_size, "runs": runs}
    peer = next((run for run in runs if run["what"].startswith("llm-compressor")), None)
    for run in runs:
        if peer and run is not peer:
            run["over_llmcompressor"] = round(run["wall_s"] / peer["wall_s"], 3)
        print(f"{run['what']:28s} {run['wall_s']:8.1f} s  peak GPU {run['peak_gpu_gib']} GiB  "
              f"{run.get('over_llmcompressor', '')}  {run['phases_s']}", file=sys.stderr)
    text = json.dumps(result, indent=1)
    if os.environ.get("QTOOL_BENCH_JSON"):
        Path(os.environ["QTOOL_BENCH_JSON"]).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
