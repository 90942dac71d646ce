"""Calibration data, observers and the layer-by-layer statistics pass.

The pass is checked against the plain transformers model: statistics of every Linear's inputs
collected block by block must equal those collected by hooks on the whole model's forward.
"""
from __future__ import annotations

import json

import gc
import weakref
from pathlib import Path

import pytest
import torch

from qtool.calibration.data import CalibrationSet, calibration_set, read_calibration_text, sample_windows
from qtool.tokenizer import load_tokenizer
from qtool.calibration.activation import choose_scale
from qtool.calibration.observers import InputObserver
from qtool.calibration import runner
from qtool.calibration.runner import calibrate, hf_config, load_stats, save_stats, walk_blocks
from qtool.errors import BadArgument, CorruptFile, NetworkError, NotFound
from qtool.sources.resolve import resolve
from tests._architectures import MODEL_TYPES


def test_windows_are_seeded_slices_of_the_text() -> None:
    ids = torch.arange(1000, 3000)
    first = sample_windows(ids, samples=6, seqlen=50, seed=3)
    again = sample_windows(ids, samples=6, seqlen=50, seed=3)
    other = sample_windows(ids, samples=6, seqlen=50, seed=4)
    assert first.shape == (6, 50)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Each window is a contiguous run of the token stream.
    assert torch.equal(first[:, 1:] - first[:, :-1], torch.ones(6, 49, dtype=torch.long))
    with_bos = sample_windows(ids, samples=6, seqlen=50, seed=3, bos_token_id=1)
    assert torch.equal(with_bos[:, 0], torch.ones(6, dtype=torch.long))
    assert torch.equal(with_bos[:, 1:], first[:, 1:])


def test_calibration_text_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(NotFound, match="--calib"):
        read_calibration_text(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(BadArgument, match="empty"):
        read_calibration_text(empty)
    with pytest.raises(BadArgument, match="--calib-seqlen"):
        sample_windows(torch.arange(10), samples=2, seqlen=64, seed=0)
    # The Hub default, offline with a cold cache: the error says to pass a file.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(NetworkError, match="--calib FILE"):
        read_calibration_text("wikitext2-train")


def test_observer_matches_direct_statistics() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(3, 40, 24) * torch.linspace(0.1, 3, 24) for _ in range(4)]
    observer = InputObserver(24, want_hessian=True, sample_per_update=1 << 20)
    for batch in batches:
        observer.update(batch)
    stats = observer.finish()
    x = torch.cat([b.reshape(-1, 24) for b in batches])
    assert stats.tokens == x.shape[0]
    torch.testing.assert_close(stats.absmax, x.abs().amax(0))
    torch.testing.assert_close(stats.mean_square, (x * x).mean(0))
    torch.testing.assert_close(stats.hessian, x.T @ x, rtol=1e-5, atol=1e-4)
    assert stats.act_min == float(x.min()) and stats.act_max == float(x.max())
    # Every element was sampled (budget above the element count): percentiles are exact order statistics.
    assert abs(stats.percentiles["p99"] - float(torch.quantile(x.abs().reshape(-1), 0.99))) < 0.05
    minmax = choose_scale(stats, "minmax").scale
    assert minmax == pytest.approx(float(x.abs().max()) / 127)
    assert choose_scale(stats, "percentile", percentile=99.0).scale < minmax
    assert 0 < choose_scale(stats, "mse").scale <= minmax * 1.0001


def _tiny_set(source, samples: int = 3, seqlen: int = 32, seed: int = 0) -> CalibrationSet:
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "calibration" / "groups_merged.txt"
    if not text.is_file():
        pytest.skip(f"calibration text {text} is absent")
    return calibration_set(text, load_tokenizer(source), samples=samples, seqlen=seqlen, seed=seed)


def _full_model_stats(source, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X per Linear from hooks on the whole transformers model (the reference)."""
    from qtool.evaluation.model import model_from_source

    model = model_from_source(source)
    hessians: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name] = hessians.get(name, 0) + x.T @ x
        return hook

    handles = [module.register_forward_pre_hook(hook_for(f"{name}.weight"))
               for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name]
    with torch.inference_mode():
        model(tokens)
    for handle in handles:
        handle.remove()
    return hessians


def test_block_by_block_matches_whole_model(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTOOL_FLOAT32_FORWARDS", "1")     # the walk itself, in the reference's precision
    with resolve(str(tiny_llama_dir)) as source:
        calib = _tiny_set(source)
        stats = calibrate(source, calib_set=calib)
        reference = _full_model_stats(source, calib.tokens)
    assert set(stats.linears) == set(reference)
    for name, hessian in reference.items():
        torch.testing.assert_close(stats.linears[name].hessian, hessian, rtol=1e-4, atol=1e-3, msg=name)
        assert stats.linears[name].tokens == calib.tokens.numel()
    # q/k/v (and gate/up) see the same input: one shared statistics object.
    layer = "model.layers.1."
    assert stats.linears[f"{layer}self_attn.q_proj.weight"] is stats.linears[f"{layer}self_attn.v_proj.weight"]
    assert stats.linears[f"{layer}mlp.gate_proj.weight"] is stats.linears[f"{layer}mlp.up_proj.weight"]
    assert stats.linears[f"{layer}mlp.up_proj.weight"] is not stats.linears[f"{layer}mlp.down_proj.weight"]
    assert [r.layer for r in stats.records] == [0, 1]


@pytest.mark.skipif(not runner._cpu_has_bf16_products(), reason="this CPU has no bfloat16 products")
def test_bfloat16_products_on_the_cpu_keep_the_statistics_within_a_percent(tiny_llama_dir: Path) -> None:
    """The default CPU walk multiplies bfloat16 inputs (float32 sums): X^T X and the mean squares stay
    within 1% of float32's (bfloat16 keeps 8 bits: each input is off by at most 2^-9 of itself)."""
    with resolve(str(tiny_llama_dir)) as source:
        calib = _tiny_set(source)
        fast = calibrate(source, calib_set=calib)
        reference = _full_model_stats(source, calib.tokens)
    for name, hessian in reference.items():
        scale = torch.diagonal(hessian).mean()
        torch.testing.assert_close(fast.linears[name].hessian / scale, hessian / scale, rtol=0, atol=1e-2, msg=name)
        assert (fast.linears[name].hessian - hessian).abs().max() > 0, "the walk ran in float32"


@pytest.mark.parametrize("variant", ["tiny-llama", *MODEL_TYPES])
def test_per_group_walk_sees_the_changed_earlier_groups(variant: str, tiny_llama_dir: Path, arch_checkpoint,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """per_group: each Linear's statistics are those of its inputs in the model whose earlier Linears
    (same block included) carry the consumer's changes, as a whole-model forward of that model says
    (the passes that reuse the attention's output once q/k/v/o are final included: a block that changed
    it in place would show here), on every architecture."""
    monkeypatch.setenv("QTOOL_FLOAT32_FORWARDS", "1")
    folder = tiny_llama_dir if variant == "tiny-llama" else arch_checkpoint(variant, 49152)
    from qtool.calibration.methods import OverlaySource

    def change(weight: torch.Tensor) -> torch.Tensor:
        return torch.round(weight * 8) / 8

    with resolve(str(folder)) as source:
        calib = _tiny_set(source)
        changed: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}
        order: list[list[str]] = []
        for step in walk_blocks(source, calib, per_group=True):
            order.append(sorted(name.rsplit(".", 2)[-2] for name in step.linears))
            for name, module in step.linears.items():
                seen[name] = step.stats[name].hessian.clone()
                changed[name] = change(module.weight.detach())
                module.weight = torch.nn.Parameter(changed[name], requires_grad=False)
            step.modified = True
        reference = _full_model_stats(OverlaySource(source, changed), calib.tokens)
    if variant == "tiny-llama":
        assert order[:4] == [["k_proj", "q_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert set(seen) == set(reference)
    for name, hessian in reference.items():
        torch.testing.assert_close(seen[name], hessian, rtol=1e-4, atol=1e-3, msg=name)


def test_stats_save_load_round_trip(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with resolve(str(tiny_llama_dir)) as source:
        stats = calibrate(source, calib_set=_tiny_set(source, samples=2))
    path = save_stats(stats, tmp_path / "stats.safetensors")
    loaded = load_stats(path)
    assert (loaded.model, loaded.calib, loaded.samples, loaded.seqlen, loaded.seed) == \
        (stats.model, stats.calib, stats.samples, stats.seqlen, stats.seed)
    assert set(loaded.linears) == set(stats.linears)
    for name, item in stats.linears.items():
        other = loaded.linears[name]
        for key in ("absmax", "mean_square", "hessian", "abs_sample"):
            assert torch.equal(getattr(item, key), getattr(other, key)), (name, key)
        assert (other.tokens, other.act_min, other.act_max, other.percentiles) == \
            (item.tokens, item.act_min, item.act_max, item.percentiles)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert loaded.linears[q] is loaded.linears[q.replace("q_proj", "k_proj")]
    assert loaded.summary()["layers"] == stats.summary()["layers"]
    # Shared inputs are stored once: 4 sites per block (qkv, o, gate/up, down) x 4 tensors.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert len(list(handle.keys())) == 2 * 4 * 4
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises((CorruptFile, BadArgument)):
        load_stats(bad)
    with pytest.raises(NotFound, match="qtool calibrate"):
        load_stats(tmp_path / "absent.safetensors")


def test_statistics_streamed_to_the_file_block_by_block(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """calibrate(output=...) writes each block's tensors as the block finishes: the same file as
    save_stats of the in-memory statistics, while the returned statistics keep no X^T X; a walk
    that fails leaves no file and no staging leftovers."""
    from safetensors import safe_open

    with resolve(str(tiny_llama_dir)) as source:
        kept = calibrate(source, calib_set=_tiny_set(source, samples=2))
        streamed = calibrate(source, calib_set=_tiny_set(source, samples=2), output=tmp_path / "s.safetensors")
    assert all(item.hessian is None and item.abs_sample is None for item in streamed.linears.values())
    assert streamed.summary()["has_hessian"] and streamed.summary()["linears"] == kept.summary()["linears"]
    reference = save_stats(kept, tmp_path / "k.safetensors")
    with safe_open(str(reference), framework="pt") as a, safe_open(str(tmp_path / "s.safetensors"), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
        stats_a, stats_b = json.loads(a.metadata()["stats"]), json.loads(b.metadata()["stats"])
        assert stats_a["linears"] == stats_b["linears"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors", "s.safetensors"]

    class Failing:
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def load(self, name):
            if name.startswith("model.layers.1."):
                raise OSError("disk went away")
            return self._inner.load(name)

    with resolve(str(tiny_llama_dir)) as source:
        with pytest.raises(OSError):
            calibrate(Failing(source), calib_set=_tiny_set(source, samples=2), output=tmp_path / "f.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors", "s.safetensors"]


class _CountingSource:
    """Wraps a source and keeps weak references to the storage of every tensor it hands out (a Parameter
    made from a tensor is another Python object on the same storage)."""

    def __init__(self, source) -> None:
        self._source = source
        self.handed: dict[str, weakref.ref] = {}

    def __getattr__(self, name):
        return getattr(self._source, name)

    def load(self, name: str) -> torch.Tensor:
        tensor = self._source.load(name).to(torch.float32).clone()
        self.handed[name] = weakref.ref(tensor.untyped_storage())
        return tensor


def test_only_one_block_is_in_memory(tiny_llama_dir: Path) -> None:
    with resolve(str(tiny_llama_dir)) as source:
        counting = _CountingSource(source)
        calib = _tiny_set(source, samples=2)
        for step in walk_blocks(counting, calib, want_hessian=False):
            gc.collect()
            alive = {name for name, ref in counting.handed.items() if ref() is not None}
            # Nothing of earlier blocks (nor the embedding) is still referenced, and later blocks are unread.
            assert alive and all(name.startswith(f"model.layers.{step.index}.") for name in alive), sorted(alive)
            assert not any(name.startswith(f"model.layers.{step.index + 1}.") for name in counting.handed)
            assert step.linears and all(m.weight.device.type == "cpu" for m in step.linears.values())


def test_hf_config_rejects_unknown_model_type() -> None:
    from qtool.errors import Unsupported

    with pytest.raises(Unsupported):
        hf_config({"hidden_size": 8})
