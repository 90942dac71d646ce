"""The Hub path for real: a local Hub-compatible server (tests/_hub_server.py) serving a sharded
synthetic Llama at two commits, and `qtool inspect org/name@revision` run as a subprocess with
HF_ENDPOINT pointing at it and HF_HOME in a temporary folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qtool.errors import NetworkError, NotFound
from qtool.synthetic import write_synthetic_llama
from tests._hub_server import FakeHub

TOKEN = "hf_test_secret_token_123"
SMALL = dict(hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, vocab_size=256)


def _qtool(*args: str, hub: FakeHub, hf_home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("HF_") and key not in ("HUGGING_FACE_HUB_TOKEN",)}
    environ.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1",
                    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}, **env)
    return subprocess.run([sys.executable, "-m", "qtool", *args], check=False, capture_output=True, text=True, timeout=120,
                          env=environ)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert done.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub-models")
    v1 = write_synthetic_llama(root / "v1", **SMALL, num_layers=2, shards=2, seed=1)
    v2 = write_synthetic_llama(root / "v2", **SMALL, num_layers=3, shards=3, seed=2)
    with FakeHub() as server:
        repo = server.repo("org/name")
        server.first_commit = repo.add_folder(v1, refs=("main",))
        # A second commit on branch "dev": another model, so revisions give different content.
        server.second_commit = repo.add_commit({**{p.name: p.read_bytes() for p in v2.iterdir()},
                                                "pytorch_model.bin": b"\x80\x04K\x01."}, refs=("dev",))
        private = server.repo("org/private")
        private.token = TOKEN
        private.add_folder(v1)
        pickles = server.repo("org/pickles")
        pickles.add_commit({"config.json": (v1 / "config.json").read_bytes(),
                            "pytorch_model.bin": b"\x80\x04K\x01."})
        server.v1 = v1
        yield server


def test_inspect_hub_revision_token_and_offline(hub: FakeHub, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"
    done = _qtool("inspect", f"org/name@{hub.first_commit}", "--json", hub=hub, hf_home=hf_home, HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["revision"] == hub.first_commit
    assert report["tensor_count"] == 1 + 2 * 9 + 2 and len(report["files"]) == 2
    assert report["file_size"] == sum(p.stat().st_size for p in hub.v1.glob("*.safetensors"))
    assert TOKEN not in done.stderr + done.stdout
    # The token went out with the requests, and only allowed files were fetched (no pickle).
    assert hub.requests and all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests)
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r.path}
    assert "model-00001-of-00002.safetensors" in fetched and "model.safetensors.index.json" in fetched
    assert "pytorch_model.bin" not in fetched

    # Another revision gives other content.
    done = _qtool("inspect", "org/name", "--revision", "dev", "--json", hub=hub, hf_home=hf_home)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["revision"] == hub.second_commit and report["tensor_count"] == 1 + 3 * 9 + 2

    # Second run offline: served from the cache, no request reaches the server.
    before = len(hub.requests)
    done = _qtool("inspect", f"org/name@{hub.first_commit}", "--json", hub=hub, hf_home=hf_home,
                  HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revision"] == hub.first_commit
    done = _qtool("inspect", "org/name@dev", "--json", hub=hub, hf_home=hf_home, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["revision"] == hub.second_commit
    assert len(hub.requests) == before


@pytest.mark.slow
def test_hub_errors(hub: FakeHub, tmp_path: Path) -> None:
    cold = tmp_path / "cold"
    done = _qtool("inspect", f"org/name@{hub.first_commit}", hub=hub, hf_home=cold, HF_HUB_OFFLINE="1")
    assert done.returncode == NetworkError.exit_code
    assert "HF_HUB_OFFLINE" in _one_error_line(done)

    done = _qtool("inspect", "org/name@no-such-branch", hub=hub, hf_home=cold)
    assert done.returncode == NotFound.exit_code
    assert "no-such-branch" in _one_error_line(done)

    done = _qtool("inspect", "org/absent", hub=hub, hf_home=cold)
    assert done.returncode == NotFound.exit_code
    assert "org/absent" in _one_error_line(done)

    done = _qtool("inspect", "org/private", hub=hub, hf_home=cold)
    assert done.returncode == NotFound.exit_code
    assert "HF_TOKEN" in _one_error_line(done)
    done = _qtool("inspect", "org/private", "--json", hub=hub, hf_home=cold, HF_TOKEN=TOKEN)
    assert done.returncode == 0, done.stderr

    done = _qtool("inspect", "org/pickles", hub=hub, hf_home=cold)
    assert done.returncode == 4
    assert "pickle" in _one_error_line(done)


def test_hub_unreachable(tmp_path: Path) -> None:
    with FakeHub() as hub:
        url = hub.url
    # The server is gone: a connection error on a cold cache.
    dead = type("Dead", (), {"url": url})()
    done = _qtool("inspect", "org/name", hub=dead, hf_home=tmp_path / "h", HF_HUB_ETAG_TIMEOUT="2",
                  HF_HUB_DOWNLOAD_TIMEOUT="2")
    assert done.returncode == NetworkError.exit_code, done.stderr
    assert "cannot reach" in _one_error_line(done)


@pytest.mark.slow
def test_hub_source_loads_tensors(hub: FakeHub, tmp_path: Path) -> None:
    script = (
        "import sys, torch\n"
        "from safetensors.torch import load_file\n"
        "from qtool.sources.resolve import resolve\n"
        f"source = resolve('org/name@{hub.first_commit}')\n"
        "assert source.revision == sys.argv[1], source.revision\n"
        "name = 'model.layers.1.mlp.up_proj.weight'\n"
        "ref = {**load_file(sys.argv[2] + '/model-00001-of-00002.safetensors'),"
        " **load_file(sys.argv[2] + '/model-00002-of-00002.safetensors')}\n"
        "assert torch.equal(source.load(name), ref[name])\n"
        "assert source.config['num_hidden_layers'] == 2\n"
        "print('ok')\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "h"), "NO_PROXY": "127.0.0.1"})
    done = subprocess.run([sys.executable, "-c", script, hub.first_commit, str(hub.v1)], check=False, capture_output=True,
                          text=True, timeout=120, env=environ)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
