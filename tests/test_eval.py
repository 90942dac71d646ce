"""Evaluation: window protocol, the model builder against transformers' own loading, perplexity
against transformers' own loss, KL/gates, and the text sources (file, Hub parquet, offline)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qtool.errors import BadArgument, NotFound, QualityGateFailed
from qtool.evaluation import check_gates, evaluate, render_eval
from qtool.evaluation.datasets import WIKITEXT2_FILE, WIKITEXT2_REPO, join_rows, read_parquet_text, read_text_file
from qtool.evaluation.model import load_causal_lm
from qtool.evaluation.perplexity import plan_windows, tokenize, window_batch

CTX = 64


@pytest.fixture(scope="module")
def short_text(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first ~12 KB of WikiText-2 test (about 3,000 SmolLM2 tokens), CRLF line ends kept."""
    raw = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_bytes()
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_bytes(raw[:12_000].rsplit(b"\r\n", 1)[0] + b"\r\n")
    return path


@pytest.fixture(scope="module")
def other_tiny_llama(smollm2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qtool.synthetic import SHAPES, write_synthetic_llama

    return write_synthetic_llama(tmp_path_factory.mktemp("tiny-llama-seed7"), **SHAPES["tiny"], seed=7,
                                 tokenizer_from=smollm2_tokenizer_dir)


# -- windows ------------------------------------------------------------------------------------

def test_windows_follow_llama_perplexity() -> None:
    plan = plan_windows(2000, ctx=512)
    # n_chunk = tokens / n_ctx; first = n_ctx / 2; n_ctx - 1 - first tokens scored per chunk.
    assert plan.starts == [0, 512, 1024] and plan.first == 256 and plan.scored_per_window == 255
    assert plan_windows(2000, ctx=512, chunks=2).windows == 2
    assert plan_windows(2000, ctx=512, chunks=99).windows == 3
    # --ppl-stride: (tokens - n_ctx + stride - 1) / stride windows, the last `stride` logits scored.
    strided = plan_windows(2000, ctx=512, stride=128)
    assert strided.windows == (2000 - 512 + 127) // 128 == 12
    assert strided.starts[:3] == [0, 128, 256] and strided.first == 512 - 128 - 1
    assert strided.scored_per_window == 128 and strided.bos_token_id is None
    assert strided.starts[-1] + 512 <= 2000


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(n_tokens=1000, ctx=512), "needs at least 1024"),
    (dict(n_tokens=5000, ctx=512, stride=512), "--stride 512"),
    (dict(n_tokens=5000, ctx=512, stride=0), "--stride 0"),
    (dict(n_tokens=5000, ctx=512, chunks=0), "--chunks 0"),
    (dict(n_tokens=5000, ctx=2), "--ctx 2"),
])
def test_window_errors_name_the_option(kwargs: dict, fragment: str) -> None:
    with pytest.raises(BadArgument, match=fragment):
        plan_windows(kwargs.pop("n_tokens"), **kwargs)


def test_window_batch_puts_bos_first_and_scores_original_tokens() -> None:
    tokens = torch.arange(100, 1100)
    plan = plan_windows(len(tokens), ctx=8, chunks=3, bos_token_id=1)
    inputs, targets = window_batch(tokens, plan, range(1, 3))
    assert inputs[:, 0].tolist() == [1, 1]
    assert inputs[0, 1:].tolist() == list(range(109, 116))
    # logits at positions 4..6 predict tokens 5..7 of each window
    assert targets.tolist() == [[113, 114, 115], [121, 122, 123]]
    no_bos, _ = window_batch(tokens, plan_windows(len(tokens), ctx=8), range(0, 1))
    assert no_bos[0, 0].item() == 100


# -- the model builder and perplexity against transformers ---------------------------------------

def test_model_matches_transformers_from_pretrained(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = load_causal_lm(str(tiny_llama_dir), dtype="fp32", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(ids).logits
        got = ours.model(ids).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "cpu" for p in ours.model.parameters())
    assert ours.parameters == sum(p.numel() for p in reference.parameters())


def test_gpu_device_map_spreads_whole_blocks(tiny_llama_dir: Path) -> None:
    """The multi-GPU plan is accelerate's device map (computed here for 2 GPUs without any): only
    when one GPU's budget is too small, never splitting a decoder block, and a clear error when
    the GPUs together are too small."""
    import warnings

    from qtool.evaluation.model import _parameters_on_meta, gpu_device_map, hf_config
    from qtool.sources.resolve import resolve
    from transformers import AutoModelForCausalLM

    with resolve(str(tiny_llama_dir)) as source:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf_config(source.config), dtype=torch.float32)
    size = sum(p.numel() for p in model.parameters()) * 4
    assert gpu_device_map(model, torch.float32, gpu_memory=size, gpus=2) is None
    assert gpu_device_map(model, torch.float32, gpu_memory=size // 4, gpus=1) is None     # one GPU: nothing to plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # accelerate warns that GPUs 0 and 1 are not visible here
        plan = gpu_device_map(model, torch.float32, gpu_memory=int(size * 0.99), gpus=2)
        assert plan is not None and set(plan.values()) == {0, 1}
        assert plan["model.embed_tokens"] == 0 and plan["lm_head"] == 1
        assert not any(".layers." in name and name.count(".") > 2 for name in plan), plan   # blocks whole
        with pytest.raises(BadArgument, match="--gpu-memory"):
            gpu_device_map(model, torch.float32, gpu_memory=size // 4, gpus=2)


def test_ppl_equals_transformers_loss_over_second_halves(tiny_llama_dir: Path, short_text: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = evaluate([str(tiny_llama_dir)], text_file=short_text, ctx=CTX, chunks=5, device="cpu", batch_size=2)
    row = report.models[0]
    assert (row.windows, row.tokens, row.tokens_evaluated) == (5, 5 * (CTX - 1 - CTX // 2), 5 * CTX)
    assert row.tokens_per_s > 0 and row.seconds > 0

    # Reference: transformers' own causal-LM loss, with the first half of each window masked out.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    ids = tokenizer(short_text.read_bytes().decode(), add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.inference_mode():
        for chunk in range(5):
            window = torch.tensor(ids[chunk * CTX:(chunk + 1) * CTX])[None]
            labels = window.clone()
            labels[:, :CTX // 2 + 1] = -100
            loss = model(window, labels=labels).loss
            scored = int((labels != -100).sum())
            total, count = total + float(loss) * scored, count + scored
    assert count == row.tokens
    assert row.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_bf16_close_to_fp32(tiny_llama_dir: Path, short_text: Path) -> None:
    fp32 = evaluate([str(tiny_llama_dir)], text_file=short_text, ctx=CTX, chunks=3, device="cpu").models[0]
    bf16 = evaluate([str(tiny_llama_dir)], text_file=short_text, ctx=CTX, chunks=3, device="cpu",
                    dtype="bf16").models[0]
    assert bf16.ppl == pytest.approx(fp32.ppl, rel=0.02)
    assert bf16.ppl != fp32.ppl


def test_same_weights_as_baseline_give_zero_divergence(tiny_llama_dir: Path, short_text: Path) -> None:
    # The same folder named two ways: the model is evaluated against itself.
    report = evaluate([str(tiny_llama_dir / "config.json")], baseline=str(tiny_llama_dir), text_file=short_text,
                      ctx=CTX, chunks=3, device="cpu", max_ppl_increase=0.01, max_kld=1e-6)
    base, row = report.models
    assert base.is_baseline and base.model == str(tiny_llama_dir)
    assert row.ppl == pytest.approx(base.ppl, rel=1e-6)
    assert abs(row.delta) < 1e-6 * base.ppl and abs(row.delta_pct) < 1e-4
    assert abs(row.mean_kld) < 1e-6 and row.top1_agreement == 1.0 and row.rms_dp < 1e-6
    assert report.gate_failures == []
    check_gates(report)


@pytest.mark.slow
def test_kl_divergence_and_gates_between_different_models(tiny_llama_dir: Path, other_tiny_llama: Path,
                                                           short_text: Path) -> None:
    report = evaluate([str(other_tiny_llama)], baseline=str(tiny_llama_dir), text_file=short_text, ctx=CTX,
                      chunks=3, device="cpu", batch_size=3)
    base, row = report.models
    assert row.delta == pytest.approx(row.ppl - base.ppl)
    assert row.delta_pct == pytest.approx(100 * (row.ppl / base.ppl - 1))
    assert row.mean_kld > 0.01 and row.kld_stderr > 0 and 0 <= row.top1_agreement < 1
    assert row.kld_max >= row.kld_p99 >= row.kld_median > 0

    # The same KL divergence computed directly from the two models' logits.
    a = load_causal_lm(str(tiny_llama_dir), device="cpu")
    b = load_causal_lm(str(other_tiny_llama), device="cpu")
    tokens = tokenize(a, short_text.read_bytes().decode())
    inputs, _ = window_batch(tokens, plan_windows(len(tokens), ctx=CTX, chunks=3), range(3))
    with torch.inference_mode():
        log_p = torch.log_softmax(a.model(inputs).logits[:, CTX // 2:-1].double(), -1)
        log_q = torch.log_softmax(b.model(inputs).logits[:, CTX // 2:-1].double(), -1)
    kld = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    assert row.mean_kld == pytest.approx(float(kld.mean()), rel=1e-4)
    assert row.top1_agreement == pytest.approx(float((log_p.argmax(-1) == log_q.argmax(-1)).double().mean()))

    # Gates take limits of at least 0: score the higher-perplexity model of the two against the other.
    worse, better = ((other_tiny_llama, tiny_llama_dir) if row.delta_pct > 0 else (tiny_llama_dir, other_tiny_llama))
    gated = evaluate([str(worse)], baseline=str(better), text_file=short_text, ctx=CTX, chunks=3, device="cpu",
                     max_ppl_increase=0.0, max_kld=row.mean_kld / 100)
    assert len(gated.gate_failures) == 2
    with pytest.raises(QualityGateFailed) as failure:
        check_gates(gated)
    assert failure.value.exit_code == 8
    assert "--max-ppl-increase" in failure.value.message and "--max-kld" in failure.value.message
    assert "\n" not in failure.value.message


def test_render_eval_shows_the_numbers(tiny_llama_dir: Path, other_tiny_llama: Path, short_text: Path) -> None:
    from rich.console import Console

    report = evaluate([str(other_tiny_llama)], baseline=str(tiny_llama_dir), text_file=short_text, ctx=CTX,
                      chunks=2, device="cpu", max_kld=0.0)
    console = Console(record=True, width=200)
    render_eval(report, console)
    out = console.export_text()
    row = report.models[1]
    assert f"{row.ppl:.4f}" in out and f"{row.mean_kld:.5f}" in out and f"{row.delta_pct:+.2f}%" in out
    assert "gate failed" in out and "--max-kld" in out


def test_argument_errors(tiny_llama_dir: Path, short_text: Path, tmp_path: Path) -> None:
    with pytest.raises(BadArgument, match="--baseline"):
        evaluate([str(tiny_llama_dir)], text_file=short_text, max_ppl_increase=1.0)
    with pytest.raises(NotFound, match="--text"):
        evaluate([str(tiny_llama_dir)], text_file=tmp_path / "missing.txt")
    # Every model path is checked before the first is loaded: the broken first file is never reached.
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    with pytest.raises(NotFound, match="missing-model"):
        evaluate([str(broken), str(tmp_path / "missing-model")], text_file=short_text)
    with pytest.raises(NotFound, match="missing-base"):
        evaluate([str(broken)], baseline=str(tmp_path / "missing-base"), text_file=short_text)
    with pytest.raises(BadArgument, match="--dtype"):
        evaluate([str(tiny_llama_dir)], text_file=short_text, dtype="int3")
    with pytest.raises(BadArgument, match="--batch-size"):
        evaluate([str(tiny_llama_dir)], text_file=short_text, batch_size=0)
    with pytest.raises(BadArgument, match="needs at least"):
        evaluate([str(tiny_llama_dir)], text_file=short_text, ctx=4096)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(BadArgument, match="UTF-8"):
        read_text_file(latin1)


# -- text sources -------------------------------------------------------------------------------

def _wikitext_parquet(raw: bytes, path: Path) -> Path:
    """A parquet shaped like the Hub's: one row per line with its line end, plus empty rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = raw.decode("utf-8").splitlines(keepends=True)
    rows = [""]
    for line in lines:
        rows += [line, ""] if line.startswith(" = ") else [line]
    pq.write_table(pa.table({"text": rows}), path)
    return path


def test_parquet_rows_join_back_to_wiki_test_raw(shared_data: Path, tmp_path: Path) -> None:
    raw = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_bytes()
    parquet = _wikitext_parquet(raw, tmp_path / "test.parquet")
    assert read_parquet_text(parquet).encode("utf-8") == raw
    assert join_rows(["a\n", "", None, "b\r\n"]) == "a\nb\r\n"


_DOWNLOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    from qtool.errors import QtoolError
    from qtool.evaluation.datasets import load_text
    try:
        text = load_text(None, "wikitext2")
        print(json.dumps({"sha256": text.sha256, "label": text.label}))
    except QtoolError as exc:
        print(json.dumps({"error": type(exc).__name__, "exit_code": exc.exit_code, "message": exc.message}))
""")


@pytest.mark.slow
def test_wikitext2_download_cache_and_offline(shared_data: Path, tmp_path: Path) -> None:
    import hashlib
    import json

    from tests._hub_server import FakeHub

    class DatasetHub(FakeHub):
        """The sources' fake Hub, answering dataset URLs (``/datasets/...``) too."""

        def _handle(self, handler, *, head):  # type: ignore[override]
            for prefix, replacement in (("/api/datasets/", "/api/models/"), ("/datasets/", "/")):
                if handler.path.startswith(prefix):
                    handler.path = replacement + handler.path[len(prefix):]
                    break
            return super()._handle(handler, head=head)

    raw = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_bytes()
    parquet = _wikitext_parquet(raw, tmp_path / "test.parquet")

    def run(**env: str) -> dict:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        environ.update({"HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
                        "HF_HUB_DISABLE_TELEMETRY": "1"}, **env)
        done = subprocess.run([sys.executable, "-c", _DOWNLOAD_SCRIPT], capture_output=True, text=True,
                              timeout=120, env=environ, cwd=Path(__file__).resolve().parents[1])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    # Offline with an empty cache: a NetworkError that points at --text.
    offline = run(HF_HUB_OFFLINE="1")
    assert offline["error"] == "NetworkError" and offline["exit_code"] == 6
    assert "--text FILE" in offline["message"] and "\n" not in offline["message"]

    hub = DatasetHub()
    with hub:
        hub.repo(WIKITEXT2_REPO).add_commit({WIKITEXT2_FILE: parquet.read_bytes()})
        online = run(HF_ENDPOINT=hub.url)
        assert any(r.path.endswith(WIKITEXT2_FILE) for r in hub.requests)
    assert online["sha256"] == hashlib.sha256(raw).hexdigest()
    assert "wikitext2" in online["label"]
    # The server is gone: the cached copy serves offline.
    cached = run(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1")
    assert cached["sha256"] == online["sha256"]
