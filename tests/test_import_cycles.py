"""qtool's modules import each other without cycles (ARCHITECTURE.md: leaves below, CLI on top).

The checker is static (scripts/import_cycles.py); it is first shown to find the cycles it must
find, function-level imports included, so that its "none" on the real tree means something.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checker():
    spec = importlib.util.spec_from_file_location("import_cycles", ROOT / "scripts" / "import_cycles.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "qtool" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_finds_a_cycle_hidden_in_a_function(checker, tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "kernels/__init__.py": "from qtool.schemes.int4 import pack\n",
        "schemes/__init__.py": "",
        "schemes/int4.py": "def pack():\n    from qtool.kernels import fused\n    return fused\n",
        "leaf.py": "import torch\n",
    })
    cycles = checker.find_cycles(root)
    assert len(cycles) == 1
    modules = {edge.importer for edge in cycles[0]}
    assert {"qtool.kernels", "qtool.schemes.int4"} <= modules
    assert "qtool.leaf" not in modules
    assert checker.main([str(root)]) == 1


def test_type_checking_imports_are_not_cycles(checker, tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from qtool import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qtool import a\n",
    })
    assert checker.find_cycles(root) == []


def test_qtool_has_no_import_cycles(checker, capsys):
    cycles = checker.find_cycles(ROOT)
    assert not cycles, "\n".join(checker.describe(cycle, ROOT) for cycle in cycles)
    # A real graph, not an empty one: the CLI reaches the pipeline, which reaches the schemes.
    graph = checker.import_graph(ROOT)
    assert {edge.imported for edge in graph["qtool.pipeline"]} & {"qtool.schemes", "qtool.schemes.base"}
