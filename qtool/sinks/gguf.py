"""GGUF output: one file llama.cpp loads, written as a stream.

Everything but the tensor bytes is known before the first tensor arrives (names, GGML types and
sizes follow from the plan), so the header, metadata and tensor infos are written up front with
gguf-py's ``GGUFWriter`` and every tensor's bytes right after it is quantized: one tensor in
memory at a time. The file is written under a temporary name beside OUT and renamed at the end.

Type choices the plan cannot see are made here, the way llama-quantize makes them:
- 1-D tensors (norms, biases) are F32; other tensors the plan keeps are F16;
- a block type whose block does not divide the row length falls back (Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0; F16 when even 32 does not divide it);
- mixture-of-experts routers kept unquantized are F32.

A mixture of experts' checkpoint stores one matrix per expert; llama.cpp wants each layer's experts
of one matrix as one 3-D tensor (``blk.N.ffn_gate_exps``, experts first). Its bytes are the experts'
quantized rows one after the other, so each expert is quantized as it arrives and the merged tensor
is written when its last expert has come: the file's tensor order is the order tensors complete.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

from qtool import architectures, ui
from qtool.errors import BadArgument, CorruptFile
from qtool.gguf_tokenizer import tokenizer_metadata
from qtool.plan import KEEP, ROUTER_GLOBS, TensorPlan
from qtool.schemes.ggml import GGMLTensor, ScaleOverflow, ggml_type
from qtool.schemes.int4 import NonFiniteWeight
from qtool.sinks.base import Sink
from qtool.sources.base import Source
from qtool.sources.config_check import config_origin
from qtool.sources.jsonfile import clip

QUANTIZATION_VERSION = 2   # GGML_QNT_VERSION
ALIGNMENT = 32

def _file_type_of(type_or_mix: Any) -> LlamaFileType | None:
    """general.file_type of a file made with this --type: the type's record names it (a file mostly
    of Q4_K is llama-quantize's Q4_K_M); a mix (Q4_K_M) is its own LlamaFileType member."""
    if not isinstance(type_or_mix, str):
        return None
    from qtool.schemes.base import SCHEMES, scheme_names

    scheme = SCHEMES.get(type_or_mix) if type_or_mix in scheme_names("gguf") else None
    if scheme is not None:
        return LlamaFileType[scheme.file_type] if scheme.file_type else None
    return getattr(LlamaFileType, f"MOSTLY_{type_or_mix}", None)


def stored_type(plan: TensorPlan) -> str:
    """The GGML type this plan's tensor is written as (after keep and shape fallbacks)."""
    if len(plan.shape) < 2:
        return "F32"
    if plan.keep:
        # llama.cpp keeps mixture-of-experts routers (ffn_gate_inp) in float32, as its converter writes them.
        return "F32" if any(fnmatch.fnmatchcase(plan.name, glob) for glob in ROUTER_GLOBS) else "F16"
    name = plan.scheme
    shape = tuple(plan.shape)
    if not ggml_type(name).supports(shape):
        name = ggml_type(name).fallback or name   # llama-quantize's tensor_type_fallback (K-quants)
        if not ggml_type(name).supports(shape):
            name = "F16"    # rows not a multiple of 32, or an empty tensor: unquantized, as llama-quantize
    return name


def packed_nbytes(plan: TensorPlan) -> int:
    """Bytes the tensor takes in the GGUF file (without alignment padding)."""
    return ggml_type(stored_type(plan)).nbytes(tuple(plan.shape))


@dataclass
class _Merged:
    """The experts of one merged GGUF tensor: their plans in expert order, and the bytes quantized so far."""

    plans: list[TensorPlan]
    last: str                                   # the expert that arrives last (plan order): the write
    parts: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.plans), *self.plans[0].shape)

    @property
    def nbytes(self) -> int:
        return sum(packed_nbytes(plan) for plan in self.plans)


def _unstorable(name: str, type_name: str, exc: Exception) -> BadArgument:
    if isinstance(exc, NonFiniteWeight):
        return BadArgument(f"tensor {name} contains inf or nan values; fix the checkpoint or keep the tensor "
                           f"unquantized (--skip '{name}')")
    return BadArgument(f"tensor {name} cannot be stored as {type_name}: {exc} (--skip '{name}')")


def _promised_bytes(data: torch.Tensor, plan: TensorPlan, type_name: str, what: str) -> np.ndarray:
    """``data`` as the bytes the header promised for ``plan``; BadArgument (nothing written) otherwise."""
    array = data.cpu().contiguous().numpy()
    if array.nbytes != packed_nbytes(plan):
        raise BadArgument(f"tensor {what}: {array.nbytes} bytes of {type_name} data where the file's header says "
                          f"{packed_nbytes(plan)}; nothing written")
    return array


@dataclass
class _Split:
    """A matrix llama.cpp stores as several tensors: its split, and the pieces as plans of their own shape
    (the matrix's scheme, typed by the pieces' rows) with their GGUF names."""

    split: architectures.GGUFSplit
    pieces: list[tuple[TensorPlan, str]]


def _split_of(plan: TensorPlan, config: dict) -> _Split | None:
    split = architectures.gguf_split(plan.name, config)
    if split is None:
        return None
    model_type = architectures.model_type_of(config)
    shapes = [tuple(piece.shape) for piece in split.split(torch.empty(plan.shape, device="meta"), config)]
    return _Split(split, [(dataclasses.replace(plan, name=name, shape=shape),
                           architectures.hf_to_gguf_name(name, model_type))
                          for name, shape in zip(architectures.split_names(plan.name, config), shapes)])


def _pieces(plan: TensorPlan, config: dict) -> list[TensorPlan]:
    """The tensors a plan is written as: its split's pieces, or itself."""
    found = _split_of(plan, config)
    return [piece for piece, _ in found.pieces] if found is not None else [plan]


def _merged_groups(plans: list[TensorPlan]) -> list[_Merged]:
    """The experts merged into one GGUF tensor each, checked: experts 0..E-1 of one shape and one stored type."""
    members: dict[str, dict[int, TensorPlan]] = {}
    last: dict[str, str] = {}
    for plan in plans:
        merged = architectures.merged_expert_name(plan.name)
        if merged is not None:
            members.setdefault(merged[0], {})[merged[1]] = plan
            last[merged[0]] = plan.name
    groups = []
    for name, by_index in members.items():
        ordered = [by_index.get(index) for index in range(len(by_index))]
        if None in ordered:
            raise CorruptFile(f"the experts of {name} are not numbered 0..{len(by_index) - 1} "
                              f"({sorted(by_index)}); the checkpoint is incomplete")
        if len({tuple(plan.shape) for plan in ordered}) > 1 or len({stored_type(plan) for plan in ordered}) > 1:
            kinds = sorted({f"{stored_type(plan)} {tuple(plan.shape)}" for plan in ordered})
            raise BadArgument(f"GGUF stores the experts' {name} as one tensor, which needs one type and shape; "
                              f"got {', '.join(kinds)}: give every expert of a layer the same --include / --skip "
                              "and rules")
        groups.append(_Merged(ordered, last[name]))
    return groups


_ALIGNMENT = 32     # GGUF's default general.alignment


def _value_nbytes(value: Any) -> int:
    """A metadata value's bytes in GGUF: strings with an 8-byte length, arrays with type and count."""
    if isinstance(value, str):
        return 8 + len(value.encode())
    if isinstance(value, (list, tuple)):
        return 12 + sum(_value_nbytes(item) for item in value)
    return 1 if isinstance(value, bool) else 4


class GGUFSink(Sink):
    format: ClassVar[str] = "gguf"

    def __init__(self, out: Path, source: Source, plans: list[TensorPlan], *, force: bool,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__(out, source, plans, force=force, options=options)
        config = source.config
        architectures.check_supported(config)   # before any work: names the architecture otherwise
        model_type = architectures.model_type_of(config)
        self._gguf_names = {plan.name: architectures.hf_to_gguf_name(plan.name, model_type) for plan in plans}
        self._types = {plan.name: stored_type(plan) for plan in plans}
        # Matrices llama.cpp stores as several tensors (DeepSeek's kv_b_proj): each piece typed on its own shape.
        self._splits = {plan.name: found for plan in plans if (found := _split_of(plan, config)) is not None}
        for found in self._splits.values():
            self._types.update({piece.name: stored_type(piece) for piece, _ in found.pieces})
        written = [piece for plan in plans
                   for piece, _ in (self._splits[plan.name].pieces if plan.name in self._splits else [(plan, None)])]
        fallbacks = Counter((plan.scheme, self._types[plan.name]) for plan in written
                            if not plan.keep and len(plan.shape) >= 2 and self._types[plan.name] != plan.scheme)
        if fallbacks:
            summary = ", ".join(f"{count} x {wanted} -> {used}" for (wanted, used), count in sorted(fallbacks.items()))
            ui.warn(f"rows not a multiple of the block size (or empty tensors); written as the fallback type "
                    f"llama-quantize uses: {summary}")
        self._merged = {self._gguf_names[group.plans[0].name]: group for group in _merged_groups(plans)}
        deviations = architectures.gguf_deviations(config)
        if deviations:
            ui.warn(f"llama.cpp computes {architectures.model_type_of(config)} its own way where this checkpoint "
                    f"says {', '.join(deviations)}: the GGUF's outputs will differ from transformers'")
        metadata = self._metadata(config)
        self._staged = self.stage(is_dir=False)
        self._pending = [plan.name for plan in plans]
        self._writer: GGUFWriter | None = None
        try:
            self._writer = GGUFWriter(self._staged.path, metadata["general.architecture"])
            for key, value in metadata.items():
                if key == "general.architecture":
                    continue   # GGUFWriter writes it from its arch argument
                self._add_key(key, value)
            for plan in plans:
                type_name = GGMLQuantizationType[self._types[plan.name]]
                group = self._merged.get(self._gguf_names[plan.name])
                # numpy's shape order (rows first); the writer reverses it into GGML's ne[].
                if plan.name in self._splits:
                    for piece, gguf_name in self._splits[plan.name].pieces:
                        self._writer.add_tensor_info(gguf_name, tuple(piece.shape), np.dtype(np.float32),
                                                     packed_nbytes(piece),
                                                     raw_dtype=GGMLQuantizationType[self._types[piece.name]])
                elif group is None:
                    self._writer.add_tensor_info(self._gguf_names[plan.name], tuple(plan.shape),
                                                 np.dtype(np.float32), packed_nbytes(plan), raw_dtype=type_name)
                elif plan.name == group.last:   # written when its last expert arrives
                    self._writer.add_tensor_info(self._gguf_names[plan.name], group.shape, np.dtype(np.float32),
                                                 group.nbytes, raw_dtype=type_name)
            # Computed from the config (rope factors), written after the checkpoint's tensors.
            self._extra = {name: tensor.numpy() for name, tensor in architectures.gguf_extra_tensors(config).items()}
            for name, array in self._extra.items():
                self._writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes,
                                             raw_dtype=GGMLQuantizationType.F32)
            self._writer.write_header_to_file(self._staged.path)
            self._writer.write_kv_data_to_file()
            self._writer.write_ti_data_to_file()
        except BaseException:
            self.abort()
            raise

    # -- metadata --------------------------------------------------------------------------------
    def _metadata(self, config: dict) -> dict[str, Any]:
        try:
            metadata = dict(architectures.gguf_metadata_from_hf(config))
        except KeyError as missing:   # a field the checks leave optional but GGUF needs
            raise CorruptFile(f"{config_origin(self.source)}: the config has no {clip(missing.args[0])}, which "
                              "a GGUF file needs; add it from the model's original config.json") from None
        name = self.options.get("name") or config.get("_name_or_path") or Path(self.source.description).name
        metadata["general.type"] = "model"
        metadata["general.name"] = str(name)
        metadata["general.quantized_by"] = "qtool"
        metadata["general.file_type"] = int(self._file_type())
        metadata["general.quantization_version"] = QUANTIZATION_VERSION
        if self.options.get("plan"):      # --target-bpw / --max-size: the chosen plan, a preset --config reads
            metadata["qtool.plan"] = self.options["plan"]
        expert_plans = {plan.name for group in self._merged.values() for plan in group.plans}
        metadata["general.size_label"] = architectures.size_label(
            (plan.shape for plan in self.plans if plan.name not in expert_plans),
            (group.shape for group in self._merged.values()))
        tokenizer = tokenizer_metadata(self.source.tokenizer_dir(), config)
        if not tokenizer:
            ui.warn(f"{self.source.description} has no tokenizer files; the GGUF has no vocabulary and "
                    "llama.cpp cannot tokenize text with it")
        metadata.update(tokenizer)
        return metadata

    def _file_type(self) -> LlamaFileType:
        chosen = _file_type_of(self.options.get("gguf_type"))
        if chosen is not None:
            return chosen
        weights: Counter[str] = Counter()
        for plan in self.plans:
            if len(plan.shape) >= 2:
                weights[self._types[plan.name]] += int(torch.Size(plan.shape).numel())
        dominant = weights.most_common(1)[0][0] if weights else "F32"
        return _file_type_of(dominant) or LlamaFileType.MOSTLY_F16

    def _add_key(self, key: str, value: Any) -> None:
        # Python ints are UINT32 and floats FLOAT32, as llama.cpp's converter writes them.
        if isinstance(value, bool):
            self._writer.add_bool(key, value)
        elif isinstance(value, int):
            self._writer.add_uint32(key, value)
        elif isinstance(value, float):
            self._writer.add_float32(key, value)
        elif isinstance(value, str):
            self._writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            self._writer.add_array(key, list(value))
        else:
            raise BadArgument(f"GGUF metadata {key!r} has an unsupported value type {type(value).__name__}")

    # -- tensors ---------------------------------------------------------------------------------
    def add(self, plan: TensorPlan, tensor: torch.Tensor, packed: GGMLTensor | None = None) -> int:
        if not self._pending or self._pending[0] != plan.name:
            expected = self._pending[0] if self._pending else "nothing"
            raise BadArgument(f"GGUF tensors must arrive in plan order: got {plan.name}, expected {expected}")
        if packed is None and tuple(tensor.shape) != tuple(plan.shape):
            # The header already promised the plan's shape; other bytes would make a file no reader takes.
            raise BadArgument(f"tensor {plan.name} has shape {tuple(tensor.shape)}, the plan says {tuple(plan.shape)}")
        config = self.source.config
        if plan.name in self._splits:
            written = self._add_split(plan, tensor, packed)
            self._pending.pop(0)
            return written
        heads = architectures.qk_heads(plan.name, config)
        stored = ggml_type(self._types[plan.name])
        try:
            if packed is None:
                data = stored.quantize(architectures.to_gguf(plan.name, tensor, config), **plan.params).data
            else:
                # Calibrated blocks arrive packed; the q/k permutation moves whole rows, so it applies
                # to packed rows as well.
                if packed.type_name != stored.name:
                    raise BadArgument(f"tensor {plan.name}: calibrated as {packed.type_name}, but the file stores "
                                      f"{stored.name}")
                stored.check_scales(packed, tensor)
                if architectures.norm_offset(plan.name, config):
                    raise BadArgument(f"tensor {plan.name}: a norm weight arrived packed; llama.cpp stores it "
                                      "offset, which only an unpacked tensor can be")
                data = packed.data if heads is None else architectures.permute_qk(packed.data, heads)
        except (NonFiniteWeight, ScaleOverflow) as exc:
            raise _unstorable(plan.name, stored.name, exc) from None
        data = _promised_bytes(data, plan, stored.name, plan.name)
        group = self._merged.get(self._gguf_names[plan.name])
        if group is None:
            self._writer.write_tensor_data(data)
        else:
            group.parts[architectures.merged_expert_name(plan.name)[1]] = data
            if plan.name == group.last:
                # gguf-py pads after each tensor: the experts' bytes go in as one array, experts first.
                self._writer.write_tensor_data(np.concatenate([group.parts.pop(i).reshape(-1)
                                                               for i in range(len(group.plans))]))
        self._pending.pop(0)
        return data.nbytes

    def _add_split(self, plan: TensorPlan, tensor: torch.Tensor, packed: GGMLTensor | None) -> int:
        """The pieces of a split matrix, in order: a calibrated matrix's packed rows where a piece is a
        selection of its rows, the float matrix quantized on the piece's own rows otherwise."""
        config = self.source.config
        split = self._splits[plan.name].split
        pieces = split.split(tensor, config)
        packed_pieces = split.split(packed.data, config) if packed is not None else None
        written = 0
        for index, (piece, _) in enumerate(self._splits[plan.name].pieces):
            stored = ggml_type(self._types[piece.name])
            if packed_pieces is not None and index in split.row_parts and packed.type_name == stored.name:
                data = packed_pieces[index]
            else:
                rows = pieces[index].reshape(-1, piece.shape[-1]).contiguous()
                try:
                    data = stored.quantize(rows, **plan.params).data
                except (NonFiniteWeight, ScaleOverflow) as exc:
                    raise _unstorable(plan.name, stored.name, exc) from None
            data = _promised_bytes(data, piece, stored.name, f"{plan.name} ({piece.name})")
            self._writer.write_tensor_data(data)
            written += data.nbytes
        return written

    def finish(self, model_card: str) -> Path:
        if self._pending:
            raise BadArgument(f"GGUF output is incomplete: {len(self._pending)} tensor(s) not written, "
                              f"starting with {self._pending[0]}")
        for array in self._extra.values():
            self._writer.write_tensor_data(array)
        self._writer.close()
        return self._staged.commit()

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is removed anyway
                pass
        self._staged.abort()

    @staticmethod
    def packed_nbytes(plan: TensorPlan) -> int:
        return packed_nbytes(plan)

    @classmethod
    def planned_nbytes(cls, plan: TensorPlan, config: dict) -> int:
        """A split matrix (DeepSeek's kv_b_proj) is its pieces, each typed on its own shape."""
        return sum(packed_nbytes(piece) for piece in _pieces(plan, config))

    @classmethod
    def shared_type_groups(cls, names: list[str]) -> list[list[str]]:
        """The experts of one merged tensor (ffn_*_exps)."""
        merged: dict[str, list[str]] = {}
        for name in names:
            found = architectures.merged_expert_name(name)
            if found is not None:
                merged.setdefault(found[0], []).append(name)
        return [group for group in merged.values() if len(group) > 1]

    @classmethod
    def overhead_nbytes(cls, source: Source, plans: list[TensorPlan]) -> int:
        """GGUF's header, metadata (the vocabulary is most of it), tensor infos and 32-byte alignment."""
        config = source.config
        model_type = architectures.model_type_of(config)
        metadata = {**architectures.gguf_metadata_from_hf(config), **tokenizer_metadata(source.tokenizer_dir(), config)}
        size = 24 + 512         # magic, version, counts; the general.* keys the sink adds
        for key, value in metadata.items():
            size += 12 + len(key.encode()) + _value_nbytes(value)
        for piece in (piece for plan in plans for piece in _pieces(plan, config)):
            size += 24 + len(architectures.hf_to_gguf_name(piece.name, model_type).encode()) + 8 * len(piece.shape)
            size += -packed_nbytes(piece) % _ALIGNMENT
        return size + _ALIGNMENT

    @classmethod
    def check_layout(cls, plans: list[TensorPlan]) -> None:
        _merged_groups(plans)

    @staticmethod
    def stored_scheme(plan: TensorPlan) -> str:
        return plan.scheme if plan.keep else stored_type(plan)


__all__ = ["GGUFSink", "packed_nbytes", "stored_type", "KEEP"]
