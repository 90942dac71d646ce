"""``qtool inspect``: what is inside a model file, from its headers only (no tensor data is read).

GGUF: version, alignment, metadata (long arrays summarized), tensors with GGML type, bytes and
bits per weight, a per-type summary. Safetensors (file, folder, Hub): dtype/shape/bytes per
tensor and recognised quantization metadata. Sizes always add up: header + tensor bytes +
padding = the files' size on disk.
"""
from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.errors import BadArgument, CorruptFile, NotFound

# Arrays longer than this are shown as {type, length, first items}.
MAX_ARRAY_ITEMS = 8
SHOWN_ARRAY_ITEMS = 5


@dataclass
class TensorRow:
    name: str                   # name as stored (GGUF name for GGUF files)
    type: str                   # GGML type ("Q4_1") or safetensors dtype ("BF16")
    shape: list[int]            # rows first (torch order)
    elements: int
    bytes: int
    bits_per_weight: float
    hf_name: str | None = None  # Hugging Face name, for GGUF tensors of a Llama-family layout
    file: str | None = None     # shard file, for safetensors folders


@dataclass
class TypeSummary:
    type: str
    tensors: int
    elements: int
    bytes: int
    bits_per_weight: float


@dataclass
class InspectReport:
    spec: str
    format: str                          # "gguf" or "safetensors"
    path: str                            # file or folder actually read
    files: list[str]
    file_size: int                       # bytes on disk, all files
    header_bytes: int                    # headers (GGUF: up to the end of the tensor infos)
    tensor_bytes: int                    # all tensors in the files
    padding_bytes: int                   # alignment padding and gaps: header + tensors + padding = file_size
    tensor_count: int                    # all tensors in the files
    elements: int                        # all tensors
    bits_per_weight: float               # tensor_bytes * 8 / elements
    version: int | None = None           # GGUF version
    alignment: int | None = None         # GGUF alignment
    architecture: str | None = None
    revision: str | None = None          # Hub commit
    metadata: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    tensors: list[TensorRow] = field(default_factory=list)   # those matching --tensors
    types: list[TypeSummary] = field(default_factory=list)   # summary of the tensors listed
    selected: str | None = None          # the --tensors glob


def _bpw(n_bytes: int, elements: int) -> float:
    return round(n_bytes * 8 / elements, 4) if elements else 0.0


def summarize_value(value: Any, type_name: str | None = None) -> Any:
    """Long arrays (tokenizer tokens, merges) as {type, length, first}; everything else as is."""
    if isinstance(value, list) and len(value) > MAX_ARRAY_ITEMS:
        return {"type": type_name or "ARRAY", "length": len(value), "first": value[:SHOWN_ARRAY_ITEMS]}
    return value


def _type_summary(rows: list[TensorRow]) -> list[TypeSummary]:
    totals: dict[str, list[int]] = {}
    for row in rows:
        entry = totals.setdefault(row.type, [0, 0, 0])
        entry[0] += 1
        entry[1] += row.elements
        entry[2] += row.bytes
    return [TypeSummary(name, count, elements, n_bytes, _bpw(n_bytes, elements))
            for name, (count, elements, n_bytes) in sorted(totals.items(), key=lambda item: -item[1][2])]


def _matches(glob: str | None, *names: str | None) -> bool:
    return glob is None or any(name is not None and fnmatch.fnmatchcase(name, glob) for name in names)


def _inspect_gguf(path: Path, spec: str, glob: str | None) -> InspectReport:
    from qtool import architectures
    from qtool.errors import Unsupported
    from qtool.sources.gguf_file import GGUFFile

    with GGUFFile(path) as gguf_file:
        rows = []
        try:
            names_of = {"model_type": architectures.gguf_record(gguf_file.architecture,
                                                                gguf_file.metadata).model_types[0]}
        except Unsupported:
            names_of = None
        for tensor in gguf_file.tensors:
            try:
                hf_name = architectures.gguf_to_hf_name(tensor.name, gguf_file.architecture, gguf_file.metadata)
                # A piece of a matrix llama.cpp stores split (DeepSeek's attn_k_b): the matrix's name.
                joined = architectures.joined_name(hf_name, names_of)
                hf_name = joined[0] if joined else hf_name
            except Unsupported:
                hf_name = None
            rows.append(TensorRow(tensor.name, tensor.type_name, list(tensor.shape), tensor.n_elements,
                                  tensor.n_bytes, _bpw(tensor.n_bytes, tensor.n_elements), hf_name=hf_name))
        metadata = {key: summarize_value(value, gguf_file.metadata_types.get(key))
                    for key, value in gguf_file.metadata.items()}
        tensor_bytes = sum(row.bytes for row in rows)
        elements = sum(row.elements for row in rows)
        shown = [row for row in rows if _matches(glob, row.name, row.hf_name)]
        quantization = _detect_file(gguf_file.metadata)
        return InspectReport(
            spec=spec, format="gguf", path=str(path), files=[str(path)], file_size=gguf_file.file_size,
            header_bytes=gguf_file.header_bytes, tensor_bytes=tensor_bytes,
            padding_bytes=gguf_file.file_size - gguf_file.header_bytes - tensor_bytes,
            tensor_count=len(rows), elements=elements, bits_per_weight=_bpw(tensor_bytes, elements),
            version=gguf_file.version, alignment=gguf_file.alignment, architecture=gguf_file.architecture,
            metadata=metadata, quantization=quantization, tensors=shown, types=_type_summary(shown),
            selected=glob)


def _detect_file(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """What a single-file container's own metadata says of its quantization (the records decide)."""
    from qtool.containers import all_containers

    for container in all_containers():
        found = container.detect_metadata(metadata)
        if found is not None:
            return found
    return None


def recognise_quantization(config: dict, metadata: dict[str, str], tensor_names: list[str]) -> dict[str, Any] | None:
    """Which quantization format a safetensors checkpoint uses, from config.json, __metadata__ and names."""
    found: dict[str, Any] = {}
    qconfig = config.get("quantization_config")
    if isinstance(qconfig, dict):
        from qtool.containers import by_quant_method

        method = str(qconfig.get("quant_method", "unknown"))
        found = {"method": method, "from": "config.json quantization_config"}
        container = by_quant_method(method)
        details = container.describe(qconfig) if container is not None else dict(qconfig)
        found["details"] = {key: value for key, value in details.items() if key != "quant_method"}
    qtool_keys = {key: value for key, value in metadata.items() if key.startswith("qtool")}
    if qtool_keys:
        found.setdefault("method", "qtool")
        found["qtool"] = {key: _maybe_json(value) for key, value in qtool_keys.items()}
    if not found:
        from qtool.containers import all_containers

        for container in all_containers():
            details = container.detect_names(tensor_names)
            if details is not None:
                found = {"method": container.name, "from": "tensor names", **({"details": details} if details else {})}
                break
    return found or None


def _maybe_json(value: str) -> Any:
    # Metadata from the file: anything json cannot read (huge ints, deep nesting, NaN) stays a string.
    try:
        parsed = json.loads(value, parse_constant=_not_strict)
    except (ValueError, TypeError, RecursionError):
        return value
    return parsed


def _not_strict(constant: str) -> Any:
    raise ValueError(constant)


def _inspect_safetensors(files: list[Path], folder: Path | None, spec: str, glob: str | None,
                         revision: str | None = None, weight_map: dict[str, str] | None = None) -> InspectReport:
    """``weight_map``: the folder's shard index, checked against the headers (None: no index to check)."""
    from qtool.sources.layout import check_folder_files, check_index, read_json
    from qtool.sources.safetensors_file import read_header

    config: dict = {}
    if folder is not None:
        check_folder_files(folder)
        if os.path.lexists(folder / "config.json"):
            config = read_json(folder / "config.json", "model config")
    headers = [read_header(path) for path in files]
    if folder is not None and weight_map is not None:
        check_index(folder, weight_map, {header.path.name: [tensor.name for tensor in header.tensors]
                                         for header in headers})
    rows = []
    for header in headers:
        for tensor in header.tensors:
            elements = 1
            for dim in tensor.shape:
                elements *= dim
            rows.append(TensorRow(tensor.name, tensor.dtype, list(tensor.shape), elements, tensor.n_bytes,
                                  _bpw(tensor.n_bytes, elements),
                                  file=header.path.name if len(files) > 1 else None))
    file_size = sum(header.file_size for header in headers)
    header_bytes = sum(header.header_bytes for header in headers)
    tensor_bytes = sum(row.bytes for row in rows)
    elements = sum(row.elements for row in rows)
    metadata: dict[str, Any] = dict(headers[0].metadata) if headers else {}
    if config:
        for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size", "torch_dtype", "dtype"):
            if key in config:
                metadata[f"config.{key}"] = summarize_value(config[key])
    shown = [row for row in rows if _matches(glob, row.name)]
    architecture = None
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        architecture = architectures[0]
    return InspectReport(
        spec=spec, format="safetensors", path=str(folder or files[0]), files=[str(path) for path in files],
        file_size=file_size, header_bytes=header_bytes, tensor_bytes=tensor_bytes,
        padding_bytes=file_size - header_bytes - tensor_bytes, tensor_count=len(rows), elements=elements,
        bits_per_weight=_bpw(tensor_bytes, elements), architecture=architecture, revision=revision,
        metadata=metadata, quantization=recognise_quantization(config, metadata, [row.name for row in rows]),
        tensors=shown, types=_type_summary(shown), selected=glob)


def inspect_model(spec: str, *, tensors: str | None = None, revision: str | None = None) -> InspectReport:
    """Read the headers of the model ``spec`` names (anything ``resolve`` accepts) and describe them."""
    from qtool.sources.jsonfile import open_regular, require_regular_file
    from qtool.sources.layout import PICKLE_SUFFIXES, read_index, shard_files
    from qtool.sources.resolve import SMOLLM2_ALIAS, resolve, smollm2_path

    if tensors is not None and not tensors.strip():
        raise BadArgument("--tensors is empty: give a glob such as 'blk.0.*' or '*q_proj*'")
    if spec.strip().lower() == SMOLLM2_ALIAS:
        return _inspect_gguf(smollm2_path(), spec, tensors)
    path = Path(spec).expanduser()
    if path.exists():
        if revision is not None:
            raise BadArgument(f"--revision {revision!r} applies to Hub models; {spec} is a local path")
        if path.is_dir():
            return _inspect_safetensors(shard_files(path), path, spec, tensors, weight_map=read_index(path))
        # FIFOs, sockets and devices are refused before anything opens them (a FIFO blocks open()).
        require_regular_file(path, "MODEL")
        with open_regular(path, "MODEL") as handle:
            magic = handle.read(4)
        if path.suffix.lower() == ".gguf" or magic == b"GGUF":
            return _inspect_gguf(path, spec, tensors)
        if path.suffix.lower() == ".safetensors":
            folder = path.parent if os.path.lexists(path.parent / "config.json") else None
            return _inspect_safetensors([path], folder, spec, tensors)
        # Anything else (pickles, unknown files) gets resolve's errors.
        resolve(spec)
        raise CorruptFile(f"{path}: not a GGUF or safetensors file")
    if path.suffix.lower() in PICKLE_SUFFIXES + (".gguf", ".safetensors"):
        raise NotFound(f"{spec} does not exist; check the path")
    from qtool.sources.hf import download_snapshot, is_hub_id
    from qtool.sources.resolve import split_revision

    repo_id, hub_revision = split_revision(spec, revision)
    if not is_hub_id(repo_id):
        resolve(spec, revision=revision)  # raises the NotFound with the usual wording
    folder, commit = download_snapshot(repo_id, revision=hub_revision)
    return _inspect_safetensors(shard_files(folder), folder, spec, tensors, revision=commit,
                                weight_map=read_index(folder))


def _format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{count} B"


def _short(value: Any, limit: int = 100) -> str:
    if isinstance(value, dict) and {"type", "length", "first"} <= set(value):
        text = f"{value['type']} x{value['length']}: {', '.join(repr(item) for item in value['first'])}, ..."
    else:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_inspect(report: InspectReport, console: Any, *, metadata: bool = True) -> None:
    """Draw the report as rich tables on ``console``."""
    from rich.table import Table

    title = f"{report.format.upper()}  {report.path}"
    if report.revision:
        title += f"  @ {report.revision}"
    facts = Table(title=title, show_header=False, title_justify="left")
    facts.add_column("field", style="bold")
    facts.add_column("value")
    if report.version is not None:
        facts.add_row("version", str(report.version))
    if report.alignment is not None:
        facts.add_row("alignment", str(report.alignment))
    if report.architecture:
        facts.add_row("architecture", report.architecture)
    if report.quantization:
        facts.add_row("quantization", _short(report.quantization, 160))
    if len(report.files) > 1:
        facts.add_row("files", str(len(report.files)))
    facts.add_row("tensors", f"{report.tensor_count}  ({report.elements:,} weights, "
                             f"{report.bits_per_weight:.3f} bits/weight)")
    facts.add_row("size", f"{report.file_size:,} B ({_format_bytes(report.file_size)}) = header "
                          f"{report.header_bytes:,} + tensors {report.tensor_bytes:,} + padding "
                          f"{report.padding_bytes:,}")
    console.print(facts)

    if metadata and report.metadata:
        table = Table(title="metadata", title_justify="left")
        table.add_column("key", style="cyan", no_wrap=True)
        table.add_column("value", overflow="fold")
        for key, value in report.metadata.items():
            table.add_row(key, _short(value))
        console.print(table)

    if report.tensors:
        label = f"tensors matching {report.selected!r}" if report.selected else "tensors"
        table = Table(title=f"{label} ({len(report.tensors)})", title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("type")
        table.add_column("shape")
        table.add_column("bytes", justify="right")
        table.add_column("bits/w", justify="right")
        for row in report.tensors:
            table.add_row(row.name, row.type, "x".join(str(d) for d in row.shape), f"{row.bytes:,}",
                          f"{row.bits_per_weight:.2f}")
        console.print(table)
    elif report.selected:
        console.print(f"no tensor matches {report.selected!r}")

    if report.types:
        table = Table(title="by type", title_justify="left")
        table.add_column("type")
        table.add_column("tensors", justify="right")
        table.add_column("weights", justify="right")
        table.add_column("bytes", justify="right")
        table.add_column("bits/w", justify="right")
        for summary in report.types:
            table.add_row(summary.type, str(summary.tensors), f"{summary.elements:,}", f"{summary.bytes:,}",
                          f"{summary.bits_per_weight:.3f}")
        table.add_row("total", str(sum(s.tensors for s in report.types)),
                      f"{sum(s.elements for s in report.types):,}", f"{sum(s.bytes for s in report.types):,}",
                      "", style="bold")
        console.print(table)
