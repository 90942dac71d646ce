"""Streaming safetensors output shared by the bitsandbytes and compressed-tensors sinks.

safetensors puts a JSON header (names, dtypes, shapes, byte offsets) before the data. We know
every output tensor's name and an upper bound of its size from the plan, so each shard file is
opened with room reserved for its header, tensor bytes are appended as they arrive (one tensor
in memory at a time), and the header is written into the reserved room when the shard's last
tensor is in. The format allows the header to be padded with spaces, which is how the room left
over is filled. Offsets are assigned in arrival order, so a tensor whose exact size is only known
once computed (bitsandbytes' quant-state JSON) needs no special handling.

The file writes themselves run on one background thread, in order, while the caller quantizes
the next tensor (at most ``_MAX_BACKLOG_BYTES`` wait to be written; an error surfaces at the next
call).
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy
import torch

from qtool import ui
from qtool.atomic import PRODUCER
from qtool.errors import BadArgument
from qtool.plan import TensorPlan
from qtool.schemes.base import get_scheme
from qtool.schemes.int4 import NonFiniteWeight
from qtool.sinks.base import Sink
from qtool.sources.base import Source, TensorInfo
from qtool.sources.layout import TOKENIZER_FILES

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
_MAX_BACKLOG_BYTES = 64 * 2**20
INDEX_NAME = "model.safetensors.index.json"

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3"}
_STORED_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class OutputTensor:
    """One tensor the output will hold, known before its data exists."""

    name: str
    max_nbytes: int          # exact size, or an upper bound when the size depends on the data
    max_header: str = ""     # the longest header entry it can have (computed from the bounds)


def _header_entry(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


_ALIGN = 4096                   # direct I/O alignment of file offsets, sizes and memory
_STAGING_BYTES = 8 * 2**20


class _ShardFile:
    """One output file written front to back on the writer thread, its header last.

    Tensor bytes are gathered in an aligned staging buffer and written with ``O_DIRECT`` where the
    filesystem allows it: the bytes go from that buffer to the disk without a copy into the page
    cache, whose allocation and copying cost more CPU than the quantization of int8 weights
    (and evicts the cache of others). The header, and the last bytes that do not fill an aligned
    block, are written through an ordinary descriptor; where ``O_DIRECT`` is refused (tmpfs, other
    systems) everything is.
    """

    def __init__(self, path: Path, data_start: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct_fd: int | None = None
        self.offset = data_start          # file offset of the first byte not yet written
        self.staging: numpy.ndarray | None = None
        self.filled = 0
        direct = getattr(os, "O_DIRECT", 0)
        if direct and data_start % _ALIGN == 0:
            try:
                self.direct_fd = os.open(path, os.O_WRONLY | direct)
            except OSError:
                self.direct_fd = None
        if self.direct_fd is not None:
            self._buffer = mmap.mmap(-1, _STAGING_BYTES)      # page-aligned anonymous memory
            # numpy copies (GIL released, one thread): torch would split each copy between its
            # threads, and on this thread that contends with the quantization workers.
            self.staging = numpy.frombuffer(self._buffer, dtype=numpy.uint8)

    def append(self, data: torch.Tensor) -> None:
        """``data``: uint8, contiguous, CPU."""
        source = data.numpy()
        if self.staging is None:
            self._write_all(self.fd, memoryview(source), self.offset)
            self.offset += source.size
            return
        done, total = 0, source.size
        while done < total:
            step = min(total - done, _STAGING_BYTES - self.filled)
            numpy.copyto(self.staging[self.filled:self.filled + step], source[done:done + step])
            self.filled += step
            done += step
            if self.filled == _STAGING_BYTES:
                self._flush_direct()

    def _flush_direct(self) -> None:
        aligned = self.filled - self.filled % _ALIGN
        if aligned:
            try:
                self._write_all(self.direct_fd, memoryview(self._buffer)[:aligned], self.offset)
            except OSError:
                # A filesystem that accepted O_DIRECT at open but refuses the write.
                self._write_all(self.fd, memoryview(self._buffer)[:aligned], self.offset)
            self.offset += aligned
            rest = self.filled - aligned
            if rest:
                self.staging[:rest] = self.staging[aligned:self.filled].copy()
            self.filled = rest

    def finish(self, header: bytes) -> None:
        try:
            if self.staging is not None:
                self._flush_direct()
                if self.filled:
                    self._write_all(self.fd, memoryview(self._buffer)[:self.filled], self.offset)
                    self.offset += self.filled
                    self.filled = 0
            self._write_all(self.fd, memoryview(header), 0)
        finally:
            self.close()

    @staticmethod
    def _write_all(fd: int, view: memoryview, offset: int) -> None:
        while len(view):
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None
        if self.staging is not None:
            self.staging = None
            try:
                self._buffer.close()
            except BufferError:
                pass


class ShardedWriter:
    """Writes named tensors into ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index."""

    def __init__(self, folder: Path, groups: list[list[OutputTensor]], max_shard_size: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        # Shard boundaries fall between groups (a weight and its auxiliary tensors stay together).
        shards: list[list[OutputTensor]] = [[]]
        size = 0
        for group in groups:
            group_size = sum(t.max_nbytes for t in group)
            if shards[-1] and size + group_size > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].extend(group)
            size += group_size
        count = len(shards)
        self.file_names = (["model.safetensors"] if count == 1 else
                           [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.shard_of: dict[str, int] = {}
        for index, shard in enumerate(shards):
            for tensor in shard:
                if tensor.name in self.shard_of:
                    raise ValueError(f"output tensor {tensor.name!r} planned twice")
                self.shard_of[tensor.name] = index
        self._pending = [{t.name for t in shard} for shard in shards]
        self._reserved = [self._header_room(shard) for shard in shards]
        self._files: dict[int, _ShardFile] = {}
        self._entries: list[dict[str, Any]] = [{} for _ in shards]
        self._offsets = [0] * count
        self.total_bytes = 0
        self._io: ThreadPoolExecutor | None = None
        self._backlog: deque[tuple[Future, int]] = deque()
        self._backlog_bytes = 0

    def _header_room(self, shard: list[OutputTensor]) -> int:
        data_bound = sum(t.max_nbytes for t in shard)
        digits = len(str(data_bound))
        room = len(json.dumps({"__metadata__": self.metadata}))
        for tensor in shard:
            # entry text + both offsets at their longest + separators
            room += len(json.dumps(tensor.name)) + len(tensor.max_header) + 2 * digits + 8
        # Rounded so that the data starts on a 4 KiB boundary (8 + room), where direct I/O can write it.
        return int(math.ceil((room + 64 + 8) / _ALIGN) * _ALIGN) - 8

    def write(self, name: str, tensor: torch.Tensor) -> int:
        index = self.shard_of.get(name)
        if index is None:
            raise ValueError(f"tensor {name!r} is not in the planned output")
        if name not in self._pending[index]:
            raise ValueError(f"tensor {name!r} written twice")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if index not in self._files:
            self._files[index] = _ShardFile(self.folder / self.file_names[index], 8 + self._reserved[index])
        if nbytes:
            self._submit(self._files[index].append, tensor.reshape(-1).view(torch.uint8), nbytes=nbytes)
        start = self._offsets[index]
        self._offsets[index] = start + nbytes
        self._entries[index][name] = _header_entry(DTYPE_NAMES[tensor.dtype], list(tensor.shape), start,
                                                   start + nbytes)
        self.total_bytes += nbytes
        self._pending[index].discard(name)
        if not self._pending[index]:
            self._finish_shard(index)
        return nbytes

    def _submit(self, function, *args: Any, nbytes: int) -> None:
        """Queue file I/O on the writer thread; wait while too many bytes are queued."""
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtool-write")
        while self._backlog and (self._backlog[0][0].done() or self._backlog_bytes + nbytes > _MAX_BACKLOG_BYTES):
            self._settle_oldest()
        self._backlog.append((self._io.submit(function, *args), nbytes))
        self._backlog_bytes += nbytes

    def _settle_oldest(self) -> None:
        future, nbytes = self._backlog.popleft()
        self._backlog_bytes -= nbytes
        future.result()         # re-raises the writer thread's error here

    def _drain(self) -> None:
        while self._backlog:
            self._settle_oldest()

    def _finish_shard(self, index: int) -> None:
        shard = self._files.pop(index, None) or _ShardFile(self.folder / self.file_names[index], 8 + self._reserved[index])
        header = json.dumps({"__metadata__": self.metadata, **self._entries[index]}, separators=(",", ":"))
        raw = header.encode("utf-8")
        room = self._reserved[index]
        if len(raw) > room:
            self._drain()
            shard.close()
            raise RuntimeError(f"safetensors header of {self.file_names[index]} outgrew its reserved room "
                               f"({len(raw)} > {room} bytes)")
        self._submit(shard.finish, room.to_bytes(8, "little") + raw + b" " * (room - len(raw)), nbytes=0)

    def close(self) -> None:
        """Check that every planned tensor was written, wait for the writes, and write the index
        (sharded outputs)."""
        missing = [name for pending in self._pending for name in pending]
        if missing:
            raise RuntimeError(f"output incomplete: {len(missing)} planned tensors were never written "
                               f"(first: {missing[0]})")
        self._drain()
        self._shutdown()
        if len(self.file_names) > 1:
            weight_map = {name: self.file_names[index] for name, index in sorted(self.shard_of.items())}
            index_doc = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / INDEX_NAME).write_text(json.dumps(index_doc, indent=2) + "\n")

    def _shutdown(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None

    def abort(self) -> None:
        # Let queued writes finish (their files are deleted with the staging folder), ignoring errors.
        while self._backlog:
            with contextlib.suppress(Exception):      # aborting anyway; the first error was raised
                self._settle_oldest()
        self._shutdown()
        for shard in self._files.values():
            shard.close()
        self._files.clear()


def linear_module_name(weight_name: str, runtime: str) -> str:
    """``model.layers.0.mlp.up_proj`` for ``...up_proj.weight``: quantized layouts are keyed by Linear module."""
    if not weight_name.endswith(".weight"):
        raise BadArgument(f"{runtime} quantizes Linear weights (names ending in .weight), not {weight_name}; "
                          f"keep it (--skip '{weight_name}')")
    return weight_name[: -len(".weight")]


def entry_bound(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> OutputTensor:
    """An output tensor of known dtype and shape."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return OutputTensor(name, nbytes, json.dumps(_header_entry(DTYPE_NAMES[dtype], list(shape), 0, 0)))


def source_dtype(info: TensorInfo | None) -> torch.dtype:
    """The float dtype a source hands out for a tensor: its stored dtype, or float32 for quantized
    (GGUF) storage, which sources dequantize to float32."""
    if info is None:
        return torch.bfloat16
    return _STORED_FLOAT.get(info.stored_dtype.upper(), torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SafetensorsSink(Sink):
    """What both safetensors sinks share: staging, streaming shards, config, tokenizer, model card.

    Subclasses say which schemes they take (``family``), which tensors a quantized weight becomes
    (``outputs`` before the data, ``packed_tensors`` after) and the ``quantization_config``.
    """

    format: ClassVar[str] = "safetensors"
    family: ClassVar[str] = ""

    def __init__(self, out: Path, source: Source, plans: list[TensorPlan], *, force: bool,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(out, source, plans, force=force, options=options)
        self.infos = {info.name: info for info in source.tensors()}
        self.check_plans(plans)
        max_shard_size = int(self.options.get("max_shard_size") or DEFAULT_MAX_SHARD_SIZE)
        if max_shard_size <= 0:
            raise BadArgument(f"--max-shard-size must be positive, got {max_shard_size}")
        groups = [self.outputs(plan, source_dtype(self.infos.get(plan.name))) for plan in plans]
        self.staged = self.stage(is_dir=True)
        try:
            self.writer = ShardedWriter(self.staged.path, groups, max_shard_size, metadata={"producer": PRODUCER})
        except BaseException:
            self.staged.abort()
            raise
        self.kept_dtypes: dict[torch.dtype, int] = {}
        self.quantized_dtypes: dict[torch.dtype, int] = {}

    # -- what subclasses provide -------------------------------------------------------------
    @classmethod
    def check_layout(cls, plans: list[TensorPlan]) -> None:
        for plan in plans:
            if not plan.keep and get_scheme(plan.scheme).family != cls.family:
                raise BadArgument(f"{cls.__name__} cannot write scheme {plan.scheme!r} "
                                  f"(tensor {plan.name}); pick schemes of one family")

    def check_plans(self, plans: list[TensorPlan]) -> None:
        """check_layout, and what depends on the sink's options."""
        self.check_layout(plans)

    @classmethod
    def outputs(cls, plan: TensorPlan, dtype: torch.dtype) -> list[OutputTensor]:
        """Output tensors (with size bounds) for one planned input tensor."""
        if plan.keep:
            return [entry_bound(plan.name, dtype, plan.shape)]
        return cls.quantized_outputs(plan, dtype)

    @classmethod
    def quantized_outputs(cls, plan: TensorPlan, dtype: torch.dtype) -> list[OutputTensor]:
        raise NotImplementedError

    def packed_tensors(self, plan: TensorPlan, packed: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def calibrated_as(self, packed: Any, dtype: torch.dtype) -> Any:
        """A calibration method's packed result as the format stores the weight's own results
        (``dtype``: the source weight's); unchanged by default."""
        return packed

    def quantization_config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def packed_nbytes(cls, plan: TensorPlan, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes on disk for one planned tensor (quant-state JSON counted at its upper bound)."""
        return sum(t.max_nbytes for t in cls.outputs(plan, dtype))

    # -- the Sink protocol ---------------------------------------------------------------------
    def add(self, plan: TensorPlan, tensor: torch.Tensor, packed: Any = None) -> int:
        if packed is not None:   # already quantized by a calibration-aware method
            packed = self.calibrated_as(packed, tensor.dtype)
            return sum(self.writer.write(name, value) for name, value in self.packed_tensors(plan, packed).items())
        if tuple(tensor.shape) != tuple(plan.shape):
            raise BadArgument(f"tensor {plan.name} has shape {tuple(tensor.shape)}, the plan says {plan.shape}")
        if plan.keep:
            self.kept_dtypes[tensor.dtype] = self.kept_dtypes.get(tensor.dtype, 0) + tensor.numel()
            return self.writer.write(plan.name, tensor)
        if not tensor.is_floating_point():
            raise BadArgument(f"tensor {plan.name} is {tensor.dtype}, not floating point; it cannot be "
                              f"quantized with {plan.scheme}; skip it (--skip '{plan.name}')")
        scheme = get_scheme(plan.scheme)
        # Schemes that find inf/nan through their own reductions save a pass over the weight.
        if not getattr(scheme, "checks_finite", False) and not bool(torch.isfinite(tensor).all()):
            raise self._nonfinite(plan)
        self.quantized_dtypes[tensor.dtype] = self.quantized_dtypes.get(tensor.dtype, 0) + tensor.numel()
        try:
            packed = scheme.quantize(tensor, **plan.params)
        except NonFiniteWeight:
            raise self._nonfinite(plan) from None
        except ValueError as exc:
            raise BadArgument(f"tensor {plan.name}: {exc}") from None
        return sum(self.writer.write(name, value) for name, value in self.packed_tensors(plan, packed).items())

    @staticmethod
    def _nonfinite(plan: TensorPlan) -> BadArgument:
        return BadArgument(f"tensor {plan.name} contains inf or nan values; fix the checkpoint or keep "
                           f"the tensor unquantized (--skip '{plan.name}')")

    def model_dtype(self) -> torch.dtype:
        """The dtype of most kept weights (what config.json's ``dtype`` says), else the quantized inputs'."""
        counts = self.kept_dtypes or self.quantized_dtypes
        if not counts:
            return torch.bfloat16
        return max(counts, key=counts.get)

    @classmethod
    def overhead_nbytes(cls, source: Source, plans: list[TensorPlan]) -> int:
        """The folder's bytes besides the tensors' data: the tokenizer and extra files copied, config.json
        (its quantization_config names every quantized module), the model card and the shards' headers."""
        copied = 0
        tokenizer_dir = source.tokenizer_dir()
        if tokenizer_dir is not None:
            copied += sum((Path(tokenizer_dir) / name).stat().st_size for name in TOKENIZER_FILES
                          if (Path(tokenizer_dir) / name).is_file())
        copied += sum(Path(path).stat().st_size for name, path in source.extra_files().items()
                      if name not in ("config.json", "README.md") and os.sep not in name and not name.startswith("."))
        quantized = sum(1 for plan in plans if not plan.keep)
        config = len(json.dumps(source.config, indent=2, default=str)) + 4096 + 100 * quantized
        headers = 600 * quantized + 150 * (len(plans) - quantized)     # a quantized weight is up to 4 tensors
        return copied + config + headers + 8192                          # the model card

    def finish(self, model_card: str) -> Path:
        self.writer.close()
        folder = self.staged.path
        config = dict(self.source.config)
        config.pop("quantization_config", None)
        name = dtype_name(self.model_dtype())
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
        config["quantization_config"] = self.quantization_config()
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer_dir = self.source.tokenizer_dir()
        if tokenizer_dir is not None:
            for file_name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / file_name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / file_name, folder / file_name)
        for file_name, path in self.source.extra_files().items():
            if file_name in ("config.json", "README.md") or os.sep in file_name or file_name.startswith("."):
                continue
            shutil.copyfile(path, folder / file_name)
        (folder / "README.md").write_text(model_card if model_card.endswith("\n") else model_card + "\n")
        final = self.staged.commit()
        ui.log(f"wrote {final} ({len(self.writer.file_names)} shard(s), {self.writer.total_bytes:,} bytes of tensors)")
        return final

    def abort(self) -> None:
        self.writer.abort()
        self.staged.abort()
