"""Turn command-line options and presets into one Recipe (flags override the preset)."""
from __future__ import annotations

from pathlib import Path

from qtool.errors import BadArgument
from qtool.plan import KEEP, Recipe, check_param, check_params_apply, check_scheme_name

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# What --bits means when no scheme or type is named.
BITS_DEFAULTS = {"safetensors": {4: "nf4", 8: "int8-sym"}, "gguf": {4: "Q4_K_M", 8: "Q8_0"}}
# GGUF mixes are presets: configs/gguf-<name>.yaml, editable copies of llama-quantize's choices.
GGUF_MIXES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M")
# The flag that sets each scheme parameter on the command line (for messages).
PARAM_FLAGS = {"block_size": "--block-size", "group_size": "--group-size", "double_quant": "--no-double-quant",
               "act_range": "--act-range", "act_strategy": "--act-strategy", "smooth": "--smooth",
               "smooth_down": "--smooth-down", "act_symmetric": "--act-asymmetric/--act-symmetric"}


def check_quantize_options(*, output: Path | None, method: str, calib_samples: int, calib_seqlen: int) -> None:
    """`qtool quantize`'s options that need no file or network: checked before any work."""
    from qtool.calibration.methods import METHODS

    if method not in METHODS:
        raise BadArgument(f"--method {method}: choose one of {', '.join(METHODS)}")
    # typer turns -o "" into Path("."): either way the current folder, which cannot be replaced.
    if output is not None and (str(output) in ("", ".") or not str(output).strip()):
        raise BadArgument(f"-o/--output {str(output)!r}: name the folder or .gguf file to write, e.g. -o out-nf4")
    check_calibration_counts(calib_samples, calib_seqlen)


def check_calibration_counts(samples: int, seqlen: int) -> None:
    """--calib-samples / --calib-seqlen (quantize and calibrate)."""
    if samples < 1:
        raise BadArgument(f"--calib-samples {samples}: must be at least 1 (default 128)")
    if seqlen < 2:
        raise BadArgument(f"--calib-seqlen {seqlen}: must be at least 2 tokens (default 512)")


def mix_preset(name: str) -> Path:
    return CONFIGS_DIR / f"gguf-{name.lower()}.yaml"


def choose_format(fmt: str | None, gguf_type: str | None, output: Path | None, config: Path | None) -> str:
    if fmt is not None:
        from qtool.pipeline import FORMATS

        if fmt not in FORMATS:
            raise BadArgument(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
        return fmt
    if gguf_type or (output is not None and output.suffix == ".gguf"):
        return "gguf"
    if config is not None:
        return Recipe.from_yaml(config).format or "safetensors"
    return "safetensors"


def recipe_from_options(*, fmt: str, bits: int | None, scheme: str | None, gguf_type: str | None,
                        config: Path | None, block_size: int | None, group_size: int | None,
                        double_quant: bool | None, include: list[str], skip: list[str],
                        act_range: str | None = None, act_strategy: str | None = None,
                        smooth: float | None = None, act_asymmetric: bool | None = None,
                        smooth_down: float | None = None) -> Recipe:
    if fmt == "safetensors" and gguf_type:
        raise BadArgument(f"--type {gguf_type} is a GGUF type; add --format gguf (or use --scheme for safetensors)")
    if fmt == "gguf" and scheme:
        raise BadArgument(f"--scheme {scheme} is for safetensors outputs; GGUF takes --type (e.g. Q4_K_M)")
    if bits is not None and bits not in (4, 8):
        raise BadArgument(f"--bits {bits}: choose 4 or 8")
    flag_params = {"block_size": block_size, "group_size": group_size, "double_quant": double_quant}
    for key, value in flag_params.items():
        if value is not None:
            check_param(key, value, f"{PARAM_FLAGS[key]} {value}" if key != "double_quant" else PARAM_FLAGS[key])
    chosen = gguf_type or scheme
    if chosen is None and bits is not None:
        chosen = BITS_DEFAULTS[fmt][bits]
    if chosen is not None and fmt == "gguf":
        chosen = chosen.upper()

    if config is not None:
        recipe = Recipe.from_yaml(config)
    elif chosen in GGUF_MIXES:
        recipe = Recipe.from_yaml(mix_preset(chosen))
        recipe.name = chosen
        chosen = None   # the mix preset names its own default type
    elif fmt == "gguf" and chosen is not None:
        from qtool.sinks.gguf import plain_type_recipe

        recipe = plain_type_recipe(chosen)   # llama-quantize's choices for the output matrix
        recipe.name = chosen
        chosen = None
    else:
        recipe = Recipe()
    if chosen is not None:
        recipe.scheme = chosen
    if recipe.scheme is None:
        raise BadArgument("nothing to do: choose --bits 4|8, --scheme, --type or --config")
    named = "--type" if gguf_type else "--scheme" if scheme else None
    check_scheme_name(recipe.scheme, f"{named} {gguf_type or scheme}" if named else f"preset {config}: scheme",
                      keep_allowed=False)
    if bits is not None and named is not None:
        _check_bits_agree(bits, recipe.scheme, f"{named} {gguf_type or scheme}")
    recipe.format = fmt
    for key, value in flag_params.items():
        if value is not None:
            recipe.params[key] = value
    _activation_options(recipe, act_range, act_strategy, smooth, act_asymmetric, smooth_down)
    from_flags = {key for key, value in flag_params.items() if value is not None}
    check_params_apply(recipe.scheme, recipe.params,
                       lambda key: PARAM_FLAGS[key] if key in from_flags else
                       f"preset {config or recipe.name}: params.{key}")
    _check_format_holds(fmt, recipe)
    recipe.include += include
    recipe.skip += skip
    return recipe


def _check_bits_agree(bits: int, scheme_name: str, named: str) -> None:
    """--bits with --scheme/--type: both name a width; they must be the same one."""
    from qtool.schemes.base import get_scheme

    scheme_bits = get_scheme(scheme_name).bits
    if int(scheme_bits) != bits:
        raise BadArgument(f"--bits {bits} contradicts {named} ({scheme_bits:g} bits per weight); "
                          "give one of them")


def _check_format_holds(fmt: str, recipe: Recipe) -> None:
    """The output format can store every scheme the recipe names (before any model is read)."""
    from qtool.sinks import sink_class

    sink_class(fmt, {recipe.scheme, *(rule.scheme for rule in recipe.rules if rule.scheme != KEEP)})


def _activation_options(recipe: Recipe, act_range: str | None, act_strategy: str | None,
                        smooth: float | None, act_asymmetric: bool | None = None,
                        smooth_down: float | None = None) -> None:
    """--act-range / --act-strategy / --smooth: how the w8a8 scheme quantizes Linear inputs."""
    from qtool.calibration.activation import ACT_RANGES, ACT_STRATEGIES

    for flag, alpha in (("--smooth", smooth), ("--smooth-down", smooth_down)):
        if alpha is not None and not 0 <= alpha <= 1:
            raise BadArgument(f"{flag} {alpha}: choose an alpha between 0 (off) and 1, e.g. 0.8")
    for flag, value, choices in (("--act-range", act_range, ACT_RANGES), ("--act-strategy", act_strategy, ACT_STRATEGIES),
                                 ("--smooth", smooth, None), ("--act-asymmetric", act_asymmetric, None),
                                 ("--smooth-down", smooth_down, None)):
        if value is None:
            continue
        if choices is not None and value not in choices:
            raise BadArgument(f"{flag} {value}: choose one of {', '.join(choices)}")
        if recipe.scheme != "w8a8" and all(rule.scheme != "w8a8" for rule in recipe.rules):
            raise BadArgument(f"{flag} sets how inputs are quantized, which only --scheme w8a8 does "
                              "(or --config configs/w8a8.yaml)")
    if act_range is not None:
        recipe.params["act_range"] = act_range
    if act_strategy is not None:
        recipe.params["act_strategy"] = act_strategy
    if smooth is not None:
        recipe.params["smooth"] = smooth
    if smooth_down is not None:
        recipe.params["smooth_down"] = smooth_down
    if act_asymmetric is not None:
        recipe.params["act_symmetric"] = not act_asymmetric
