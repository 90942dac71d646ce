"""Bad inputs: truncated, bit-flipped and hand-crafted malicious GGUF and safetensors files, missing
files, pickles. Every case must end with its documented exit code and one ``error:`` line, no
traceback, quickly, without allocating memory in proportion to claimed sizes."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli import app
from qtool.errors import CorruptFile, NotFound, Unsupported

CORRUPT, NOT_FOUND, UNSUPPORTED = CorruptFile.exit_code, NotFound.exit_code, Unsupported.exit_code


# ---------------------------------------------------------------- hand-made files
def _gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(*, version: int = 3, kvs: list[bytes] | None = None, tensors: list[bytes] | None = None,
               tensor_count: int | None = None, kv_count: int | None = None, data: bytes = b"",
               alignment: int = 32) -> bytes:
    """A GGUF file from raw kv and tensor-info records (counts overridable to lie)."""
    kvs = kvs if kvs is not None else [kv_string("general.architecture", "llama")]
    tensors = tensors if tensors is not None else [tensor_info("t.weight", [32], 0, 0)]
    body = b"".join(kvs) + b"".join(tensors)
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                                 len(kvs) if kv_count is None else kv_count)
    header = head + body
    header += b"\0" * (-len(header) % alignment)
    return header + data


def kv_string(key: str, value: str) -> bytes:
    return _gguf_string(key) + struct.pack("<I", 8) + _gguf_string(value)


def kv_u32(key: str, value: int) -> bytes:
    return _gguf_string(key) + struct.pack("<II", 4, value)


def kv_array(key: str, elem_type: int, count: int, payload: bytes) -> bytes:
    return _gguf_string(key) + struct.pack("<IIQ", 9, elem_type, count) + payload


def tensor_info(name: str, dims: list[int], ggml_type: int, offset: int, n_dims: int | None = None) -> bytes:
    return (_gguf_string(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d & 0xFFFFFFFFFFFFFFFF) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


F32_128 = b"\0" * 128  # 32 float32 values
GOOD_TENSOR = {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}

GGUF_CASES: dict[str, bytes] = {
    "empty": b"",
    "bad magic": b"GGML" + b"\0" * 60,
    "version 1": gguf_bytes(version=1, data=F32_128),
    "version 99": gguf_bytes(version=99, data=F32_128),
    "huge tensor count": gguf_bytes(tensor_count=2**63, data=F32_128),
    "huge kv count": gguf_bytes(kv_count=2**40, data=F32_128),
    "huge key length": gguf_bytes(kvs=[struct.pack("<Q", 2**62) + b"general.architecture"], data=F32_128),
    "huge string length": gguf_bytes(kvs=[_gguf_string("general.name") + struct.pack("<IQ", 8, 2**60) + b"x"],
                                     data=F32_128),
    "huge array length": gguf_bytes(kvs=[kv_array("tokenizer.ggml.tokens", 8, 2**61, _gguf_string("a"))],
                                    data=F32_128),
    "huge u32 array": gguf_bytes(kvs=[kv_array("tokenizer.ggml.token_type", 5, 2**62, b"\0" * 16)],
                                 data=F32_128),
    "nested arrays": gguf_bytes(kvs=[kv_array("x", 9, 1, struct.pack("<IQ", 9, 1) * 8)], data=F32_128),
    "unknown value type": gguf_bytes(kvs=[_gguf_string("x") + struct.pack("<I", 77) + b"\0" * 8], data=F32_128),
    "bad alignment": gguf_bytes(kvs=[kv_u32("general.alignment", 33)], data=F32_128),
    "duplicate key": gguf_bytes(kvs=[kv_string("general.name", "a"), kv_string("general.name", "b")],
                                data=F32_128),
    "offset past end": gguf_bytes(tensors=[tensor_info("t.weight", [32], 0, 2**40)], data=F32_128),
    "tensor past end": gguf_bytes(tensors=[tensor_info("t.weight", [64], 0, 0)], data=F32_128),
    "dims overflow": gguf_bytes(tensors=[tensor_info("t.weight", [2**62, 2**62, 2**62, 2**62], 0, 0)],
                                data=F32_128),
    "negative dim": gguf_bytes(tensors=[tensor_info("t.weight", [-32], 0, 0)], data=F32_128),
    "too many dims": gguf_bytes(tensors=[tensor_info("t.weight", [1] * 9, 0, 0)], data=F32_128),
    "huge n_dims": gguf_bytes(tensors=[tensor_info("t.weight", [32], 0, 0, n_dims=2**31)], data=F32_128),
    "unknown ggml type": gguf_bytes(tensors=[tensor_info("t.weight", [32], 250, 0)], data=F32_128),
    "row not a block multiple": gguf_bytes(tensors=[tensor_info("t.weight", [33], 8, 0)], data=F32_128),
    "misaligned offset": gguf_bytes(tensors=[tensor_info("t.weight", [4], 0, 4)], data=F32_128),
    "overlapping tensors": gguf_bytes(tensors=[tensor_info("a.weight", [32], 0, 0),
                                               tensor_info("b.weight", [16], 0, 64)], data=F32_128),
    "duplicate tensor": gguf_bytes(tensors=[tensor_info("a.weight", [8], 0, 0),
                                            tensor_info("a.weight", [8], 0, 32)], data=F32_128),
    "truncated tensor infos": gguf_bytes(data=F32_128)[:40],
}

SAFETENSORS_CASES: dict[str, bytes] = {
    "too short": b"\x10\0\0",
    "header length > file": safetensors_bytes({"t": GOOD_TENSOR}, F32_128, length=10**6),
    "header length 2^63": safetensors_bytes({"t": GOOD_TENSOR}, F32_128, length=2**63),
    "header not JSON": safetensors_bytes(b"{not json at all}", F32_128),
    "header not an object": safetensors_bytes(b"[1, 2, 3]", F32_128),
    "header not utf-8": safetensors_bytes(b"{\"\xff\xfe\": 1}", F32_128),
    "offsets past end": safetensors_bytes({"t": {**GOOD_TENSOR, "data_offsets": [0, 10**12]}}, F32_128),
    "offsets reversed": safetensors_bytes({"t": {**GOOD_TENSOR, "data_offsets": [128, 0]}}, F32_128),
    "overlapping": safetensors_bytes({"a": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]},
                                      "b": {"dtype": "F32", "shape": [16], "data_offsets": [64, 128]}}, F32_128),
    "size mismatch": safetensors_bytes({"t": {**GOOD_TENSOR, "shape": [31]}}, F32_128),
    "dims overflow": safetensors_bytes({"t": {**GOOD_TENSOR, "shape": [2**62, 2**62, 2**62]}}, F32_128),
    "negative dim": safetensors_bytes({"t": {**GOOD_TENSOR, "shape": [-32]}}, F32_128),
    "unknown dtype": safetensors_bytes({"t": {**GOOD_TENSOR, "dtype": "Q4_K"}}, F32_128),
    "missing dtype": safetensors_bytes({"t": {"shape": [32], "data_offsets": [0, 128]}}, F32_128),
    "metadata not strings": safetensors_bytes({"__metadata__": {"format": 1}, "t": GOOD_TENSOR}, F32_128),
    "duplicate tensor": safetensors_bytes(b'{"t": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}, '
                                          b'"t": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}',
                                          F32_128),
    "deep nesting": safetensors_bytes(b"{\"t\": " + b"[" * 100000 + b"]" * 100000 + b"}", F32_128),
}


def test_hand_made_good_files_are_accepted(tmp_path: Path) -> None:
    # The builders make valid files when they do not lie, so every failure below is the lie's.
    good_gguf = tmp_path / "good.gguf"
    good_gguf.write_bytes(gguf_bytes(data=F32_128))
    good_st = tmp_path / "good.safetensors"
    good_st.write_bytes(safetensors_bytes({"t": GOOD_TENSOR}, F32_128))
    from gguf import GGUFReader
    from safetensors import safe_open

    assert [t.name for t in GGUFReader(good_gguf).tensors] == ["t.weight"]
    with safe_open(good_st, framework="pt") as handle:
        assert list(handle.keys()) == ["t"]
    for path in (good_gguf, good_st):
        result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["tensor_count"] == 1


# ---------------------------------------------------------------- running the CLI
def _assert_one_line_error(result, expected_code: int, must_mention: str | None = None) -> None:
    stderr = result.stderr
    assert result.exit_code == expected_code, (result.exit_code, stderr, result.stdout)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr and result.stdout == ""
    assert "internal error" not in lines[0]
    if must_mention:
        assert must_mention in lines[0]


def _invoke_timed(args: list[str], *, trace_memory: bool = True):
    """Run the CLI in-process; returns (result, seconds, peak traced bytes or 0)."""
    runner = CliRunner()
    if trace_memory:
        tracemalloc.start()
    start = time.perf_counter()
    result = runner.invoke(app, args)
    elapsed = time.perf_counter() - start
    peak = 0
    if trace_memory:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return result, elapsed, peak


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_corrupt_gguf(tmp_path: Path, case: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(GGUF_CASES[case])
    result, elapsed, peak = _invoke_timed(["inspect", str(path)])
    _assert_one_line_error(result, CORRUPT, must_mention=str(path))
    assert elapsed < 2.0 and peak < 50 * 2**20, (elapsed, peak)


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_corrupt_safetensors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(SAFETENSORS_CASES[case])
    result, elapsed, peak = _invoke_timed(["inspect", str(path)])
    _assert_one_line_error(result, CORRUPT, must_mention=str(path))
    assert elapsed < 2.0 and peak < 50 * 2**20, (elapsed, peak)


@pytest.mark.parametrize("case", ["header length > file", "offsets past end", "unknown dtype", "overlapping"])
def test_corrupt_safetensors_in_a_folder_through_resolve(tmp_path: Path, tiny_llama_dir: Path, case: str) -> None:
    from qtool.sources.resolve import resolve

    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(SAFETENSORS_CASES[case])
    with pytest.raises(CorruptFile, match="model.safetensors"):
        resolve(str(tmp_path))


def _flip(data: bytearray, position: int, bit: int = 7) -> bytearray:
    data[position] ^= 1 << bit
    return data


def _real_header(smollm2_gguf: Path) -> bytes:
    from qtool.sources.gguf_file import GGUFFile

    with GGUFFile(smollm2_gguf) as gguf_file:
        data_offset = gguf_file.data_offset
    with open(smollm2_gguf, "rb") as handle:
        return handle.read(data_offset + 4096)


def _after_name(header: bytes, name: bytes) -> int:
    """Byte position just after tensor ``name``'s string in the tensor infos."""
    return header.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)


# Real SmolLM2 header (plus a little data), then one precise bit flip or a cut.
REAL_FILE_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "magic bit": lambda h: bytes(_flip(bytearray(h), 0, 1)),
    "version bit": lambda h: bytes(_flip(bytearray(h), 5, 0)),
    "tensor count high bit": lambda h: bytes(_flip(bytearray(h), 15)),
    "kv count high bit": lambda h: bytes(_flip(bytearray(h), 23)),
    "first key length high bit": lambda h: bytes(_flip(bytearray(h), 24 + 6)),
    "token array length bit": lambda h: bytes(_flip(bytearray(h), h.index(b"tokenizer.ggml.tokens") + 21 + 8 + 6)),
    "tensor n_dims bit": lambda h: bytes(_flip(bytearray(h), _after_name(h, b"blk.0.ffn_down.weight") + 2)),
    "tensor dim bit": lambda h: bytes(_flip(bytearray(h), _after_name(h, b"blk.0.ffn_down.weight") + 4 + 6)),
    "tensor type bit": lambda h: bytes(_flip(bytearray(h), _after_name(h, b"blk.0.ffn_down.weight") + 20, 6)),
    "tensor offset bit": lambda h: bytes(_flip(bytearray(h), _after_name(h, b"output_norm.weight") + 4 + 8 + 4 + 5)),
    "cut in metadata": lambda h: h[:100_000],
    "cut in tensor infos": lambda h: h[:len(h) - 4096 - 2000],
    "cut in tensor data": lambda h: h,
}


@pytest.mark.parametrize("case", list(REAL_FILE_DAMAGE))
def test_damaged_real_gguf(tmp_path: Path, smollm2_gguf: Path, case: str) -> None:
    path = tmp_path / "damaged.gguf"
    path.write_bytes(REAL_FILE_DAMAGE[case](_real_header(smollm2_gguf)))
    # Untraced: parsing the real 49152-token vocabulary under tracemalloc is several times slower.
    result, elapsed, _ = _invoke_timed(["inspect", str(path)], trace_memory=False)
    _assert_one_line_error(result, CORRUPT, must_mention=str(path))
    assert elapsed < 2.0, elapsed


def test_missing_and_pickle_and_empty_folder(tmp_path: Path) -> None:
    result, _, _ = _invoke_timed(["inspect", str(tmp_path / "absent.gguf")])
    _assert_one_line_error(result, NOT_FOUND, must_mention="absent.gguf")
    result, _, _ = _invoke_timed(["inspect", str(tmp_path / "absent" / "folder")])
    _assert_one_line_error(result, NOT_FOUND)
    pickle = tmp_path / "pytorch_model.bin"
    pickle.write_bytes(b"\x80\x04K\x01.")
    result, _, _ = _invoke_timed(["inspect", str(pickle)])
    _assert_one_line_error(result, UNSUPPORTED, must_mention="pickle")
    empty = tmp_path / "empty"
    empty.mkdir()
    result, _, _ = _invoke_timed(["inspect", str(empty)])
    _assert_one_line_error(result, NOT_FOUND, must_mention="no .safetensors")


def test_unsupported_gguf_architecture_through_resolve(tmp_path: Path) -> None:
    from qtool.sources.resolve import resolve

    path = tmp_path / "mamba.gguf"
    path.write_bytes(gguf_bytes(kvs=[kv_string("general.architecture", "mamba")], data=F32_128))
    with pytest.raises(Unsupported, match="mamba"):
        resolve(str(path))
    # inspect still reads any architecture's headers.
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["architecture"] == "mamba"


def _qtool_subprocess(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *args], check=False, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("case, make, code", [
    ("huge tensor count", lambda p: p.with_suffix(".gguf").write_bytes(GGUF_CASES["huge tensor count"]), CORRUPT),
    ("header length > file",
     lambda p: p.with_suffix(".safetensors").write_bytes(SAFETENSORS_CASES["header length > file"]), CORRUPT),
    ("pickle", lambda p: p.with_suffix(".bin").write_bytes(b"\x80\x04K\x01."), UNSUPPORTED),
    ("missing", lambda p: None, NOT_FOUND),
])
def test_cli_subprocess_errors(tmp_path: Path, case: str, make: Callable[[Path], object], code: int) -> None:
    base = tmp_path / "model"
    make(base)
    target = next(iter(tmp_path.iterdir()), tmp_path / "missing.gguf")
    start = time.perf_counter()
    done = _qtool_subprocess("inspect", str(target))
    elapsed = time.perf_counter() - start
    assert done.returncode == code, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in done.stderr
    assert done.stdout == ""
    # Includes starting Python on a possibly busy machine: this only catches a hang. The check itself
    # is milliseconds (see the in-process tests).
    assert elapsed < 60


def test_debug_shows_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(GGUF_CASES["huge tensor count"])
    result = CliRunner().invoke(app, ["inspect", str(path), "--debug"])
    assert result.exit_code == CORRUPT and "Traceback" in result.stderr


# ---------------------------------------------------------------- issue 16: hostile model files
BAD_ARGUMENT = 2


class _FifoWatchdog:
    """Opens the write end of each FIFO after ``after`` seconds, so that a reader blocked on one gets
    EOF: a regression fails the timing assertion instead of hanging the test run."""

    def __init__(self, fifos: list[Path], after: float = 5.0) -> None:
        import threading

        self.fifos, self.after, self.stop = fifos, after, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.stop.wait(self.after):
            return
        while not self.stop.wait(0.1):
            for fifo in self.fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass  # no reader blocked on it (ENXIO), or it is gone

    def __enter__(self) -> _FifoWatchdog:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _copy_folder(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def _commands_for(model: Path, tmp_path: Path) -> list[list[str]]:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return [["inspect", str(model)],
            ["quantize", str(model), "--type", "Q8_0", "-o", str(tmp_path / "out.gguf")],
            ["eval", str(model), "--text", str(text), "--ctx", "32", "--chunks", "1"]]


def test_fifos_and_devices_are_refused_at_once(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import qtool.pipeline  # noqa: F401 - imported here so the timings below measure the checks, not imports
    import qtool.sources.local  # noqa: F401

    cases: list[tuple[Path, Path]] = []  # (MODEL argument, the FIFO it reaches)
    for name in ("x.gguf", "x.safetensors", "no_suffix"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        cases.append((fifo, fifo))
    for inner in ("model.safetensors", "config.json", "tokenizer.json", "model.safetensors.index.json",
                  "generation_config.json"):
        folder = _copy_folder(tiny_llama_dir, tmp_path / f"folder-{inner}")
        if (folder / inner).exists():
            (folder / inner).unlink()
        os.mkfifo(folder / inner)
        cases.append((folder, folder / inner))
    with _FifoWatchdog([fifo for _, fifo in cases]):
        for model, fifo in cases:
            for args in _commands_for(model, tmp_path):
                start = time.perf_counter()
                result = CliRunner().invoke(app, args)
                elapsed = time.perf_counter() - start
                _assert_one_line_error(result, BAD_ARGUMENT, must_mention=str(fifo))
                assert "FIFO" in result.stderr and elapsed < 2.0, (args, elapsed)
    # A character device: /dev/null named as the model.
    result = CliRunner().invoke(app, ["inspect", "/dev/null"])
    _assert_one_line_error(result, BAD_ARGUMENT, must_mention="/dev/null")
    assert "character device" in result.stderr


def _small_real_gguf(path: Path) -> bytes:
    """A small but real GGUF written by gguf-py: string metadata, a token array, two tensors."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test model")
    writer.add_string("general.description", "a small model written for the flip tests")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{index}" for index in range(64)])
    writer.add_uint32("llama.context_length", 128)
    writer.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.zeros(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


# Every key, string value, array element and tensor name length field of the file above.
_GGUF_LENGTH_FIELDS = (b"general.architecture", b"llama", b"general.name", b"tiny test model",
                       b"general.description", b"tokenizer.ggml.tokens", b"tok5", b"tok63",
                       b"llama.context_length", b"token_embd.weight", b"output_norm.weight")


def test_flipped_gguf_lengths_fail_fast_with_short_messages(tmp_path: Path) -> None:
    from qtool.sources.gguf_file import GGUFFile

    good = _small_real_gguf(tmp_path / "good.gguf")
    assert CliRunner().invoke(app, ["inspect", str(tmp_path / "good.gguf")]).exit_code == 0
    path = tmp_path / "flipped.gguf"
    for text in _GGUF_LENGTH_FIELDS:
        position = good.index(struct.pack("<Q", len(text)) + text)
        for byte in range(8):
            for flip in (0x80, 0xFF, 0x01):
                damaged = bytearray(good)
                damaged[position + byte] ^= flip
                path.write_bytes(damaged)
                # The reader directly (the CLI adds only "error: "); the CLI for a sample below.
                tracemalloc.start()
                start = time.perf_counter()
                with pytest.raises(CorruptFile) as caught:
                    GGUFFile(path).close()
                elapsed = time.perf_counter() - start
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                case = (text, byte, flip, elapsed, peak, caught.value.message[:300])
                assert str(path) in caught.value.message and len(caught.value.message) < 290, case
                assert elapsed < 1.0 and peak < 20 * 2**20, case
        if text in (b"general.name", b"tokenizer.ggml.tokens", b"token_embd.weight"):
            damaged = bytearray(good)
            damaged[position + 2] ^= 0x80
            path.write_bytes(damaged)
            result, elapsed, peak = _invoke_timed(["inspect", str(path)])
            _assert_one_line_error(result, CORRUPT, must_mention=str(path))
            assert len(result.stderr) < 300 and elapsed < 1.0 and peak < 20 * 2**20, (text, elapsed, peak)


def _sharded_folder(target: Path) -> Path:
    """A small random Llama in two shards with model.safetensors.index.json (no tokenizer)."""
    from qtool.synthetic import write_synthetic_llama

    return write_synthetic_llama(target, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                                 num_kv_heads=2, vocab_size=256, shards=2)


_HUGE_INT = "1" * 5000          # past Python's 4300-digit int-string limit
_DEEP = "[" * 100_000 + "]" * 100_000


def test_huge_integers_and_deep_nesting_in_model_json_are_corrupt(tmp_path: Path) -> None:
    single = tmp_path / "huge.safetensors"
    single.write_bytes(safetensors_bytes(
        ('{"t": {"dtype": "F32", "shape": [' + _HUGE_INT + '], "data_offsets": [0, 128]}}').encode(), F32_128))
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(safetensors_bytes(('{"__metadata__": ' + _DEEP + '}').encode(), F32_128))
    for path in (single, deep):
        result, elapsed, _ = _invoke_timed(["inspect", str(path)], trace_memory=False)
        _assert_one_line_error(result, CORRUPT, must_mention=str(path))
        assert elapsed < 2.0

    good = _sharded_folder(tmp_path / "good")
    index = json.loads((good / "model.safetensors.index.json").read_text())
    hostile = {
        "model.safetensors.index.json": [
            json.dumps(index)[:-1] + ', "extra": ' + _HUGE_INT + "}",
            '{"weight_map": ' + _DEEP + "}"],
        "config.json": [
            (good / "config.json").read_text().rstrip()[:-1] + ', "hidden_size_x": ' + _HUGE_INT + "}",
            '{"hidden_size": ' + _DEEP + "}"],
    }
    for file_name, texts in hostile.items():
        for number, text in enumerate(texts):
            folder = _copy_folder(good, tmp_path / f"{file_name}-{number}")
            (folder / file_name).write_text(text)
            for args in (["inspect", str(folder)],
                         ["quantize", str(folder), "--type", "Q8_0", "-o", str(tmp_path / "out.gguf")]):
                result, elapsed, _ = _invoke_timed(args, trace_memory=False)
                _assert_one_line_error(result, CORRUPT, must_mention=str(folder / file_name))
                assert len(result.stderr) < 300 and elapsed < 2.0, (args, elapsed)


def test_tensor_names_that_are_not_unicode_are_corrupt_before_anything_prints(tmp_path: Path) -> None:
    path = tmp_path / "surrogate.safetensors"
    # A valid tensor first: the old reader printed its row, then crashed on the second name.
    path.write_bytes(safetensors_bytes(
        b'{"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}, '
        b'"b\\ud800": {"dtype": "F32", "shape": [16], "data_offsets": [64, 128]}}', F32_128))
    for args in (["inspect", str(path)], ["inspect", str(path), "--json"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == CORRUPT, result.output
        assert "Traceback" not in result.stderr and "\\ud800" in result.stderr and str(path) in result.stderr
    result = CliRunner().invoke(app, ["inspect", str(path)])
    _assert_one_line_error(result, CORRUPT, must_mention="not valid Unicode")

    # NUL and control characters are valid Unicode: kept, and inspect does not crash on them.
    odd = tmp_path / "control.safetensors"
    names = ["nul\u0000name", "clear\u001b[2Jscreen", "bell\u0007"]
    odd.write_bytes(safetensors_bytes({name: {"dtype": "F32", "shape": [8], "data_offsets": [32 * i, 32 * i + 32]}
                                       for i, name in enumerate(names)}, b"\0" * 96))
    from qtool.sources.safetensors_file import read_header

    assert [tensor.name for tensor in read_header(odd).tensors] == names
    result = CliRunner().invoke(app, ["inspect", str(odd), "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(row["name"] for row in json.loads(result.stdout)["tensors"]) == sorted(names)
    assert CliRunner().invoke(app, ["inspect", str(odd)]).exit_code == 0


def test_safetensors_data_must_fill_the_data_area_exactly(tmp_path: Path) -> None:
    from safetensors import SafetensorError, safe_open

    eight = {"dtype": "F32", "shape": [8]}
    cases = {
        "gap between tensors": ({"a": {**eight, "data_offsets": [0, 32]}, "b": {**eight, "data_offsets": [64, 96]}},
                                b"\0" * 96, "between tensors 'a' and 'b'"),
        "gap before the first": ({"a": {**eight, "data_offsets": [32, 64]}}, b"\0" * 64, "before the first tensor 'a'"),
        "bytes after the last": ({"a": {**eight, "data_offsets": [0, 32]}}, b"\0" * 40, "after the last tensor"),
        "overlap": ({"a": {**eight, "data_offsets": [0, 32]}, "b": {**eight, "data_offsets": [16, 48]}},
                    b"\0" * 48, "'a' and 'b' overlap"),
    }
    for case, (header, data, expected) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
        path.write_bytes(safetensors_bytes(header, data))
        # The reference refuses these files too.
        with pytest.raises(SafetensorError):
            safe_open(str(path), framework="pt")
        result, _, _ = _invoke_timed(["inspect", str(path)], trace_memory=False)
        _assert_one_line_error(result, CORRUPT, must_mention=str(path))
        assert expected in result.stderr, (case, result.stderr)


def test_index_and_shards_must_list_the_same_tensors(tmp_path: Path) -> None:
    good = _sharded_folder(tmp_path / "good")
    index = json.loads((good / "model.safetensors.index.json").read_text())
    weight_map: dict[str, str] = index["weight_map"]
    first_name, first_shard = next(iter(weight_map.items()))
    other_shard = next(shard for shard in weight_map.values() if shard != first_shard)
    assert CliRunner().invoke(app, ["inspect", str(good)]).exit_code == 0
    cases = {
        "names a missing tensor": ({**weight_map, "model.layers.7.mlp.up_proj.weight": first_shard},
                                   "model.layers.7.mlp.up_proj.weight"),
        "omits a tensor": ({name: shard for name, shard in weight_map.items() if name != first_name}, first_name),
        "wrong shard": ({**weight_map, first_name: other_shard}, first_name),
    }
    from qtool.sources.resolve import resolve

    for case, (bad_map, tensor_name) in cases.items():
        folder = _copy_folder(good, tmp_path / case.replace(" ", "_"))
        (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": bad_map}))
        result, _, _ = _invoke_timed(["inspect", str(folder)], trace_memory=False)
        _assert_one_line_error(result, CORRUPT, must_mention="model.safetensors.index.json")
        assert tensor_name in result.stderr, (case, result.stderr)
        with pytest.raises(CorruptFile, match=tensor_name.replace(".", r"\.")):
            resolve(str(folder))
