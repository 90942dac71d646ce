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


# ---------------------------------------------------------------- in this process (CliRunner)
@pytest.fixture()
def local_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """huggingface_hub in this process pointed at a FakeHub (its constants are read at import time)."""
    from huggingface_hub import constants

    def point_at(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")

    with FakeHub() as server:
        point_at(server.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        server.point_at = point_at
        yield server


def _cli_error(args: list[str], code: int) -> str:
    from typer.testing import CliRunner

    from qtool.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, (result.stderr, result.stdout)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_hub_http_500_says_what_the_server_answered(local_hub: FakeHub) -> None:
    local_hub.fail_with = (500, "Internal Server Error")
    line = _cli_error(["inspect", "org/name"], NetworkError.exit_code)
    assert "HTTP 500 Internal Server Error" in line and "cannot reach" not in line
    assert local_hub.requests, "the server was asked"


@pytest.mark.slow   # huggingface_hub retries a file's HEAD on a 500 with back-off (about 25 s)
def test_dataset_download_http_500_says_what_the_server_answered(local_hub: FakeHub) -> None:
    local_hub.fail_with = (500, "Broken")
    line = _cli_error(["eval", "org/name", "--dataset", "wikitext2"], NetworkError.exit_code)
    assert "HTTP 500 Broken" in line and "Salesforce/wikitext" in line and "--text" in line


@pytest.mark.parametrize("secret_in", ["userinfo", "query"])
def test_credentials_in_hf_endpoint_are_never_printed(local_hub: FakeHub, secret_in: str) -> None:
    host = local_hub.url.split("://", 1)[1]
    endpoint = (f"http://user:{TOKEN}@{host}" if secret_in == "userinfo" else f"{local_hub.url}/?token={TOKEN}")
    local_hub.point_at(endpoint.rstrip("/") if secret_in == "userinfo" else local_hub.url + f"?token={TOKEN}")
    local_hub.fail_with = (500, "Internal Server Error")
    line = _cli_error(["inspect", "org/name"], NetworkError.exit_code)
    assert TOKEN not in line and "***" in line and host.split(":")[0] in line
    # Unreachable (the connection is refused): the other message, just as clean.
    with FakeHub() as gone:
        dead_host = gone.url.split("://", 1)[1]
    local_hub.point_at(f"http://user:{TOKEN}@{dead_host}")
    line = _cli_error(["inspect", "org/name"], NetworkError.exit_code)
    assert "cannot reach" in line and TOKEN not in line and dead_host in line


def test_redact_url_and_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from qtool.redact import redact_text, redact_url

    assert redact_url("http://user:pw@hub.local:8080/api?a=1&token=s3cret#access_token=x") == \
        "http://***@hub.local:8080/api?a=1&token=***#access_token=***"
    assert redact_url("https://huggingface.co/api/models/org/name") == "https://huggingface.co/api/models/org/name"
    assert redact_url("http://hub/x?api_key=k&sig=abc&page=2") == "http://hub/x?api_key=***&sig=***&page=2"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    text = redact_text(f"failed for url 'http://u:p@h/r?x_token=1' with {TOKEN}")
    assert text == "failed for url 'http://***@h/r?x_token=***' with ***"
