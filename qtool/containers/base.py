"""What every container record holds: one quantized-checkpoint layout's write, read and detect side
by side, with the encodings it accepts and how it adjusts a plan.

A container subclasses ``Container`` in its own module of ``qtool.containers`` (defining the class
registers it; the package finds its modules). Everything here is imported lazily where it is heavy
(torch, the writers), so the CLI can list the formats without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    import torch

    from qtool.plan import Recipe
    from qtool.sinks.base import Sink
    from qtool.sources.base import TensorInfo

# name -> record, in registration order (the package imports its modules sorted by name).
CONTAINERS: dict[str, type[Container]] = {}


@dataclass(frozen=True)
class InputQuantization:
    """How a file's runtime quantizes a Linear's input (compressed-tensors ``input_activations``):
    int with a stored per-tensor ``scale`` (and zero point), or dynamically from each token's range
    (``per_token``) or the whole input's; float (``kind`` "float": FP8, or MXFP4 for 4 bits) with a stored
    per-tensor ``scale`` (FP8), or dynamically per token or per ``group_size`` features (NVFP4's groups of 16
    under a stored ``global_scale``)."""
    bits: int
    symmetric: bool
    per_token: bool
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    kind: str = "int"
    group_size: int | None = None
    global_scale: torch.Tensor | None = None      # NVFP4 inputs: the stored input_global_scale


@dataclass
class QuantizedWeight:
    """One float weight of a quantized checkpoint: the stored tensors it is made of and how they decode."""
    info: TensorInfo
    parts: list[str]                               # stored tensors it is made of, the first one in file order
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class StoredCheckpoint:
    """A safetensors checkpoint as a reader sees it: the tensors exactly as stored."""
    description: str                               # for messages
    quantization_config: dict[str, Any]            # config.json's
    tensors: dict[str, TensorInfo]                 # stored name -> info, file order
    load_raw: Callable[[str], torch.Tensor]        # a stored tensor as it is on disk
    model_dtype: torch.dtype                       # the config's dtype (float32 when it names none)


class Container:
    """One container. Class attributes describe it; class methods write, read and detect it."""

    name: ClassVar[str]                 # as `inspect` reports it (and config.json's quant_method names it)
    format: ClassVar[str]               # the output format (--format) it belongs to
    families: ClassVar[tuple[str, ...]]  # the scheme families (Scheme.family) it stores
    # Reads safetensors checkpoints whose config.json quantization_config has this quant_method.
    quant_method: ClassVar[str | None] = None
    # The default output format's container, and its format's container for plans that quantize nothing.
    default: ClassVar[bool] = False
    # What --bits N means for this format when no scheme is named (one container per format says).
    bits_defaults: ClassVar[dict[int, str]] = {}
    # The command-line flag that names this format's encodings (--scheme or --type).
    scheme_flag: ClassVar[str] = "--scheme"
    # An output path with this suffix picks the format (a single-file format); None: a folder.
    suffix: ClassVar[str | None] = None
    # The quantization_config keys `inspect` shows.
    config_keys: ClassVar[tuple[str, ...]] = ()
    # Whether its runtime takes experts that a checkpoint stores fused (gpt-oss) as qtool writes them, one
    # matrix per expert merged by the container (GGUF's ffn_*_exps); transformers fuses only the per-expert
    # names its converters know, and has none for gpt-oss.
    writes_fused_experts: ClassVar[bool] = False
    # Whether its runtime loads a mixture's experts quantized (bitsandbytes: transformers 5 puts its weights
    # into nn.Linear modules only, and runs the experts as fused 3-D parameters).
    quantizes_experts: ClassVar[bool] = True
    # --target-bpw / --max-size: the scheme family each tensor's type is chosen from (None: this container
    # cannot be sized), and whether the embeddings and the output matrix are sized too (else the plan's).
    sizing_family: ClassVar[str | None] = None
    sizes_embeddings: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            CONTAINERS[cls.name] = cls

    # -- write -------------------------------------------------------------------------------------
    @classmethod
    def writer(cls) -> type[Sink]:
        """The Sink class that writes this container."""
        raise NotImplementedError

    @classmethod
    def plan_recipe(cls, tensors: list[TensorInfo], recipe: Recipe, config: dict) -> Recipe:
        """The recipe this format's plans follow: ``recipe`` with the format's adjustments (GGUF:
        tied embeddings); build_plan turns it into plans. Containers of one format adjust alike."""
        return recipe

    @classmethod
    def named_recipe(cls, type_name: str) -> Recipe | None:
        """The recipe a scheme or type named on the command line stands for, when it is more than
        "this scheme everywhere" (GGUF: a mix preset, or llama-quantize's choice for the output
        matrix); None: the plain recipe."""
        return None

    # -- read --------------------------------------------------------------------------------------
    @classmethod
    def read(cls, checkpoint: StoredCheckpoint) -> dict[str, QuantizedWeight]:
        """Every quantized weight of the checkpoint, by Hugging Face weight name."""
        raise NotImplementedError

    @classmethod
    def input_quantization(cls, checkpoint: StoredCheckpoint,
                           weights: dict[str, QuantizedWeight]) -> dict[str, InputQuantization]:
        """The modules whose inputs the file's runtime quantizes (W8A8), by module name."""
        return {}

    # -- detect ------------------------------------------------------------------------------------
    @classmethod
    def describe(cls, qconfig: dict[str, Any]) -> dict[str, Any]:
        """What `inspect` shows of a quantization_config this container reads."""
        return {key: qconfig[key] for key in cls.config_keys if key in qconfig}

    @classmethod
    def detect_names(cls, tensor_names: list[str]) -> dict[str, Any] | None:
        """For a checkpoint without quantization_config: details of this container recognised from
        the tensor names alone (an empty dict: recognised, nothing more to say), or None."""
        return None

    @classmethod
    def detect_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any] | None:
        """For a single-file format: what its own metadata says of the quantization, or None."""
        return None
