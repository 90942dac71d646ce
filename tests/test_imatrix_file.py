"""llama.cpp's importance-matrix files (`qtool quantize --imatrix FILE`): both of llama-imatrix's forms,
read as llama-quantize reads them, and quantization with them byte for byte as libggml does.

The files come from tests/_gguf_helpers.py's write_imatrix_files (the ``llama256_imatrix`` fixture): the
layout llama-imatrix writes, filled with the statistics of the ``llama256`` checkpoint's Linear inputs
(an importance matrix depends only on the names and widths of the weights it is applied to).
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qtool.cli import app

from tests._ggml_helpers import llamacpp_quantize
from tests._gguf_helpers import legacy_imatrix

# Tensors qtool writes unpermuted (q/k rows are interleaved per head for llama.cpp's rope).
PLAIN = ["blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_down.weight"]


def run_cli(*args: str | Path):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def llamacpp_importance(path: Path) -> dict[str, np.ndarray]:
    """What llama-quantize hands the quantizer from an imatrix file (tools/quantize's load_imatrix): GGUF
    in_sum2 / counts per expert (1 where the count is 0), legacy values / ncall."""
    if path.read_bytes()[:4] == b"GGUF":
        from gguf import GGUFReader

        tensors = {t.name: np.array(t.data, dtype=np.float32) for t in GGUFReader(path).tensors}
        out = {}
        for key, sums in tensors.items():
            if key.endswith(".in_sum2"):
                name = key[:-len(".in_sum2")]
                counts = tensors[f"{name}.counts"].reshape(-1)
                rows = sums.reshape(len(counts), -1)
                out[name] = np.stack([row / c if c > 0 else np.ones_like(row) for row, c in zip(rows, counts)])[0]
        return out
    data, offset, out = path.read_bytes(), 4, {}
    for _ in range(struct.unpack_from("<i", data)[0]):
        (length,) = struct.unpack_from("<i", data, offset)
        name = data[offset + 4:offset + 4 + length].decode()
        ncall, nval = struct.unpack_from("<ii", data, offset + 4 + length)
        offset += 12 + length
        values = np.frombuffer(data, dtype=np.float32, count=nval, offset=offset)
        offset += 4 * nval
        out[name] = values / ncall if ncall > 0 else values.copy()
    return out


def _source_weights(model: Path) -> dict[str, np.ndarray]:
    from qtool.architectures import gguf_to_hf_name
    from qtool.sources.resolve import resolve

    with resolve(str(model)) as source:
        return {name: source.load(gguf_to_hf_name(name)).float().numpy() for name in PLAIN}


@pytest.mark.parametrize("type_name", ["IQ4_XS", "IQ4_NL", "Q2_K", "Q5_K"])
def test_both_imatrix_forms_quantize_as_llama_quantize_does(llama256, llama256_imatrix, tmp_path, type_name):
    """The GGUF and the legacy file of one llama-imatrix run give the same importance (the .dat stores the
    means times the chunk count), and qtool's tensors are libggml's bytes for that importance."""
    from gguf import GGUFReader

    weights = _source_weights(llama256)
    outputs = {}
    for imatrix in (llama256_imatrix["gguf"], llama256_imatrix["dat"]):
        out = tmp_path / f"{imatrix.suffix[1:]}.gguf"
        result = run_cli("quantize", llama256, "-o", out, "--type", type_name, "--imatrix", imatrix, "--json")
        assert result.exit_code == 0, result.output
        importance = llamacpp_importance(imatrix)
        tensors = {t.name: t for t in GGUFReader(out).tensors}
        for name in PLAIN:
            assert tensors[name].tensor_type.name == type_name
            expected = llamacpp_quantize(weights[name], type_name, importance[name])
            np.testing.assert_array_equal(np.array(tensors[name].data).reshape(expected.shape), expected, err_msg=name)
        outputs[imatrix.suffix] = {name: bytes(np.array(tensors[name].data)) for name in PLAIN}
    # Same matrices up to float rounding of the .dat's (mean * ncall) / ncall: almost every byte agrees.
    same = sum(outputs[".gguf"][name] == outputs[".dat"][name] for name in PLAIN)
    assert same >= len(PLAIN) - 1, same
    plain = tmp_path / "rtn.gguf"
    assert run_cli("quantize", llama256, "-o", plain, "--type", type_name).exit_code == 0
    rtn = {t.name: bytes(np.array(t.data)) for t in GGUFReader(plain).tensors}
    assert all(rtn[name] != outputs[".gguf"][name] for name in PLAIN)   # the importance changed the choices


@pytest.mark.parametrize("case, code, message", [
    ("missing", 3, "no such file"),
    ("truncated", 5, "ends inside an entry"),
    ("garbage", 5, "not a llama.cpp imatrix"),
    ("model-gguf", 5, "not an importance matrix"),
    ("other-model", 5, "none of its 1 entries"),
    ("wrong-width", 5, "has 100 values for a tensor of 256 columns"),
])
def test_bad_imatrix_files_are_refused_in_one_line(llama256, llama256_imatrix, tmp_path, case, code, message):
    path = tmp_path / "imatrix.dat"
    if case == "truncated":
        path.write_bytes(llama256_imatrix["dat"].read_bytes()[:700])
    elif case == "garbage":
        path.write_bytes(b"\x00\xff" * 100)
    elif case == "model-gguf":
        from gguf import GGUFWriter

        writer = GGUFWriter(str(path), "llama")
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    elif case == "other-model":
        path.write_bytes(legacy_imatrix({"encoder.block.0.weight": np.ones(8, dtype=np.float32)}))
    elif case == "wrong-width":
        path.write_bytes(legacy_imatrix({"blk.0.attn_q.weight": np.ones(100, dtype=np.float32)}))
    out = tmp_path / "out.gguf"
    result = run_cli("quantize", llama256, "-o", out, "--type", "IQ4_XS", "--imatrix", path)
    assert result.exit_code == code, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_imatrix_options_that_cannot_go_together(llama256, llama256_imatrix, tmp_path):
    result = run_cli("quantize", llama256, "-o", tmp_path / "o.gguf", "--type", "IQ4_XS", "--imatrix", llama256_imatrix["gguf"],
                     "--method", "gptq")
    assert result.exit_code == 2 and "X^T X" in result.output
    result = run_cli("quantize", llama256, "-o", tmp_path / "o.gguf", "--type", "IQ4_XS", "--imatrix", llama256_imatrix["gguf"],
                     "--stats", llama256_imatrix["dat"])
    assert result.exit_code == 2 and "pass one" in result.output
