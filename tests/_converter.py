"""llama.cpp's own Hugging Face -> GGUF converter (convert_hf_to_gguf.py), from the llama-cpp-python
sdist that `make install` downloads into the venv, for tests that hold qtool's GGUF against it.

Run as a script (by :func:`convert`), it converts several checkpoints in one interpreter, so torch
and transformers are imported once rather than once per checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
# Where the Makefile's install recipe puts the sdist (sys.prefix is the venv running the tests).
SDIST_DIR = Path(sys.prefix) / "share" / "llama-cpp-sdist"
# The converter script, its model classes and the gguf-py it writes with; nothing else is unpacked.
_WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")


def sdist_path() -> Path:
    """The sdist (QTOOL_LLAMA_SDIST overrides); a test failure, not a skip, when it is absent."""
    import pytest

    override = os.environ.get("QTOOL_LLAMA_SDIST")
    path = Path(override) if override else SDIST_DIR / f"llama_cpp_python-{VERSION}.tar.gz"
    if not path.is_file():
        # A venv installed before the Makefile fetched the sdist keeps its stamp: give the command too.
        pytest.fail(f"llama.cpp's converter comes from {path}, which is absent: run `make install` (on a venv "
                    f"installed earlier: {sys.executable} -m pip download --no-deps --no-binary :all: "
                    f"llama-cpp-python=={VERSION} -d {SDIST_DIR}) or point QTOOL_LLAMA_SDIST at that sdist",
                    pytrace=False)
    return path


def unpack(sdist: Path, dest: Path) -> Path:
    """The converter's files of the sdist's vendor/llama.cpp, unpacked under ``dest``; that folder."""
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            _, sep, rel = member.name.partition("/vendor/llama.cpp/")
            if sep and rel.startswith(_WANTED) and (member.isfile() or member.isdir()):
                member.name = rel
                members.append(member)
        archive.extractall(dest, members=members, filter="data")
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return dest


def convert(sources: Path, jobs: dict[str, tuple[Path, Path]], log: Path) -> dict[str, str | None]:
    """``convert_hf_to_gguf.py MODEL --outtype f16 --outfile OUT`` for every job (name -> (model, out)):
    name -> None when it converted, else the converter's error. Its full output goes to ``log``."""
    results = log.with_suffix(".json")
    spec = json.dumps({"results": str(results), "jobs": {k: [str(m), str(o)] for k, (m, o) in jobs.items()}})
    # The vendored gguf-py first: the converter must write with its own, not the venv's.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(sources / "gguf-py"), str(sources)]))
    with log.open("w") as out:
        done = subprocess.run([sys.executable, __file__, spec], env=env, stdout=out, stderr=subprocess.STDOUT,
                              cwd=sources, check=False)
    if done.returncode != 0 or not results.is_file():
        raise RuntimeError(f"the converter driver failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    return json.loads(results.read_text())


def _drive(spec: dict) -> None:
    """In the child: each job through the converter's own main(), its refusal kept as one line."""
    import logging
    import traceback

    import convert_hf_to_gguf

    class LastError(logging.Handler):
        message: str | None = None

        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                self.message = record.getMessage()

    results: dict[str, str | None] = {}
    for name, (model, out) in spec["jobs"].items():
        handler = LastError()
        logging.getLogger().addHandler(handler)
        sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f16", "--outfile", out]
        try:
            convert_hf_to_gguf.main()
            results[name] = None
        except SystemExit as exc:   # its refusals log an error, then exit
            results[name] = handler.message or f"exit status {exc.code}"
        except Exception as exc:
            traceback.print_exc()
            results[name] = f"{type(exc).__name__}: {exc}"
        finally:
            logging.getLogger().removeHandler(handler)
    Path(spec["results"]).write_text(json.dumps(results))


if __name__ == "__main__":
    _drive(json.loads(sys.argv[1]))
