"""Mixtures of experts (issue #18): Mixtral, Qwen2-MoE (shared expert) and Qwen3-MoE as safetensors (GGUF:
tests/test_gguf_architectures.py and test_gguf_converter.py).

transformers 5 saves a checkpoint one matrix per expert (``experts.N.gate_proj`` / Mixtral's
``block_sparse_moe.experts.N.w1``) and loads it into fused 3-D parameters (``mlp.experts.gate_up_proj``
[E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) with its conversion mapping. qtool plans and writes the
stored per-expert matrices, keeps the routers, and its evaluator fills the fused parameters through
transformers' own converters. Tiny random checkpoints (2 blocks, 4 experts, top 2) with SmolLM2's tokenizer.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qtool.architectures import block_record
from qtool.cli import app
from qtool.plan import Recipe, build_plan

from tests._architectures import MOE_VARIANTS, SIZES
from tests._safetensors_helpers import dequantized_state, logits

pytest.importorskip("bitsandbytes")
pytest.importorskip("compressed_tensors")

EXPERTS = 4
VOCAB_SIZE = 49152      # SmolLM2's tokenizer: `qtool eval` needs one
PROMPT_IDS = [[1, 50, 73, 120, 9, 201, 33, 250, 17, 88]]
SCHEMES = {"nf4": {}, "int8-sym": {}, "int4-sym": {"group_size": 32}}
# transformers 5.25's bitsandbytes integration replaces nn.Linear modules only: the fused 3-D expert
# parameters stay plain parameters, and nothing in its loader dequantizes or merges bitsandbytes experts, so
# qtool keeps the experts of a bitsandbytes output unquantized (as transformers' own load_in_4bit does).
BNB_SCHEMES = ("nf4", "int8-sym")
# bitsandbytes 0.50's CPU kernels fail on the tiny DeepSeek's shapes (its dense Linears, not the experts):
BNB_CPU_XFAIL = {
    "nf4": "bitsandbytes 0.50's CPU NF4 repacking reshapes absmax as [rows, in / 64]: q_b_proj's 32 inputs "
           "(the tiny model's q_lora_rank) give [192, 0]",
    "int8-sym": "bitsandbytes 0.50's CPU int8 matmul broadcasts the row statistics against a [1, 10, 32] input "
                "in DeepSeek's attention and fails",
}


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def moe_checkpoint(arch_checkpoint):
    """``moe_checkpoint(model_type)`` -> the shared tiny random float32 checkpoint (tests/_architectures.py)."""
    return lambda model_type: arch_checkpoint(model_type, VOCAB_SIZE)


@pytest.fixture(scope="module")
def moe_output(moe_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """``moe_output(model_type, scheme)`` -> (output folder written by qtool's pipeline, its plans), built once."""
    from qtool.pipeline import QuantizeOptions, plan_model, quantize
    from qtool.sources.resolve import resolve

    built: dict[tuple[str, str], tuple[Path, list]] = {}

    def get(model_type: str, scheme: str) -> tuple[Path, list]:
        if (model_type, scheme) not in built:
            source = moe_checkpoint(model_type)
            recipe = Recipe(scheme=scheme, params=dict(SCHEMES[scheme]))
            out = tmp_path_factory.mktemp(f"{model_type}-{scheme}") / "out"
            quantize(str(source), out, recipe, QuantizeOptions(format="safetensors"))
            with resolve(str(source)) as opened:
                plans = plan_model(opened, recipe, "safetensors")
            built[model_type, scheme] = (out, plans)
        return built[model_type, scheme]

    return get


@pytest.fixture(scope="module")
def reference(moe_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """``reference(model_type, plans)`` -> transformers' own model (from_pretrained, its expert merge) of the
    checkpoint with qtool's dequantized weights in place of the planned ones."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    def get(model_type: str, plans: list):
        source = moe_checkpoint(model_type)
        folder = tmp_path_factory.mktemp(f"{model_type}-reference")
        shutil.copy(source / "config.json", folder / "config.json")
        state = {name: tensor.contiguous() for name, tensor in dequantized_state(source, plans).items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    return get


# Checkpoints that store one matrix per expert (transformers' converters fuse them as it loads): every
# variant but gpt-oss, whose fused experts have their own tests (tests/test_gpt_oss.py).
PER_EXPERT_STORED = [variant for variant in MOE_VARIANTS
                     if block_record({"model_type": MOE_VARIANTS[variant][0]}).fused_experts is None]


def _moe_layers(model_type: str) -> list[int]:
    """The blocks with experts (DeepSeek's first blocks are dense)."""
    return list(range(MOE_VARIANTS[model_type][1].get("first_k_dense_replace", 0), SIZES["num_hidden_layers"]))


def _expert_re(model_type: str) -> re.Pattern:
    record = block_record({"model_type": model_type})
    return re.compile(rf"^model\.layers\.\d+\.{re.escape(record.experts)}\.\d+\.\w+\.weight$")


def _stored_tensors(folder: Path) -> dict[str, str]:
    """name -> safetensors dtype (F32, U8, I32, ...) of every tensor of an output (headers only)."""
    from safetensors import safe_open

    stored: dict[str, str] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            for name in handle.keys():
                stored[name] = str(handle.get_slice(name).get_dtype())
    return stored


@pytest.mark.parametrize("model_type", PER_EXPERT_STORED)
def test_transformers_stores_experts_per_expert_and_fuses_them(moe_checkpoint, model_type):
    """What the rest relies on: transformers 5 saves one 2-D matrix per expert, and builds 3-D fused experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = moe_checkpoint(model_type)
    stored = _stored_tensors(source)
    experts = [name for name in stored if _expert_re(model_type).match(name)]
    assert len(experts) == len(_moe_layers(model_type)) * EXPERTS * 3
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    hidden = SIZES["hidden_size"]
    per_expert = MOE_VARIANTS[model_type][1].get("moe_intermediate_size", SIZES["intermediate_size"])
    layer = _moe_layers(model_type)[0]
    assert shapes[f"model.layers.{layer}.mlp.experts.gate_up_proj"] == (EXPERTS, 2 * per_expert, hidden)
    assert shapes[f"model.layers.{layer}.mlp.experts.down_proj"] == (EXPERTS, hidden, per_expert)
    assert not any(name in shapes for name in experts)


@pytest.mark.parametrize("model_type", MOE_VARIANTS)
def test_plan_keeps_routers_and_quantizes_every_expert(moe_checkpoint, model_type):
    from qtool.sources.resolve import resolve

    record = block_record({"model_type": model_type})
    with resolve(str(moe_checkpoint(model_type))) as source:
        plans = build_plan(source.tensors(), Recipe(scheme="nf4"), SIZES["num_hidden_layers"])
        routers = {f"model.layers.{layer}.{router}.weight" for layer in _moe_layers(model_type)
                   for router in record.routers}
        kept_matrices = {p.name for p in plans if p.keep and len(p.shape) == 2 and ".layers." in p.name}
        assert kept_matrices == routers
        experts = [p for p in plans if _expert_re(model_type).match(p.name)]
        assert len(experts) == len(_moe_layers(model_type)) * EXPERTS * 3 and not any(p.keep for p in experts)
        # A rule or --include still quantizes a router when asked to.
        included = build_plan(source.tensors(), Recipe(scheme="nf4", include=["*.gate.weight"]), 2)
        assert not any(p.keep for p in included if p.name in routers and p.name.endswith(".gate.weight"))


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_report_counts_the_experts_apart(moe_checkpoint, fmt, tmp_path):
    """The plan (--dry-run) and the report of a write give the experts' matrices, parameters, bytes and
    bits per weight on their own line; they add up from the per-tensor rows."""
    source = moe_checkpoint("qwen3_moe")
    choice = ("--scheme", "int4-sym", "--group-size", "32") if fmt == "safetensors" else ("--type", "Q8_0")
    out = tmp_path / ("out" if fmt == "safetensors" else "out.gguf")
    for extra in (("--dry-run",), ()):
        result = run_cli("quantize", source, "--format", fmt, *choice, "-o", out, "--json", *extra)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        rows = [row for row in report["tensors"] if _expert_re("qwen3_moe").match(row["name"])]
        experts = report["experts"]
        assert len(rows) == experts["tensors"] == SIZES["num_hidden_layers"] * EXPERTS * 3
        assert experts["parameters"] == sum(math.prod(row["shape"]) for row in rows)
        assert experts["bytes_after"] == sum(row["bytes_after"] for row in rows) < experts["bytes_before"]
        assert experts["bits_per_weight"] == pytest.approx(8 * experts["bytes_after"] / experts["parameters"])
        assert experts["scheme"] == ("int4-sym" if fmt == "safetensors" else "Q8_0")
        human = run_cli("quantize", source, "--format", fmt, *choice, "-o", tmp_path / "plan", "--dry-run")
        assert f"experts: {experts['tensors']} matrices" in human.output


@pytest.mark.parametrize("scheme,model_type", [
    pytest.param(scheme, model_type, marks=pytest.mark.xfail(strict=True, raises=RuntimeError, reason=BNB_CPU_XFAIL[scheme]))
    if scheme in BNB_CPU_XFAIL and model_type.startswith("deepseek") else (scheme, model_type)
    for model_type in PER_EXPERT_STORED for scheme in SCHEMES])
def test_output_quantizes_every_expert_and_loads(moe_output, reference, model_type, scheme):
    """compressed-tensors: every expert matrix stored quantized, decompressed by transformers to qtool's
    own weights. bitsandbytes: the plan keeps the experts (transformers cannot load them quantized) and
    they are stored as they were, the other Linears quantized; transformers loads both."""
    from transformers import AutoModelForCausalLM

    out, plans = moe_output(model_type, scheme)
    stored = _stored_tensors(out)
    # Every expert matrix is stored quantized: its weight (bitsandbytes) or weight_packed (compressed-tensors)
    # is an integer tensor, and none is left in 16 or 32 bits; no router is quantized.
    modules = {found.group(1) for name in stored if (found := re.match(r"^(.*\.experts\.\d+\.\w+?)\.weight", name))}
    assert len(modules) == len(_moe_layers(model_type)) * EXPERTS * 3
    weights = {module: stored.get(f"{module}.weight_packed", stored.get(f"{module}.weight")) for module in modules}
    float_experts = [module for module, dtype in weights.items() if dtype is None or dtype in ("F32", "F16", "BF16")]
    kept = {plan.name[:-len(".weight")] for plan in plans if plan.keep and _expert_re(model_type).match(plan.name)}
    assert sorted(float_experts) == sorted(kept) == (sorted(modules) if scheme in BNB_SCHEMES else [])
    quantized = [plan.name for plan in plans if not plan.keep]
    assert quantized and all(stored[name] in ("U8", "I8", "I32") or f"{name[:-7]}.weight_packed" in stored
                             for name in quantized if name in stored), quantized
    record = block_record({"model_type": model_type})
    for router in record.routers:
        assert stored[f"model.layers.{_moe_layers(model_type)[0]}.{router}.weight"] == "F32"

    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    got = logits(model, PROMPT_IDS)
    expected = logits(reference(model_type, plans), PROMPT_IDS)
    assert torch.isfinite(got).all()
    # compressed-tensors decompresses the experts to qtool's own weights; bitsandbytes multiplies in bfloat16
    # (tests/test_loaders.py's bound for its logits), LLM.int8 with its outlier split.
    limit = {"nf4": 0.03, "int8-sym": 0.05}.get(scheme, 1e-5 * float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= limit


@pytest.mark.parametrize("model_type", PER_EXPERT_STORED)
def test_evaluator_fills_fused_experts(moe_checkpoint, moe_output, reference, model_type):
    """qtool's evaluator merges stored per-expert tensors (the source's and each output's, read back
    dequantized) into transformers' fused parameters: the logits of transformers' own loader."""
    from transformers import AutoModelForCausalLM

    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve

    source = moe_checkpoint(model_type)
    with resolve(str(source)) as opened:
        ours = model_from_source(opened)
    theirs = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    assert torch.equal(logits(ours, PROMPT_IDS), logits(theirs, PROMPT_IDS))
    for scheme in SCHEMES:
        out, plans = moe_output(model_type, scheme)
        with resolve(str(out)) as opened:
            ours = model_from_source(opened)
        expected = logits(reference(model_type, plans), PROMPT_IDS)
        got = logits(ours, PROMPT_IDS)
        assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), scheme


# One output per architecture through the command line (every output goes through the evaluator above).
@pytest.mark.parametrize("model_type,scheme", [("mixtral", "nf4"), ("qwen2_moe", "int8-sym"), ("qwen3_moe", "int4-sym")])
def test_eval_cli_runs_on_source_and_output(moe_checkpoint, moe_output, model_type, scheme, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The {n}th expert routes tokens to the layer below it." for n in range(80)),
                    encoding="utf-8")
    out, _ = moe_output(model_type, scheme)
    result = run_cli("eval", out, "--baseline", moe_checkpoint(model_type), "--text", text, "--ctx", "64",
                     "--chunks", "2", "--device", "cpu", "--json")
    assert result.exit_code == 0, result.stderr
    models = json.loads(result.stdout)["models"]
    assert len(models) == 2 and all(math.isfinite(model["ppl"]) and model["ppl"] > 1 for model in models)


def test_gguf_refuses_experts_of_one_tensor_with_two_types(moe_checkpoint, tmp_path):
    """llama.cpp stores a layer's experts of one matrix as one tensor, of one type: a --skip that keeps a
    single expert in 16 bits is refused in one line, before anything is written."""
    out = tmp_path / "out.gguf"
    result = run_cli("quantize", moe_checkpoint("qwen3_moe"), "-o", out, "--type", "Q8_0",
                     "--skip", "model.layers.1.mlp.experts.2.up_proj.weight")
    assert result.exit_code == 2, result.stderr
    error = result.stderr.strip()
    assert "model.layers.1.mlp.experts.up_proj.weight" in error and "one type" in error and "\n" not in error
    assert not out.exists()


# Calibration (GPTQ, AWQ, imatrix) on experts: transformers 5 runs fused experts outside any nn.Linear;
# qtool's calibration pass splits them into one set of Linears per expert (qtool/calibration/experts.py).
CALIB_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "groups_merged.txt"
CALIB_ARGS = ("--calib", CALIB_TEXT, "--calib-samples", "4", "--calib-seqlen", "32")


def _calibration_tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (3, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("all_experts", [False, True], ids=["routed", "all-experts"])
@pytest.mark.parametrize("model_type", MOE_VARIANTS)
def test_expert_statistics_are_those_of_the_tokens_transformers_routes(moe_checkpoint, model_type, all_experts,
                                                                       monkeypatch):
    """Each expert's statistics come from exactly the tokens transformers' own router sends it (every
    token with all_experts), and the per-expert token counts are the router's (both in float32: the
    routing is compared, not rounding)."""
    monkeypatch.setenv("QTOOL_FLOAT32_FORWARDS", "1")
    from transformers import AutoModelForCausalLM

    from qtool.calibration import calibrate
    from qtool.calibration.data import CalibrationSet
    from qtool.sources.resolve import resolve

    source = moe_checkpoint(model_type)
    tokens = _calibration_tokens()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [layer.mlp.experts.register_forward_hook(
        lambda module, args, output, index=index: seen.__setitem__(index, (args[0], args[1])))
        for index, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    with resolve(str(source)) as opened:
        stats = calibrate(opened, calib_set=CalibrationSet(tokens, "random", 2048, 0), want_hessian=False,
                          all_experts=all_experts)
    record = block_record({"model_type": model_type})
    leaves = {"mixtral": ("w1", "w2")}.get(model_type, ("gate_proj", "down_proj"))
    for layer, (hidden, chosen) in seen.items():
        experts = model.model.layers[layer].mlp.experts
        prefix = f"model.layers.{layer}.{record.experts}"
        routed = [int((chosen == expert).sum()) for expert in range(EXPERTS)]
        assert stats.records[layer].expert_tokens == {prefix: routed}
        assert sum(routed) == tokens.numel() * model.config.num_experts_per_tok
        for expert in range(EXPERTS):
            rows = torch.arange(hidden.shape[0]) if all_experts else (chosen == expert).any(dim=-1).nonzero()[:, 0]
            x = hidden[rows]
            if hasattr(experts, "act_fn"):
                gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
                inner = experts.act_fn(gate) * up
            else:   # gpt-oss: input-major, biased, gate and up interleaved into its own gate function
                inner = experts._apply_gate(x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert])
            for leaf, inputs in zip(leaves, (x, inner)):
                got = stats.linears[f"{prefix}.{expert}.{leaf}.weight"]
                assert got.tokens == len(rows)
                torch.testing.assert_close(got.mean_square, inputs.square().mean(dim=0), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("model_type", PER_EXPERT_STORED)
def test_gptq_calibrates_every_expert_and_loads(moe_checkpoint, model_type, tmp_path):
    """`qtool calibrate` and `qtool quantize --method gptq` on a mixture of experts: every planned expert
    matrix is calibrated (none rounded to nearest), the report counts each expert's tokens, and the
    output loads in transformers with the logits of qtool's dequantized weights."""
    from transformers import AutoModelForCausalLM

    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve

    source = moe_checkpoint(model_type)
    result = run_cli("calibrate", source, "-o", tmp_path / "stats.safetensors", *CALIB_ARGS, "--json")
    assert result.exit_code == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    assert [sum(sum(counts) for counts in layer["expert_tokens"].values()) for layer in layers] == \
        [4 * 32 * 2 if layer in _moe_layers(model_type) else 0 for layer in range(SIZES["num_hidden_layers"])]

    out = tmp_path / "gptq"
    result = run_cli("quantize", source, "-o", out, "--scheme", "int4-sym", "--group-size", "32",
                     "--method", "gptq", *CALIB_ARGS, "--expert-min-tokens", "1", "--json")
    assert result.exit_code == 0, result.stderr
    calibration = json.loads(result.stdout)["calibration"]
    with resolve(str(source)) as opened:
        plans = build_plan(opened.tensors(), Recipe(scheme="int4-sym"), SIZES["num_hidden_layers"])
    experts = [p.name for p in plans if _expert_re(model_type).match(p.name)]
    block_planned = [p for p in plans if not p.keep and ".layers." in p.name]
    assert calibration["tensors"] == len(block_planned) and calibration["fallbacks"] == {}
    moe_layers = len(_moe_layers(model_type))
    assert len(calibration["expert_tokens"]) == moe_layers and len(experts) == 3 * EXPERTS * moe_layers

    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.float32).eval()
    with resolve(str(out)) as opened:
        ours = model_from_source(opened)
    expected = logits(ours, PROMPT_IDS)
    assert float((logits(loaded, PROMPT_IDS) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


def _never_routed(source: Path, folder: Path, model_type: str, expert: int) -> Path:
    """A copy of ``source`` whose routers never pick ``expert``: channel 0 of every embedding is made
    large, so every router input has a large positive channel 0, and the expert's router row reads
    that channel alone, negated."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    (path,) = folder.glob("*.safetensors")
    state = load_file(path)
    state["model.embed_tokens.weight"][:, 0] += 100.0
    router = block_record({"model_type": model_type}).routers[0]
    for layer in range(SIZES["num_hidden_layers"]):
        row = state[f"model.layers.{layer}.{router}.weight"][expert]
        row.zero_()
        row[0] = -100.0
    save_file(state, path, metadata={"format": "pt"})
    return folder


def test_expert_the_router_never_picks_falls_back_or_is_calibrated_with_all_experts(moe_checkpoint, tmp_path):
    """An expert no calibration token reaches is rounded to nearest and named in the report (not silently
    left as it was, not fitted to nothing); --all-experts gives it every token's statistics."""
    from qtool.sources.resolve import resolve

    source = _never_routed(moe_checkpoint("mixtral"), tmp_path / "starved", "mixtral", expert=3)
    runs = {}
    for name, extra in {"rtn": ("--method", "rtn"), "gptq": ("--method", "gptq", *CALIB_ARGS),
                        "all": ("--method", "gptq", *CALIB_ARGS, "--all-experts")}.items():
        result = run_cli("quantize", source, "-o", tmp_path / name, "--scheme", "int4-sym", "--group-size", "32",
                         "--expert-min-tokens", "1", *extra, "--json")
        assert result.exit_code == 0, result.stderr
        runs[name] = json.loads(result.stdout)["calibration"]
    starved = [f"model.layers.{layer}.block_sparse_moe.experts.3.{leaf}.weight"
               for layer in range(SIZES["num_hidden_layers"]) for leaf in ("w1", "w2", "w3")]
    for run in (runs["gptq"], runs["all"]):
        assert [counts[3] for counts in run["expert_tokens"].values()] == [0, 0]
    # (The large channel makes the routing nearly the same for every token: other experts may starve too.)
    assert {name: runs["gptq"]["fallbacks"].get(name) for name in starved} == dict.fromkeys(starved, 0)
    assert runs["all"]["fallbacks"] == {} and runs["all"]["all_experts"] is True

    def weight(run: str, name: str) -> torch.Tensor:
        with resolve(str(tmp_path / run)) as opened:
            return opened.load(name)

    busiest = max(range(EXPERTS), key=runs["gptq"]["expert_tokens"]["model.layers.0.block_sparse_moe.experts"].__getitem__)
    routed = f"model.layers.0.block_sparse_moe.experts.{busiest}.w1.weight"
    assert not torch.equal(weight("gptq", routed), weight("rtn", routed))          # calibrated
    for name in starved:
        assert torch.equal(weight("gptq", name), weight("rtn", name))             # the fallback is rtn
        assert not torch.equal(weight("all", name), weight("rtn", name))          # calibrated on every token

    result = run_cli("quantize", source, "-o", tmp_path / "text", "--scheme", "int4-sym", "--group-size", "32",
                     "--method", "gptq", *CALIB_ARGS)
    assert result.exit_code == 0, result.stderr
    assert "block_sparse_moe.experts.3 (0 tokens)" in " ".join(result.stdout.split())


def test_awq_and_imatrix_run_on_experts(moe_checkpoint, tmp_path):
    """AWQ (safetensors) and imatrix (GGUF, merged expert tensors of calibrated experts) on experts: every
    expert calibrated, and the GGUF runs in llama.cpp with logits close to the file's own weights."""
    from tests._gguf_helpers import llamacpp_logits, llamacpp_model, transformers_logits

    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve

    result = run_cli("quantize", moe_checkpoint("qwen2_moe"), "-o", tmp_path / "awq", "--scheme", "int4-sym",
                     "--group-size", "32", "--method", "awq", *CALIB_ARGS, "--expert-min-tokens", "1", "--json")
    assert result.exit_code == 0, result.stderr
    calibration = json.loads(result.stdout)["calibration"]
    assert calibration["fallbacks"] == {} and calibration["tensors"] > 3 * EXPERTS * 2

    pytest.importorskip("llama_cpp")
    out = tmp_path / "imatrix.gguf"
    result = run_cli("quantize", moe_checkpoint("qwen3_moe"), "-o", out, "--type", "Q8_0", "--method", "imatrix",
                     *CALIB_ARGS, "--expert-min-tokens", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["calibration"]["fallbacks"] == {}
    with resolve(str(out)) as opened:
        expected = transformers_logits(model_from_source(opened), PROMPT_IDS[0])
    got = llamacpp_logits(llamacpp_model(out), PROMPT_IDS[0])
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_gguf_of_calibrated_deepseek_keeps_the_calibrated_value_rows(moe_checkpoint, tmp_path):
    """DeepSeek's kv_b_proj is two GGUF tensors, as llama.cpp's converter splits it: attn_v_b (rows of
    kv_b) keeps GPTQ's bytes, attn_k_b (transposed, quantized along other rows) is rounded to nearest as
    llama-quantize rounds it; llama.cpp runs the file with the logits of qtool's own read-back."""
    from tests._gguf_helpers import llamacpp_logits, llamacpp_model, transformers_logits

    from qtool.architectures import gguf_split
    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve

    source = moe_checkpoint("deepseek_v3")
    pieces = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / f"{method}.gguf"
        extra = CALIB_ARGS if method == "gptq" else ()
        result = run_cli("quantize", source, "-o", out, "--type", "Q8_0", "--method", method, *extra)
        assert result.exit_code == 0, result.stderr
        with resolve(str(out)) as opened:
            name = "model.layers.0.self_attn.kv_b_proj.weight"
            pieces[method] = gguf_split(name, opened.config).split(opened.load(name).float(), opened.config)
    assert torch.equal(pieces["rtn"][0], pieces["gptq"][0])          # attn_k_b: rounded to nearest
    assert not torch.equal(pieces["rtn"][1], pieces["gptq"][1])      # attn_v_b: calibrated

    pytest.importorskip("llama_cpp")
    with resolve(str(tmp_path / "gptq.gguf")) as opened:
        expected = transformers_logits(model_from_source(opened), PROMPT_IDS[0])
    got = llamacpp_logits(llamacpp_model(tmp_path / "gptq.gguf"), PROMPT_IDS[0])
    # (llama.cpp rounds the activations to 8 bits for Q8_0 matrix products: close, not equal)
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.999


def test_gguf_dry_run_sizes_deepseek_split_matrices_as_written(tmp_path):
    """--dry-run sizes DeepSeek's kv_b_proj as the two tensors the GGUF stores: with a latent of 256 and
    heads of 32, attn_v_b's rows (256) take Q4_K while attn_k_b's (32, transposed) fall back to Q5_0, so
    the matrix is not sized as one Q4_K tensor; every row of the plan's report has the written bytes."""
    from tests._architectures import build_checkpoint

    source = build_checkpoint("deepseek_v2", tmp_path / "model", tokenizer_from=None, vocab_size=VOCAB_SIZE,
                              overrides={"kv_lora_rank": 256})
    out = tmp_path / "out.gguf"
    reports = {}
    for extra in (("--dry-run",), ()):
        result = run_cli("quantize", source, "--type", "Q4_K_M", "-o", out, "--json", *extra)
        assert result.exit_code == 0, result.output
        reports[bool(extra)] = {row["name"]: row["bytes_after"] for row in json.loads(result.stdout)["tensors"]}
    assert any(name.endswith("kv_b_proj.weight") for name in reports[False])
    assert reports[True] == reports[False]
