"""--target-bpw / --max-size: each tensor's GGUF type chosen from its measured damage (qtool.sizing), the
Fisher sensitivity it is measured with (qtool.calibration.fisher), and the files it writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qtool import sizing
from qtool.cli import app
from qtool.errors import BadArgument

from tests._architectures import MODEL_TYPES, MOE_VARIANTS
from tests._gguf_helpers import llamacpp_model, make_spm_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A small random Llama whose rows of 256 take every K-quant and i-quant."""
    return make_spm_llama(tmp_path_factory.mktemp("sizing"))


@pytest.fixture(scope="module")
def calib_text(shared_data) -> Path:
    return shared_data / "calibration" / "groups_merged.txt"


def _ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values))


def test_fisher_damage_predicts_the_measured_kl_divergence(spm_model, calib_text):
    """The second-order damage of each weight quantized alone (1/2 sum F dW^2, F the weight's Fisher
    diagonal), the embeddings and the output matrix included, is the KL divergence that quantization
    really adds, per token of the same windows: within a factor 1.5 for every tensor, and the tensors
    ranked alike (what --max-size allocates by)."""
    from qtool.calibration.data import calibration_set
    from qtool.calibration.fisher import measure_sensitivity
    from qtool.evaluation.model import model_from_source
    from qtool.schemes.base import get_scheme
    from qtool.sources.resolve import resolve
    from qtool.tokenizer import load_tokenizer

    with resolve(str(spm_model)) as source:
        model = model_from_source(source)
        windows = calibration_set(calib_text, load_tokenizer(source), samples=8, seqlen=128, seed=0).tokens
        sensitivity = measure_sensitivity(source, windows)
    # 2 layers x 7 Linears, the embeddings, the output matrix
    assert sensitivity.tokens == windows.numel() and len(sensitivity.fisher) == 16

    def log_probs() -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(torch.cat([model(input_ids=w[None]).logits[0] for w in windows]).float(), -1)

    base = log_probs()
    parameters = dict(model.named_parameters())
    predicted, measured = [], []
    for name, fisher in sensitivity.fisher.items():
        weight = parameters[name].data.clone()
        scheme = get_scheme("Q2_K")
        predicted.append(sizing.damage(weight, "Q2_K", fisher, None))
        parameters[name].data.copy_(scheme.dequantize(scheme.quantize(weight)))
        quantized = log_probs()
        parameters[name].data.copy_(weight)
        measured.append(float((base.exp() * (base - quantized)).sum(-1).mean()))
    ratios = np.array(measured) / np.array(predicted)
    assert ratios.min() > 1 / 1.5 and ratios.max() < 1.5, dict(zip(sensitivity.fisher, ratios.round(2)))
    assert np.corrcoef(_ranks(predicted), _ranks(measured))[0, 1] > 0.95


def _whole_model_fisher(model: torch.nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference: every matrix parameter's Fisher diagonal from the whole model's forward and backward
    pass per window (transformers' model, its fused experts as they are), next tokens sampled as
    measure_sensitivity samples them."""
    matrices = {name: p for name, p in model.named_parameters() if p.dim() >= 2 and not name.endswith("bias")}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    sums = {}
    for name, parameter in matrices.items():
        parameter.requires_grad_(True)
        sums.setdefault(id(parameter), torch.zeros_like(parameter))
    generator = torch.Generator().manual_seed(0)
    for window in windows:
        logits = model(input_ids=window[None]).logits.float()[0]
        sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=generator).squeeze(-1)
        for parameter in matrices.values():
            parameter.grad = None
        torch.nn.functional.cross_entropy(logits, sampled, reduction="sum").backward()
        for parameter in {id(p): p for p in matrices.values()}.values():
            sums[id(parameter)].addcmul_(parameter.grad, parameter.grad)
    return {name: sums[id(parameter)] / windows.numel() for name, parameter in matrices.items()}


@pytest.mark.parametrize("variant", ["llama-tied", *MODEL_TYPES, *MOE_VARIANTS])
def test_block_by_block_fisher_equals_the_whole_model_backward(variant, arch_checkpoint, monkeypatch):
    """The sensitivity pass loads one block at a time and backpropagates block by block from the kept
    block inputs; its Fisher is the whole model's backward pass's, on every architecture: the output head's
    own logit scaling / soft-capping, tied embeddings (the cross term of both uses), and each expert of a
    mixture (whose sum over experts is the fused parameter's)."""
    from qtool.calibration.fisher import measure_sensitivity
    from qtool.evaluation.model import model_from_source
    from qtool.sources.resolve import resolve

    monkeypatch.setenv("QTOOL_FLOAT32_FORWARDS", "1")
    folder = arch_checkpoint(variant, 49152)
    windows = torch.randint(0, 49152, (3, 16), generator=torch.Generator().manual_seed(1))
    with resolve(str(folder)) as source:
        measured = measure_sensitivity(source, windows).fisher
        reference = _whole_model_fisher(model_from_source(source), windows)
        stored = {info.name for info in source.tensors()}
    assert set(measured) <= stored        # by the names the plan gives them (experts one by one)
    experts = {name: value for name, value in measured.items() if ".experts." in name}
    dense = {name: value for name, value in measured.items() if name not in experts}
    # Every matrix but the routers (not Linears in transformers 5; qtool keeps them unquantized).
    assert set(dense) <= set(reference)
    missing = {name for name in reference if ".experts." not in name} - set(dense)
    assert missing == {name for name in reference if name.endswith((".mlp.gate.weight", ".mlp.router.weight"))}
    for name, fisher in dense.items():
        torch.testing.assert_close(fisher, reference[name], rtol=1e-4, atol=1e-4 * float(reference[name].max()),
                                   msg=name)
    fused = {name: value for name, value in reference.items() if ".experts." in name}
    assert bool(experts) == (variant in MOE_VARIANTS) == bool(fused)
    for layer in {".".join(name.split(".")[:3]) + "." for name in fused}:   # model.layers.N.
        total = sum(float(value.sum()) for name, value in experts.items() if name.startswith(layer))
        expected = sum(float(value.sum()) for name, value in fused.items() if name.startswith(layer))
        assert total == pytest.approx(expected, rel=1e-4), layer


def test_sensitivity_pass_holds_one_block(arch_checkpoint):
    """Each block's Fisher is handed over (and the full diagonals dropped) before the next block is read;
    whenever one is handed over, no checkpoint tensor but its block's is alive (the head and the embeddings
    included)."""
    import gc
    import weakref

    from qtool.calibration.fisher import measure_sensitivity
    from qtool.sources.resolve import resolve

    with resolve(str(arch_checkpoint("llama", 49152))) as source:
        handed: dict[str, weakref.ref] = {}      # checkpoint tensor -> its storage, while alive
        load = source.load

        def counted(name: str) -> torch.Tensor:
            tensor = load(name).to(torch.float32).clone()
            handed[name] = weakref.ref(tensor.untyped_storage())
            return tensor

        source.load = counted
        alive_at_keep = []

        def keep(fisher: torch.Tensor) -> float:
            gc.collect()
            alive_at_keep.append({".".join(name.split(".")[:3]) for name, ref in handed.items() if ref() is not None})
            return float(fisher.sum())

        measured = measure_sensitivity(source, torch.randint(0, 49152, (2, 8)), keep=keep).fisher
    assert all(isinstance(value, float) for value in measured.values())
    # The output matrix with nothing alive, blocks 1 and 0 (7 Linears each) each alone, the embeddings.
    assert alive_at_keep == [set()] + [{"model.layers.1"}] * 7 + [{"model.layers.0"}] * 7 + [set()], alive_at_keep


def _group(key: str, options: list[tuple[str, int, float]]) -> sizing.Group:
    return sizing.Group(key, [key], [sizing.Option(*option) for option in options])


def test_allocation_fits_the_budget_and_beats_every_uniform_choice():
    """The chosen types fit the bytes asked for, and their total damage is no more than any single type
    for every tensor that fits; a budget below the smallest types is refused in one line."""
    generator = torch.Generator().manual_seed(3)
    types = [("A", 2, 8.0), ("B", 3, 3.0), ("C", 4, 1.5), ("D", 6, 0.5), ("E", 8, 0.1)]
    groups = []
    for index in range(40):
        sensitivity = float(torch.rand(1, generator=generator)) * 10 + 0.1
        size = int(torch.randint(1, 5, (1,), generator=generator)) * 100
        groups.append(_group(f"t{index}", [(name, nbytes * size, damage * sensitivity * size)
                                           for name, nbytes, damage in types]))
    for budget in (25_000, 31_234, 45_000, 70_000):
        chosen = sizing.allocate(groups, budget)
        assert sum(option.nbytes for option in chosen.values()) <= budget
        total = sum(option.damage for option in chosen.values())
        for name, _, _ in types:
            uniform = [next(o for o in g.options if o.scheme == name) for g in groups]
            if sum(o.nbytes for o in uniform) <= budget:
                assert total <= sum(o.damage for o in uniform) + 1e-9, name
    with pytest.raises(BadArgument, match="smallest types take"):
        sizing.allocate(groups, 5_000)


def _tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).tobytes())) for t in GGUFReader(path).tensors}


def test_max_size_writes_a_file_that_fits_runs_in_llamacpp_and_replays_from_its_plan(spm_model, calib_text, tmp_path,
                                                                                      shared_data):
    from gguf import GGUFReader

    wikitext = shared_data / "wikitext-2-raw" / "wiki.test.raw"
    size = 1_200_000
    out, plan = tmp_path / "sized.gguf", tmp_path / "plan.yaml"
    common = ["--calib", str(calib_text), "--calib-samples", "4", "--calib-seqlen", "128"]
    result = runner.invoke(app, ["quantize", str(spm_model), "--max-size", str(size), "-o", str(out),
                                 "--save-plan", str(plan), "--json", "-q", "--text", str(wikitext), "--chunks", "4",
                                 *common])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    # Scored against the source by default: what the size cost.
    scored = report["evaluation"]["models"][-1]         # after the baseline (the source)
    assert scored["mean_kld"] > 0 and scored["ppl"] > 0, scored
    assert 0.97 * size <= out.stat().st_size <= size, out.stat().st_size
    chosen = report["sizing"]["choices"]
    assert len(chosen) == 16 and len(set(chosen.values())) > 1          # a mix, not one type
    reader = GGUFReader(out)
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    assert stored["blk.0.attn_v.weight"] == chosen["model.layers.0.self_attn.v_proj.weight"]
    field = reader.fields["qtool.plan"]
    assert bytes(field.parts[field.data[0]]).decode() == plan.read_text()
    runtime = llamacpp_model(out)
    tokens = runtime.tokenize(b"The capital of France is", add_bos=True)
    runtime.eval(tokens)
    assert np.isfinite(np.asarray(runtime.scores[: len(tokens)])).all()
    runtime.close()
    # The saved plan is a preset: --config gives the same tensors without measuring again.
    again = tmp_path / "again.gguf"
    result = runner.invoke(app, ["quantize", str(spm_model), "--config", str(plan), "-o", str(again), "-q"])
    assert result.exit_code == 0, result.output
    assert _tensor_bytes(again) == _tensor_bytes(out)
    bpw_out = tmp_path / "bpw.gguf"
    # --target-bpw: the bits per quantized weight asked for, within the last tensor's step; --types: only those.
    kquants = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    result = runner.invoke(app, ["quantize", str(spm_model), "--target-bpw", "3.5", "-o", str(bpw_out), "--json",
                                 "-q", "--no-eval", "--types", ",".join(sorted(kquants)), *common])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 3.3 <= report["bits_per_weight_quantized"] <= 3.5
    assert set(report["sizing"]["choices"].values()) <= kquants


def test_dry_run_shows_the_chosen_plan_and_saves_only_the_plan(spm_model, calib_text, tmp_path):
    out, plan = tmp_path / "dry.gguf", tmp_path / "plan.yaml"
    arguments = ["quantize", str(spm_model), "--target-bpw", "4", "-o", str(out), "--dry-run", "--save-plan", str(plan),
                 "--calib", str(calib_text), "--calib-samples", "2", "--calib-seqlen", "64"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "sized to 4 bits per weight" in result.output and "model.layers.1.mlp.down_proj.weight" in result.output
    assert not out.exists() and plan.read_text().startswith("# qtool plan")
    assert runner.invoke(app, arguments).exit_code == 7            # an existing plan needs --force
    assert runner.invoke(app, [*arguments, "--force"]).exit_code == 0
    plan.write_text("my own notes\n")                              # not qtool's: --force leaves it alone
    assert runner.invoke(app, [*arguments, "--force"]).exit_code == 7
    assert plan.read_text() == "my own notes\n"


@pytest.mark.parametrize("arguments, code, message", [
    (["--max-size", "1MB", "--target-bpw", "4"], 2, "--target-bpw and --max-size both set the size"),
    (["--max-size", "1MB", "--type", "Q4_K"], 2, "drop --type"),
    (["--save-plan", "p.yaml", "--type", "Q4_K"], 2, "--save-plan and --types are for the plan"),
    (["--max-size", "1MB", "--types", "Q4_K,nf4"], 2, "--types nf4: not a gguf type"),
    (["--target-bpw", "0.5"], 2, "between 1 and 16"),
    (["--max-size", "20KB"], 2, "smallest types take"),
])
def test_sizing_options_are_refused_in_one_line(spm_model, calib_text, tmp_path, arguments, code, message):
    out = tmp_path / "refused.gguf"
    result = runner.invoke(app, ["quantize", str(spm_model), "-o", str(out), "--calib", str(calib_text),
                                 "--calib-samples", "2", "--calib-seqlen", "64", *arguments])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_target_bpw_writes_mixed_compressed_tensors_that_transformers_loads(spm_model, calib_text, tmp_path):
    """For safetensors the types come from compressed-tensors' weight-only schemes (int4 groups, int8,
    NVFP4, MXFP4) as mixed config groups; siblings vLLM fuses (q/k/v, gate/up) share one. transformers
    decompresses exactly the weights qtool reads back, and runs them."""
    from transformers import AutoModelForCausalLM

    from qtool.sources.resolve import resolve
    from tests._safetensors_helpers import logits

    out = tmp_path / "mixed"
    result = runner.invoke(app, ["quantize", str(spm_model), "--format", "safetensors", "--target-bpw", "6", "-o",
                                 str(out), "--json", "-q", "--no-eval", "--calib", str(calib_text), "--calib-samples",
                                 "4", "--calib-seqlen", "128"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    chosen = report["sizing"]["choices"]
    assert len(chosen) == 14 and len(set(chosen.values())) > 1, chosen      # embeddings and head kept
    assert 5.0 <= report["bits_per_weight_quantized"] <= 6.0
    for layer in (0, 1):
        prefix = f"model.layers.{layer}"
        assert len({chosen[f"{prefix}.self_attn.{leaf}.weight"] for leaf in ("q_proj", "k_proj", "v_proj")}) == 1
        assert chosen[f"{prefix}.mlp.gate_proj.weight"] == chosen[f"{prefix}.mlp.up_proj.weight"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == len(set(chosen.values()))
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    with resolve(str(out)) as written:
        read_back = {name: written.load(name) for name in chosen}
    reference = AutoModelForCausalLM.from_pretrained(spm_model, dtype=torch.float32, device_map="cpu").eval()
    reference.load_state_dict({name: value.float() for name, value in read_back.items()}, strict=False)
    ids = [[1, 504, 1345, 30, 378, 12, 99, 1500]]
    got, expected = logits(model, ids), logits(reference, ids)
    # transformers runs the file in bfloat16 (int8 groups as compressed-tensors' quantized Linears)
    assert (got - expected).abs().max() <= 0.05 * expected.std()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # --max-size counts the whole folder: tokenizer, config, model card and the shards' headers too.
    size = int(0.95 * sum(path.stat().st_size for path in out.iterdir()))
    smaller = tmp_path / "smaller"
    result = runner.invoke(app, ["quantize", str(spm_model), "--format", "safetensors", "--max-size", str(size), "-o",
                                 str(smaller), "-q", "--no-eval", "--calib", str(calib_text), "--calib-samples", "4",
                                 "--calib-seqlen", "128"])
    assert result.exit_code == 0, result.output
    assert 0.97 * size <= sum(path.stat().st_size for path in smaller.iterdir()) <= size
