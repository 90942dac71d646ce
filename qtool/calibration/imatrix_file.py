"""llama.cpp's importance-matrix files (``llama-imatrix`` output) read as calibration statistics.

Two forms exist, and llama-quantize reads both:

- GGUF (``general.type = imatrix``): per weight ``<name>.in_sum2`` (F32, one row of sums of x^2 per
  expert) and ``<name>.counts`` (F32, tokens per expert), with ``imatrix.datasets``,
  ``imatrix.chunk_count`` and ``imatrix.chunk_size``. Importance = in_sum2 / counts (1 for an expert
  no token reached).
- legacy ``.dat``: int32 entry count; per entry an int32 name length, the name, int32 ncall, int32
  nval and nval float32 values (mean squares times ncall); then, optionally, int32 chunk count and an
  int32-length dataset name. Importance = value / ncall.

Names are llama.cpp's (``blk.0.attn_q.weight``; merged experts ``blk.0.ffn_up_exps.weight``), mapped to
the model's Hugging Face names by its architecture record. The result is a :class:`CalibrationStats`
holding only mean squares: what ``--method imatrix`` needs (no X^T X, so no GPTQ or AWQ from it).
"""
from __future__ import annotations

import struct
from pathlib import Path

import torch

from qtool.architectures import architecture, expert_name, gguf_to_hf_name
from qtool.calibration.observers import InputStats
from qtool.calibration.runner import CalibrationStats
from qtool.errors import CorruptFile, NotFound, QtoolError, Unsupported

_GGUF_MAGIC = b"GGUF"
_LEGACY_CHUNK = 512


def load_imatrix(path: str | Path, config: dict, columns: dict[str, int]) -> CalibrationStats:
    """The importance of every weight ``path`` names, keyed by the model's (``config``'s) tensor names;
    ``columns``: the model's weights' row lengths, which each entry must match."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"--imatrix {path}: no such file; make one with `llama-imatrix` or `qtool calibrate`")
    try:
        with open(path, "rb") as handle:
            is_gguf = handle.read(4) == _GGUF_MAGIC
        entries, datasets, chunks, chunk_size = _read_gguf(path) if is_gguf else _read_legacy(path)
    except QtoolError:
        raise
    except Exception as exc:   # struct errors, gguf-py's ValueErrors on bad offsets: a broken file
        raise CorruptFile(f"--imatrix {path}: unreadable importance matrix ({type(exc).__name__}: {exc}); "
                          "recreate it with llama-imatrix") from None
    if not entries:
        raise CorruptFile(f"--imatrix {path}: the file holds no importance entries")
    arch = architecture(config).name
    linears: dict[str, InputStats] = {}
    for gguf_name, (values, tokens) in entries.items():
        try:
            hf_name = gguf_to_hf_name(gguf_name, arch, {f"{arch}.expert_count": len(tokens)} if len(tokens) > 1 else None)
        except Unsupported:
            continue     # a tensor this model's layout does not have (llama.cpp's own splits): not used
        names = [expert_name(hf_name, index) for index in range(len(tokens))] if len(tokens) > 1 else [hf_name]
        for name, row, count in zip(names, values, tokens):
            if name in columns and columns[name] != row.numel():
                raise CorruptFile(f"--imatrix {path}: {gguf_name} has {row.numel()} values for a tensor of "
                                  f"{columns[name]} columns; was it made for another model?")
            linears[name] = _stats(row, count)
    if not linears:
        raise CorruptFile(f"--imatrix {path}: none of its {len(entries)} entries (e.g. {next(iter(entries))}) is a "
                          f"tensor of this {arch} model; was it made for another model?")
    return CalibrationStats(model="", calib=", ".join(datasets) or str(path), samples=chunks, seqlen=chunk_size,
                            seed=0, linears=linears)


def _stats(mean_square: torch.Tensor, tokens: int) -> InputStats:
    # Only the mean square is known: absmax and the ranges stay empty (w8a8 and AWQ need qtool calibrate).
    nan = float("nan")
    return InputStats(mean_square.numel(), tokens, torch.full_like(mean_square, nan), mean_square, nan, nan, {})


# What a reader gives: entries (name -> (importance rows, tokens per row)), datasets, chunks, tokens per chunk.
_Contents = tuple[dict[str, tuple[torch.Tensor, list[int]]], list[str], int, int]


def _read_gguf(path: Path) -> _Contents:
    import gguf

    reader = gguf.GGUFReader(path)
    kind = reader.get_field("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise CorruptFile(f"--imatrix {path}: a GGUF file but not an importance matrix (general.type is "
                          f"{kind.contents() if kind is not None else 'missing'}); pass llama-imatrix's output")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise CorruptFile(f"--imatrix {path}: tensor {tensor.name} is {tensor.tensor_type.name}, not F32")
        values = torch.from_numpy(tensor.data.copy()).to(torch.float32)
        for suffix, table in ((".in_sum2", sums), (".counts", counts)):
            if tensor.name.endswith(suffix):
                table[tensor.name[:-len(suffix)]] = values
    entries = {}
    for name, in_sum2 in sums.items():
        if name not in counts:
            raise CorruptFile(f"--imatrix {path}: {name}.in_sum2 has no {name}.counts")
        tokens = [round(float(c)) for c in counts[name].reshape(-1)]
        if in_sum2.numel() % len(tokens):
            raise CorruptFile(f"--imatrix {path}: {name} has {in_sum2.numel()} sums for {len(tokens)} counts")
        rows = in_sum2.reshape(len(tokens), -1)
        entries[name] = (torch.stack([row / count if count > 0 else torch.ones_like(row)
                                      for row, count in zip(rows, tokens)]), tokens)
    datasets_field = reader.get_field("imatrix.datasets")
    datasets = list(datasets_field.contents()) if datasets_field is not None else []
    chunks, chunk_size = (reader.get_field(f"imatrix.{key}") for key in ("chunk_count", "chunk_size"))
    return (entries, datasets, int(chunks.contents()) if chunks is not None else 0,
            int(chunk_size.contents()) if chunk_size is not None else 0)


def _read_legacy(path: Path) -> _Contents:
    data = path.read_bytes()
    offset = 0

    def take(fmt: str) -> tuple:
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise CorruptFile(f"--imatrix {path}: the file ends inside an entry (at byte {offset}); "
                              "is it a llama.cpp imatrix (.dat or .gguf)?")
        values = struct.unpack_from(fmt, data, offset)
        offset += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > len(data) // 12:
        raise CorruptFile(f"--imatrix {path}: not a llama.cpp imatrix (.dat or .gguf): it starts with "
                          f"an entry count of {n_entries}")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 1 or length > 4096:
            raise CorruptFile(f"--imatrix {path}: an entry name of {length} bytes at byte {offset - 4}")
        name = take(f"<{length}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise CorruptFile(f"--imatrix {path}: entry {name} has {nval} values")
        values = torch.tensor(take(f"<{nval}f"), dtype=torch.float32)
        # Tokens: the legacy form counts chunks; llama-imatrix's default chunk is 512 tokens.
        entries[name] = ((values / ncall if ncall > 0 else values).unsqueeze(0), [max(ncall, 0) * _LEGACY_CHUNK])
    chunks, datasets = 0, []
    if offset + 4 <= len(data):
        (chunks,) = take("<i")
        if offset + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - offset:
                datasets.append(take(f"<{length}s")[0].decode("utf-8", errors="replace"))
    return entries, datasets, chunks, 0
