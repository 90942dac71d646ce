"""Turn command-line options and presets into one Recipe (flags override the preset)."""
from __future__ import annotations

from pathlib import Path

from qtool.errors import BadArgument
from qtool.plan import KEEP, Recipe, check_param, check_params_apply, check_scheme_name

# The flag that sets each scheme parameter on the command line (for messages).
PARAM_FLAGS = {"block_size": "--block-size", "group_size": "--group-size", "double_quant": "--no-double-quant",
               "act_range": "--act-range", "act_strategy": "--act-strategy", "smooth": "--smooth",
               "smooth_down": "--smooth-down", "act_symmetric": "--act-asymmetric/--act-symmetric"}


def check_quantize_options(*, output: Path | None, method: str, calib_samples: int, calib_seqlen: int,
                           all_experts: bool = False, expert_min_tokens: int = 0, stats: Path | None = None,
                           imatrix: Path | None = None, sized: bool = False) -> str:
    """`qtool quantize`'s options that need no file or network: checked before any work. Returns the
    method to run (--imatrix alone means --method imatrix; so does --stats when --target-bpw / --max-size
    measure damage with it: the types are then quantized as measured)."""
    from qtool.calibration.methods import METHODS

    if method not in METHODS:
        raise BadArgument(f"--method {method}: choose one of {', '.join(METHODS)}")
    if imatrix is not None:
        if stats is not None:
            raise BadArgument("--imatrix and --stats both give the statistics; pass one")
        if method not in ("rtn", "imatrix"):
            raise BadArgument(f"--method {method} needs X^T X, which a llama.cpp importance matrix (--imatrix) does "
                              "not hold; use --method imatrix, or `qtool calibrate` and --stats")
        method = "imatrix"
    if sized and stats is not None and method == "rtn":
        method = "imatrix"
    if all_experts and method == "rtn":
        raise BadArgument("--all-experts changes what calibration sees; --method rtn calibrates nothing "
                          "(add --method gptq, awq or imatrix)")
    if expert_min_tokens < 0:
        raise BadArgument(f"--expert-min-tokens {expert_min_tokens}: must be 0 or more (default 64)")
    # typer turns -o "" into Path("."): either way the current folder, which cannot be replaced.
    if output is not None and (str(output) in ("", ".") or not str(output).strip()):
        raise BadArgument(f"-o/--output {str(output)!r}: name the folder or .gguf file to write, e.g. -o out-nf4")
    check_calibration_counts(calib_samples, calib_seqlen)
    return method


def check_calibration_counts(samples: int, seqlen: int) -> None:
    """--calib-samples / --calib-seqlen (quantize and calibrate)."""
    if samples < 1:
        raise BadArgument(f"--calib-samples {samples}: must be at least 1 (default 128)")
    if seqlen < 2:
        raise BadArgument(f"--calib-seqlen {seqlen}: must be at least 2 tokens (default 512)")


def choose_format(fmt: str | None, gguf_type: str | None, output: Path | None, config: Path | None) -> str:
    """--format, else the format --type names, else the one the output's suffix names (out.gguf), else
    the preset's, else the default (each container record says which applies to it)."""
    from qtool import containers

    if fmt is not None:
        return containers.check_format(fmt)
    by_type = containers.format_for_flag("--type") if gguf_type else None
    by_suffix = containers.format_for_path(output.suffix) if output is not None else None
    if by_type or by_suffix:
        return by_type or by_suffix
    if config is not None:
        return Recipe.from_yaml(config).format or containers.default_format()
    return containers.default_format()


def recipe_from_options(*, fmt: str, bits: int | None, scheme: str | None, gguf_type: str | None,
                        config: Path | None, block_size: int | None, group_size: int | None,
                        double_quant: bool | None, include: list[str], skip: list[str],
                        act_range: str | None = None, act_strategy: str | None = None,
                        smooth: float | None = None, act_asymmetric: bool | None = None,
                        smooth_down: float | None = None) -> Recipe:
    from qtool import containers

    # Each format names its encodings with one flag (GGUF: --type, safetensors: --scheme).
    flag = containers.format_option(fmt, "scheme_flag")
    if gguf_type and flag != "--type":
        typed = containers.format_for_flag("--type")
        raise BadArgument(f"--type {gguf_type} is a {typed.upper()} type; add --format {typed} (or use {flag} for {fmt})")
    if scheme and flag != "--scheme":
        raise BadArgument(f"--scheme {scheme} is for {containers.format_for_flag('--scheme')} outputs; {fmt} takes "
                          f"{flag} (e.g. {containers.format_option(fmt, 'bits_defaults')[4]})")
    if bits is not None and bits not in (4, 8):
        raise BadArgument(f"--bits {bits}: choose 4 or 8")
    flag_params = {"block_size": block_size, "group_size": group_size, "double_quant": double_quant}
    for key, value in flag_params.items():
        if value is not None:
            check_param(key, value, f"{PARAM_FLAGS[key]} {value}" if key != "double_quant" else PARAM_FLAGS[key])
    chosen = gguf_type or scheme
    if chosen is None and bits is not None:
        chosen = containers.format_option(fmt, "bits_defaults")[bits]
    if chosen is not None and flag == "--type":
        chosen = chosen.upper()     # GGML type names are upper case; --type q4_k_m is Q4_K_M

    named_recipe = None
    if config is None and chosen is not None:
        named_recipe = containers.format_option(fmt, "named_recipe")(chosen)
    if config is not None:
        recipe = Recipe.from_yaml(config)
    elif named_recipe is not None:
        # A name that stands for a recipe: a GGUF mix preset, or llama-quantize's choices for a plain type.
        recipe = named_recipe
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
    from qtool.containers import container_for

    container_for(fmt, {recipe.scheme, *(rule.scheme for rule in recipe.rules if rule.scheme != KEEP)})


def _activation_options(recipe: Recipe, act_range: str | None, act_strategy: str | None,
                        smooth: float | None, act_asymmetric: bool | None = None,
                        smooth_down: float | None = None) -> None:
    """--act-range / --act-strategy / --smooth: how the schemes whose runtime quantizes Linear inputs (w8a8,
    fp8: their records' ``act_strategies``) do it."""
    from qtool.schemes.base import all_schemes
    from qtool.schemes.int8 import ACT_RANGES

    schemes = all_schemes()
    named = [schemes[name] for name in (recipe.scheme, *(rule.scheme for rule in recipe.rules)) if name in schemes]
    strategies = tuple(dict.fromkeys(s for scheme in named for s in scheme.act_strategies))

    for flag, alpha in (("--smooth", smooth), ("--smooth-down", smooth_down)):
        if alpha is not None and not 0 <= alpha <= 1:
            raise BadArgument(f"{flag} {alpha}: choose an alpha between 0 (off) and 1, e.g. 0.8")
    for flag, value, choices in (("--act-range", act_range, ACT_RANGES), ("--act-strategy", act_strategy, strategies),
                                 ("--smooth", smooth, None), ("--act-asymmetric", act_asymmetric, None),
                                 ("--smooth-down", smooth_down, None)):
        if value is None:
            continue
        if not strategies:
            readers = ", ".join(sorted(name for name, scheme in schemes.items() if scheme.act_strategies))
            raise BadArgument(f"{flag} sets how inputs are quantized, which only --scheme {readers} do "
                              "(or --config configs/w8a8.yaml)")
        if choices is not None and value not in choices:
            raise BadArgument(f"{flag} {value}: choose one of {', '.join(choices)}")
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


def sized_recipe_base(*, fmt: str, config: Path | None, include: list[str], skip: list[str], gguf_type: str | None,
                      scheme: str | None, bits: int | None) -> Recipe:
    """What --target-bpw / --max-size start from: which tensors to quantize (--include, --skip, a preset's),
    no type (the sizing chooses each)."""
    given = [flag for flag, value in (("--type", gguf_type), ("--scheme", scheme), ("--bits", bits)) if value]
    if given:
        raise BadArgument(f"--target-bpw / --max-size choose each tensor's type; drop {', '.join(given)}")
    preset = Recipe.from_yaml(config) if config is not None else Recipe()
    return Recipe(format=fmt, include=[*preset.include, *include], skip=[*preset.skip, *skip])
