"""GGUF, the one file llama.cpp loads: written by ``qtool.sinks.gguf.GGUFSink``, read by
``qtool.sources.gguf.GGUFSource`` (tensors dequantized on demand, in Hugging Face naming) and
recognised here from its metadata. Its plan adjustments are llama-quantize's: a plain ``--type``
gives the output matrix Q6_K, a mix is a preset (``configs/gguf-<mix>.yaml``), and tied embeddings
get the output matrix's type.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from qtool.containers.base import Container

if TYPE_CHECKING:
    from qtool.plan import Recipe, TensorPlan
    from qtool.sinks.base import Sink
    from qtool.sources.base import Source, TensorInfo

CONFIGS_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
_OUTPUT = "lm_head.weight"
_EMBEDDINGS = "model.embed_tokens.weight"


class GGUF(Container):
    name: ClassVar[str] = "gguf"
    format: ClassVar[str] = "gguf"
    families: ClassVar[tuple[str, ...]] = ("gguf",)
    bits_defaults: ClassVar[dict[int, str]] = {4: "Q4_K_M", 8: "Q8_0"}
    scheme_flag: ClassVar[str] = "--type"
    suffix: ClassVar[str | None] = ".gguf"
    writes_fused_experts: ClassVar[bool] = True
    sizing_family: ClassVar[str | None] = "gguf"
    sizes_embeddings: ClassVar[bool] = True
    # llama-quantize's mixes, each a preset (configs/gguf-<mix>.yaml, an editable copy of its choices).
    # The i-quant mixes share their names with types (IQ2_XXS, IQ3_S, ...): --type means the mix, as for
    # llama-quantize; a rule or preset naming the type gets the type alone.
    mixes: ClassVar[tuple[str, ...]] = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "MXFP4_MOE", "IQ1_S", "IQ1_M", "IQ2_XXS",
                                        "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_XS")

    @classmethod
    def writer(cls) -> type[Sink]:
        from qtool.sinks.gguf import GGUFSink

        return GGUFSink

    @classmethod
    def plan_recipe(cls, tensors: list[TensorInfo], recipe: Recipe, config: dict) -> Recipe:
        """llama-quantize's rules for the output matrix: with tied embeddings (no lm_head) token_embd is
        the output and gets the type a lm_head would get; and an output whose rows do not divide into
        its type's blocks is Q8_0 (not the type's own fallback: Q5_K would give Q5_1)."""
        import copy

        from qtool.plan import Rule, build_plan
        from qtool.schemes.base import get_scheme
        from qtool.sources.base import TensorInfo

        by_name = {info.name: info for info in tensors}
        output = by_name.get(_OUTPUT) or by_name.get(_EMBEDDINGS)
        if output is None:
            return recipe
        probe = TensorInfo(_OUTPUT, output.shape, output.stored_dtype, output.stored_bytes)
        output_plan = build_plan([probe], recipe, int(config.get("num_hidden_layers") or 0))[0]
        scheme = None if output_plan.keep else get_scheme(output_plan.scheme)    # loads the registry
        params = output_plan.params
        if not output_plan.keep and getattr(scheme, "family", None) == "gguf" and not scheme.supports(tuple(output.shape)):
            scheme, params = get_scheme("Q8_0"), {}
        if output.name == _OUTPUT and (output_plan.keep or scheme.name == output_plan.scheme):
            return recipe
        recipe = copy.deepcopy(recipe)
        if output_plan.keep:     # tied, and a lm_head would be kept
            recipe.rules.insert(0, Rule(output.name, output_plan.scheme, params=output_plan.params))
        else:
            recipe.rules.insert(0, Rule(output.name, scheme.name, params=params))
        return recipe

    @classmethod
    def named_recipe(cls, type_name: str) -> Recipe | None:
        """A mix (Q4_K_M, ...) is its preset; a plain type is llama-quantize's recipe for it: every
        2-D tensor gets the type, except the output matrix, which gets Q6_K (unless the type is at
        least as precise: Q6_K, Q8_0 or a float type)."""
        from qtool.errors import BadArgument
        from qtool.plan import Recipe, Rule
        from qtool.schemes.base import get_scheme, scheme_names

        if type_name in cls.mixes:
            return Recipe.from_yaml(mix_preset(type_name))
        types = scheme_names(cls.families[0])
        if type_name not in types:
            raise BadArgument(f"--type {type_name}: unknown GGUF type; choose a type ({', '.join(types)}) "
                              f"or a mix ({', '.join(cls.mixes)})")
        output = type_name if get_scheme(type_name).bits >= get_scheme("Q6_K").bits else "Q6_K"
        return Recipe(scheme=type_name, format=cls.format, rules=[Rule(_OUTPUT, output), Rule(_EMBEDDINGS, type_name)])

    @classmethod
    def open(cls, path: Any, spec: str) -> Source:
        """The reader: a GGUF file as a Source of float tensors in Hugging Face naming."""
        from qtool.sources.gguf import GGUFSource

        return GGUFSource(path, spec)

    @classmethod
    def detect_metadata(cls, metadata: dict[str, Any]) -> dict[str, Any] | None:
        file_type = metadata.get("general.file_type")
        if not isinstance(file_type, int):
            return None
        try:
            from gguf.constants import LlamaFileType

            file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except (ImportError, ValueError):
            file_type_name = str(file_type)
        return {"method": cls.name, "file_type": file_type_name,
                "quantization_version": metadata.get("general.quantization_version")}


def gguf_plans(tensors: list[TensorInfo], recipe: Recipe, config: dict) -> list[TensorPlan]:
    """The plans of a GGUF output: build_plan with GGUF's adjustments."""
    from qtool.plan import build_plan

    return build_plan(tensors, GGUF.plan_recipe(tensors, recipe, config), int(config.get("num_hidden_layers") or 0))


def plain_type_recipe(type_name: str) -> Recipe:
    """llama-quantize's recipe for a plain --type (see GGUF.named_recipe)."""
    from qtool.schemes.ggml import ggml_type

    ggml_type(type_name)   # unknown names (a mix's too) fail here
    recipe = GGUF.named_recipe(type_name)
    assert recipe is not None
    return recipe


def mix_preset(name: str) -> Path:
    return CONFIGS_DIR / f"gguf-{name.lower()}.yaml"
