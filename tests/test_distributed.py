"""Calibration spread over processes: `torchrun --nproc-per-node 2 -m qtool quantize ... --method gptq`
over gloo on the CPU, against one process on the same model and windows.

Each rank calibrates half the windows and the statistics are summed over the ranks, in another order
than one process adds them; each rank runs GPTQ on half of every weight's rows and the halves are
gathered (the row blocks' matrix products may round differently from the whole matrix's); the bound the outputs must meet: every tensor of the files equal but
for at most 0.5% of the packed 4-bit bytes, scales within 1e-3 relative (on these models they come
out identical). Rank 0 alone writes and reports.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _quantize(model: Path, out: Path, calib: Path, processes: int) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    command = [*launcher, "-m", "qtool", "quantize", str(model), "--scheme", "int4-sym", "--group-size", "32",
               "--method", "gptq", "--calib", str(calib), "--calib-samples", "8", "--calib-seqlen", "64",
               "-o", str(out), "--json", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def test_two_processes_over_gloo_write_what_one_process_writes(tiny_llama_dir: Path, shared_data: Path,
                                                                tmp_path: Path) -> None:
    calib = shared_data / "calibration" / "groups_merged.txt"
    one = _quantize(tiny_llama_dir, tmp_path / "one", calib, 1)
    two = _quantize(tiny_llama_dir, tmp_path / "two", calib, 2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    reports = [json.loads(done.stdout) for done in (one, two)]        # one JSON document: rank 0's
    assert reports[0]["calibration"]["tensors"] == reports[1]["calibration"]["tensors"] > 0
    expected, got = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        other = got[name]
        assert tensor.shape == other.shape and tensor.dtype == other.dtype, name
        if name.endswith("weight_packed"):
            assert (tensor != other).float().mean() <= 0.005, name
        elif name.endswith("weight_scale"):
            torch.testing.assert_close(other.float(), tensor.float(), rtol=1e-3, atol=0, msg=name)
        else:
            assert torch.equal(tensor, other), name
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(path.name for path in (tmp_path / "one").iterdir())


def test_a_mixture_of_experts_over_several_processes_is_refused_before_writing(arch_checkpoint, shared_data: Path,
                                                                               tmp_path: Path) -> None:
    """Ranks route their tokens to different experts (different collectives): refused, exit 4, no output."""
    done = _quantize(arch_checkpoint("mixtral", 49152), tmp_path / "out", shared_data / "calibration" / "groups_merged.txt", 2)
    assert done.returncode != 0
    assert "mixture of experts over several processes" in done.stderr
    assert not (tmp_path / "out").exists()
