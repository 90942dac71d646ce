"""A transformers causal LM built from any qtool Source, for evaluation.

The architecture is instantiated from the source's config with its parameters on the meta
device (no memory, no random init), then each parameter is replaced by the source's tensor,
one at a time, cast to the compute dtype and moved to the compute device: peak memory is the
model in that dtype plus one source tensor. Tensors stored under other names than the model's
parameters go through transformers' own load-time conversions for the model type (its
``conversion_mapping``): a mixture of experts' per-expert matrices (``experts.N.gate_proj``) are
stacked into the fused 3-D parameters transformers 5 builds (``experts.gate_up_proj``), one fused
parameter's experts at a time.

qtool's quantized safetensors outputs (bitsandbytes NF4/FP4/int8, compressed-tensors int8/int4)
can be evaluated two ways: through the dequantized weights the source yields (``runtime=
"dequantized"``, default; the numbers a GGUF or a bf16 model would give for the same weights)
or through the real runtime modules (``runtime="native"``: transformers ``from_pretrained``
with its bitsandbytes / compressed-tensors integration, i.e. what a user of the file gets).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qtool import ui
from qtool.architectures import block_record, expert_parts
from qtool.errors import BadArgument, CorruptFile, Unsupported
from qtool.sources.base import Source
from qtool.sources.config_check import (check_source_config, checked_hf_config, config_origin, first_line,  # noqa: F401
                                        hf_config)   # hf_config: re-exported for callers that import it from here
from qtool.sources.jsonfile import clip, load_json
from qtool.tokenizer import bos_policy, load_tokenizer

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RUNTIMES = ("dequantized", "native")


@dataclass
class LoadedModel:
    model: Any                 # transformers PreTrainedModel, eval mode, no grad
    tokenizer: Any             # transformers tokenizer
    description: str           # one line for reports
    add_bos: bool              # the tokenizer puts BOS first (llama.cpp then puts BOS first in every window)
    bos_token_id: int | None
    vocab_size: int            # logits width
    device: torch.device
    dtype: torch.dtype
    runtime: str
    parameters: int
    load_seconds: float


def torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise BadArgument(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadArgument(f"--device {device}: no CUDA device is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise BadArgument(f"--device {device}: use cpu, cuda or auto")
    return torch.device(device)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters created inside are put on the meta device; buffers (rotary tables) stay real.

    Buffers are small and computed at construction (rotary ``inv_freq``); keeping them real avoids
    recomputing them by hand for every architecture.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            kwargs = dict(module._parameters[name].__dict__)
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name].__dict__.update(kwargs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def auto_class(config_object: Any) -> Any:
    """The transformers auto class that builds this config's language model with its output head:
    ``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a vision-language model (Qwen2-VL,
    Gemma 3), which scores text alone when given token ids alone."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for candidate in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config_object) in candidate._model_mapping:
            return candidate
    return AutoModelForCausalLM   # its error names the architecture


def attention_implementation(config_object: Any) -> str:
    """torch's fused attention ("sdpa") where the model class supports it, else transformers' "eager"
    (Gemma 2 and gpt-oss refuse sdpa: their soft-capping / attention sinks are written out by hand)."""
    model_class = auto_class(config_object)._model_mapping.get(type(config_object), None)
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def build_on_meta(source: Source, config_object: Any, *, dtype: torch.dtype, keep_buffers: bool) -> Any:
    """``from_config`` of the :func:`auto_class` with the parameters on the meta device, every parameter
    shape checked against the checkpoint before anything is loaded (``keep_buffers``: buffers such as
    rotary tables are real, else they are on meta too). transformers' errors while building from a
    checked config come from the config: a corrupt config, naming it."""
    origin = config_origin(source)
    attention = attention_implementation(config_object)
    model_class = auto_class(config_object)
    try:
        if keep_buffers:
            with _parameters_on_meta():
                model = model_class.from_config(config_object, dtype=dtype, attn_implementation=attention)
        else:
            with torch.device("meta"):
                model = model_class.from_config(config_object, dtype=dtype, attn_implementation=attention)
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, IndexError) as exc:
        raise CorruptFile(f"{origin}: transformers cannot build a model from this config "
                          f"({type(exc).__name__}: {first_line(exc)}); fix the config or re-download the model") \
            from None
    shapes = {name: tuple(param.shape) for name, param in model.named_parameters(remove_duplicate=False)}
    for info in source.tensors():
        want = shapes.get(info.name)
        if want is not None and tuple(info.shape) != want:
            raise CorruptFile(f"{origin} does not fit the checkpoint: tensor {clip(info.name, 80)} has shape "
                              f"{tuple(info.shape)}, the config makes it {want}")
    return model


def load_conversions(model: Any) -> tuple[list[Any], list[Any]]:
    """transformers' load-time renamings and converters for ``model`` (what ``from_pretrained`` applies to
    checkpoint names, e.g. Mixtral's ``block_sparse_moe.`` -> ``mlp.`` and the per-expert -> fused 3-D merge);
    empty lists where it has none, or where the installed transformers has no such machinery."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    transforms = get_model_conversion_mapping(model, add_legacy=False)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _converted_name(name: str, renamings: list[Any], converters: list[Any]) -> tuple[str, Any]:
    """The parameter ``name`` loads into after transformers' renamings, and the converter that merges it
    into that parameter (None when it is only renamed), as transformers' ``rename_source_key`` decides."""
    for renaming in renamings:
        name, _ = renaming.rename_source_key(name)
    for converter in converters:
        target, pattern = converter.rename_source_key(name)
        if pattern is not None:
            return target, (converter, pattern)
    return name, None


def stored_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent buffers of ``module`` by name: the ones a checkpoint stores (DeepSeek-V3's
    ``mlp.gate.e_score_correction_bias``); rotary tables are non-persistent, computed rather than stored."""
    found = {}
    for path, owner in module.named_modules():
        for leaf, buffer in owner._buffers.items():
            if buffer is not None and leaf not in owner._non_persistent_buffers_set:
                found[f"{path}.{leaf}" if path else leaf] = buffer
    return found


def model_from_source(source: Source, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", gpu_memory: int | None = None) -> Any:
    """A transformers causal LM (eval mode) with the source's weights, filled tensor by tensor.

    On ``cuda`` (no index) with several GPUs visible, a model larger than one GPU's share
    (``gpu_memory`` bytes each, default 90% of what is free) is spread over them by accelerate's
    device map, block by block, and dispatched with its hooks (activations move between GPUs)."""
    device = torch.device(device)
    model = build_on_meta(source, checked_hf_config(source), dtype=dtype, keep_buffers=True)
    model.eval()
    device_map = gpu_device_map(model, dtype, gpu_memory) if device == torch.device("cuda") else None

    def device_of(name: str) -> torch.device:
        if device_map is None:
            return device
        module = name
        while module and module not in device_map:
            module = module.rpartition(".")[0]
        return torch.device("cuda", device_map.get(module, 0))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = stored_buffers(model)
    loaded: set[str] = set()
    unused: list[str] = []

    def put(name: str, tensor: torch.Tensor, stored_as: str) -> None:
        target = params[name] if name in params else buffers[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise CorruptFile(f"{source.description}: tensor {stored_as} has shape {tuple(tensor.shape)}, "
                              f"the config says {tuple(target.shape)}")
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name in params:
            module._parameters[leaf] = nn.Parameter(tensor.to(device=device_of(name), dtype=dtype),
                                                    requires_grad=False)
        else:   # a buffer keeps the dtype the model gives it (float32 routing biases)
            module._buffers[leaf] = tensor.to(device=device_of(name), dtype=target.dtype)
        loaded.add(name)

    conversions: tuple[list[Any], list[Any]] | None = None
    merged: dict[str, tuple[Any, list[tuple[str, str]]]] = {}   # fused parameter -> (converter, [(stored, pattern)])
    # Experts the architecture stores fused (gpt-oss), which transformers has no converter for: the
    # record fuses them. experts module -> per-expert leaf -> {expert: stored name}
    fused_layout = getattr(block_record(source.config), "fused_experts", None)
    to_fuse: dict[str, dict[str, dict[int, str]]] = {}
    for info in source.tensors():
        name, converter = info.name, None
        if name not in params and name not in buffers:
            conversions = conversions if conversions is not None else load_conversions(model)
            name, converter = _converted_name(info.name, *conversions)
        parts = expert_parts(info.name) if fused_layout is not None and name not in params else None
        if parts is not None:
            to_fuse.setdefault(parts[0], {}).setdefault(parts[2], {})[parts[1]] = info.name
        elif name not in params and name not in buffers:
            unused.append(info.name)
        elif converter is not None:
            merged.setdefault(name, (converter[0], []))[1].append((info.name, converter[1]))
        else:
            put(name, source.load(info.name), info.name)
    if merged:
        from transformers.core_model_loading import dot_natural_key

        for name, (converter, stored) in merged.items():
            # Experts in their numeric order (10 after 9), as transformers sorts a checkpoint's keys.
            for stored_name, pattern in sorted(stored, key=lambda item: dot_natural_key(item[0])):
                converter.add_tensor(name, stored_name, pattern, lambda stored_name=stored_name: source.load(stored_name))
            try:
                converted = converter.convert(name, model=model, config=model.config)
            except (RuntimeError, ValueError, IndexError) as exc:   # experts of different shapes
                raise CorruptFile(f"{source.description}: the tensors of {name} ({stored[0][0]}, ...) cannot be "
                                  f"merged as transformers merges them: {first_line(exc)}") from None
            for converted_name, tensor in converted.items():
                if converted_name in params:
                    put(converted_name, tensor, f"{converted_name} (merged from {len(stored)} tensors)")
            del converted
    for experts, leaves in to_fuse.items():
        try:
            stacked = {leaf: torch.stack([source.load(by_index[index]) for index in range(len(by_index))])
                       for leaf, by_index in leaves.items()}
            fused = fused_layout.fuse(stacked)
        except (KeyError, RuntimeError) as exc:   # an expert or a leaf missing, experts of different shapes
            raise CorruptFile(f"{source.description}: the experts of {experts} cannot be fused "
                              f"({type(exc).__name__}: {first_line(exc)}); the checkpoint is incomplete") from None
        for leaf, tensor in fused.items():
            name = f"{experts}.{leaf}"
            if name in params:
                # contiguous, as transformers' loader leaves it (its expert kernels' sums follow the layout)
                put(name, tensor.contiguous(), f"{name} (fused from {sum(map(len, leaves.values()))} tensors)")
            else:
                unused.append(name)
        del stacked, fused
    if unused:
        ui.warn(f"{source.description}: {len(unused)} tensor(s) not used by {type(model).__name__} "
                f"(first: {unused[0]})")
    model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if missing:
        raise CorruptFile(f"{source.description}: {len(missing)} weight(s) missing for "
                          f"{type(model).__name__} (first: {missing[0]})")
    for name, buffer in model.named_buffers():
        if buffer.device != device_of(name):
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = buffer.to(device_of(name))
    model.requires_grad_(False)
    if device_map is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map)
        ui.log(f"{source.description}: spread over GPUs {sorted(set(device_map.values()))} (accelerate device map)")
    return model


def gpu_device_map(model: nn.Module, dtype: torch.dtype, gpu_memory: int | None = None,
                   gpus: int | None = None) -> dict[str, int] | None:
    """accelerate's device map of ``model`` (on the meta device) over the visible GPUs, or None when
    the first GPU holds it. Decoder blocks are never split (the model's ``_no_split_modules``);
    ``gpu_memory`` is each GPU's budget in bytes (default: 90% of what is free on it)."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus < 2:
        return None
    budgets = {index: gpu_memory if gpu_memory is not None else int(torch.cuda.mem_get_info(index)[0] * 0.9)
               for index in range(gpus)}
    size = sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()
    if size <= budgets[0]:
        return None
    try:
        from accelerate import infer_auto_device_map
    except ImportError:
        raise Unsupported("spreading a model over several GPUs needs accelerate: pip install accelerate") from None
    device_map = infer_auto_device_map(model, max_memory={**budgets, "cpu": 0}, dtype=dtype,
                                       no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    if any(not isinstance(where, int) for where in device_map.values()):
        from qtool.report import human_bytes

        raise BadArgument(f"the model needs {human_bytes(size)} in {str(dtype).removeprefix('torch.')}, more than "
                          f"{gpus} GPUs with {human_bytes(budgets[0])} each hold (accelerate keeps room for the "
                          "largest layer); raise --gpu-memory, use --dtype bf16, or --device cpu")
    return device_map


def _native_folder(source: Source) -> Path | None:
    """The folder to give ``from_pretrained`` when the source is a quantized transformers checkpoint."""
    for candidate in (Path(source.spec), Path(str(source.spec).split("@")[0])):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate
    return None


def _native_model(source: Source, *, dtype: torch.dtype, device: torch.device) -> Any:
    folder = _native_folder(source)
    if folder is None:
        raise BadArgument(f"{source.spec}: --runtime native needs a local transformers folder (config.json + "
                          "safetensors); use the default dequantized runtime for this model")
    check_source_config(source)
    config = load_json(folder / "config.json", "model config")
    if "quantization_config" not in config:
        ui.warn(f"{source.spec} has no quantization_config; the native runtime loads it as a plain model")
    config_object = hf_config(config)
    model = auto_class(config_object).from_pretrained(str(folder), dtype=dtype, device_map=str(device),
                                                      attn_implementation=attention_implementation(config_object))
    model.eval()
    model.requires_grad_(False)
    return model


def replay_input_quantization(model: nn.Module, source: Source) -> int:
    """Quantize the inputs of the Linears whose inputs the file's runtime quantizes (W8A8, FP8, MXFP4), as it
    does, with forward pre-hooks: the dequantized runtime would otherwise score the weights alone.
    Returns how many modules got one."""
    from qtool.schemes.floats import fake_quantize_float_input
    from qtool.schemes.int8 import fake_quantize_input

    specs = source.input_quantization()
    for name, spec in specs.items():
        module = model.get_submodule(name)
        weight = module.weight
        scale = None if spec.scale is None else spec.scale.to(device=weight.device, dtype=weight.dtype)
        zero_point = None if spec.zero_point is None else spec.zero_point.to(weight.device)

        def quantize_input(module, args, spec=spec, scale=scale, zero_point=zero_point):
            if spec.kind == "float":
                return (fake_quantize_float_input(args[0], bits=spec.bits, group_size=spec.group_size, scale=scale,
                                                  global_scale=spec.global_scale),) + tuple(args[1:])
            return (fake_quantize_input(args[0], bits=spec.bits, symmetric=spec.symmetric, per_token=spec.per_token,
                                        scale=scale, zero_point=zero_point),) + tuple(args[1:])

        module.register_forward_pre_hook(quantize_input)
    return len(specs)


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise BadArgument(f"--runtime {runtime}: choose one of {', '.join(RUNTIMES)}")


def load_causal_lm(spec: str | Source, *, dtype: str = "fp32", device: str = "cpu",
                   runtime: str = "dequantized", revision: str | None = None,
                   gpu_memory: int | None = None) -> LoadedModel:
    """Resolve ``spec`` (anything qtool's sources read) and build the model + tokenizer for evaluation."""
    check_runtime(runtime)
    compute_dtype = torch_dtype(dtype)
    compute_device = resolve_device(device)
    started = time.perf_counter()
    if isinstance(spec, Source):
        source, owned = spec, False
    else:
        from qtool.sources.resolve import resolve

        source, owned = resolve(spec, revision=revision), True
    try:
        tokenizer = load_tokenizer(source, "evaluation")
        if runtime == "native":
            model = _native_model(source, dtype=compute_dtype, device=compute_device)
        else:
            model = model_from_source(source, dtype=compute_dtype, device=compute_device, gpu_memory=gpu_memory)
            replay_input_quantization(model, source)
        description = source.description
    finally:
        if owned:
            source.close()
    add_bos, bos_id = bos_policy(tokenizer)
    vocab_size = int(model.get_output_embeddings().weight.shape[0]) if runtime != "native" else \
        int(model.config.vocab_size)
    return LoadedModel(model=model, tokenizer=tokenizer, description=description, add_bos=add_bos,
                       bos_token_id=bos_id, vocab_size=vocab_size, device=compute_device, dtype=compute_dtype,
                       runtime=runtime, parameters=sum(p.numel() for p in model.parameters()),
                       load_seconds=time.perf_counter() - started)
