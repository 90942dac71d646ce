"""Which tensor gets which scheme: rules from a YAML preset and the command line, per tensor name.

Names are Hugging Face names (``model.layers.3.mlp.down_proj.weight``) whatever the source or
output format. Resolution order for one tensor, first hit wins:

1. ``rules`` (preset rules first, then command-line ones), each ``{match: GLOB, scheme: NAME,
   layers: SELECTOR?, params: {...}?}``; ``scheme: keep`` keeps the tensor as it is;
2. ``skip`` globs keep the tensor;
3. ``include`` globs, or the default set (2-D Linear weights inside decoder blocks, but not the
   mixture-of-experts routers the architecture records name), get ``scheme``;
4. everything else (embeddings, lm_head, norms, biases, routers) is kept.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from qtool.architectures import ARCHITECTURES, VISION_LANGUAGE, vision_language
from qtool.errors import BadArgument, NotFound, Unsupported
from qtool.sources.base import TensorInfo

KEEP = "keep"
# Linear weights of decoder blocks: the tensors quantized when no rule says otherwise (a
# vision-language model's language model included; its vision tower is kept).
_BLOCK_PREFIXES = ("model.layers", *dict.fromkeys(record.block_prefix for record in VISION_LANGUAGE))
DEFAULT_QUANTIZED = tuple(f"{prefix}.*.weight" for prefix in _BLOCK_PREFIXES)
# Mixture-of-experts routers (Mixtral's block_sparse_moe.gate, Qwen-MoE's mlp.gate and shared_expert_gate):
# a few rows whose errors change which experts every token reaches, and Linears transformers' MoE blocks
# run in the compute dtype (an int8 router fails in their forward). Kept unless a rule or --include names them.
ROUTER_GLOBS = tuple(dict.fromkeys(f"{prefix}.*.{router}.weight" for prefix in _BLOCK_PREFIXES
                                   for record in ARCHITECTURES for router in record.routers))
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Rule:
    match: str
    scheme: str
    layers: str | list[int] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """Everything a plan is built from; what a preset YAML file holds."""

    scheme: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    include: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    format: str | None = None
    name: str | None = None       # what the user asked for (a GGUF mix such as Q4_K_M, a preset's file name)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        """A preset file, every key and value checked: a wrong one is a BadArgument naming the file and key."""
        path = Path(path)
        return _recipe_from_mapping(_read_preset(path), path)


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    scheme: str                      # a registered scheme name, or "keep"
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def keep(self) -> bool:
        return self.scheme == KEEP


def layer_index(name: str) -> int | None:
    found = _LAYER_RE.search(name)
    return int(found.group(1)) if found else None


def uses_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get the bigger type in its _M mixes:
    the first and last eighth of the layers and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


# A rule's ``layers:`` by name: which layers of ``n_layers`` it selects.
LAYER_SELECTORS: dict[str, Callable[[int, int], bool]] = {
    "more_bits": uses_more_bits,
    "first_eighth": lambda layer, n_layers: layer < n_layers // 8,
    "first_sixteenth": lambda layer, n_layers: layer < n_layers // 16,   # llama-quantize's Q3_K_M ffn_down
    "middle": lambda layer, n_layers: n_layers // 8 <= layer < 7 * n_layers // 8,   # its IQ3_XS ffn_gate / ffn_up
}


def _layers_match(selector: str | list[int] | None, layer: int | None, n_layers: int) -> bool:
    if selector is None:
        return True
    if layer is None:
        return False
    if isinstance(selector, list):
        return layer in selector
    if isinstance(selector, str) and selector in LAYER_SELECTORS:
        return LAYER_SELECTORS[selector](layer, n_layers)
    raise BadArgument(f"unknown layer selector {_shown(selector)}; use {', '.join(LAYER_SELECTORS)} "
                      "or a list of layer numbers")


def _is_default_quantized(info: TensorInfo) -> bool:
    # An empty tensor ([0, 64]) has nothing to quantize, and no format stores it as blocks: keep it.
    return (len(info.shape) == 2 and all(dim > 0 for dim in info.shape)
            and any(fnmatch.fnmatchcase(info.name, g) for g in DEFAULT_QUANTIZED)
            and not any(fnmatch.fnmatchcase(info.name, g) for g in ROUTER_GLOBS))


def build_plan(tensors: list[TensorInfo], recipe: Recipe, n_layers: int) -> list[TensorPlan]:
    if recipe.scheme is None:
        raise BadArgument("no scheme chosen; pass --bits, --scheme, --type or --config")
    plans = []
    for info in tensors:
        layer = layer_index(info.name)
        plan = None
        for rule in recipe.rules:
            if fnmatch.fnmatchcase(info.name, rule.match) and _layers_match(rule.layers, layer, n_layers):
                plan = TensorPlan(info.name, info.shape, rule.scheme, {**recipe.params, **rule.params})
                break
        if plan is None:
            if any(fnmatch.fnmatchcase(info.name, g) for g in recipe.skip):
                plan = TensorPlan(info.name, info.shape, KEEP)
            elif _is_default_quantized(info) or any(fnmatch.fnmatchcase(info.name, g) for g in recipe.include):
                plan = TensorPlan(info.name, info.shape, recipe.scheme, dict(recipe.params))
            else:
                plan = TensorPlan(info.name, info.shape, KEEP)
        plans.append(plan)
    return plans


# -- coverage: a plan that quantizes nothing, or misses the decoder blocks, is refused -------------
_BLOCK_RE = re.compile(r"^(.+?)\.(\d+)\.")   # the numbered block a name is in: ("transformer.h", "3")
_EXAMPLES_SHOWN = 3


def _block_of(name: str) -> tuple[str, int] | None:
    found = _BLOCK_RE.match(name)
    return (found.group(1), int(found.group(2))) if found else None


def _is_matrix(plan: TensorPlan) -> bool:
    return len(plan.shape) == 2 and all(dim > 0 for dim in plan.shape) and plan.name.endswith(".weight")


def _kept_on_purpose(name: str, recipe: Recipe) -> bool:
    """A --skip glob or a ``scheme: keep`` rule names the tensor: keeping it is the user's choice."""
    return (any(fnmatch.fnmatchcase(name, glob) for glob in recipe.skip)
            or any(rule.scheme == KEEP and fnmatch.fnmatchcase(name, rule.match) for rule in recipe.rules))


def _include_hint(names: list[str]) -> str:
    """--include globs that pick the Linear weights ``names`` (and not the norms beside them)."""
    globs: list[str] = []
    for name in names:
        block = _block_of(name)
        if block is None:
            glob = name
        else:
            prefix, index = block
            parts = name[len(f"{prefix}.{index}."):].split(".")
            glob = f"{prefix}.*.{parts[0]}.*.weight" if len(parts) > 2 else f"{prefix}.*.{'.'.join(parts)}"
        if glob not in globs:
            globs.append(glob)
    return " ".join(f"--include '{glob}'" for glob in globs)


def check_coverage(plans: list[TensorPlan], recipe: Recipe, config: dict[str, Any]) -> str | None:
    """Refuse (Unsupported) a plan that would quantize no weight, or none of the decoder blocks' Linear
    weights, when the tensors are laid out in a way the default rule does not know (falcon's
    ``transformer.h.N``, gpt_neox's ``gpt_neox.layers.N``): such a run would write the model unchanged
    and exit 0. Where --skip / --include / rules chose this, returns a warning to show instead."""
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    n_layers = config.get("num_hidden_layers") or text_config.get("num_hidden_layers") or 0
    model_type = config.get("model_type") or "unknown"
    blocks: dict[str, set[int]] = {}
    for plan in plans:
        block = _block_of(plan.name)
        if block is not None:
            blocks.setdefault(block[0], set()).add(block[1])
    # The decoder: the numbered blocks as many as the config's layers (any numbered blocks if none fit).
    decoder = {prefix for prefix, indices in blocks.items() if len(indices) == n_layers} or set(blocks)
    vision_record = vision_language(config)
    if vision_record is not None and vision_record.block_prefix in blocks:
        decoder = {vision_record.block_prefix}   # a vision tower as deep as the language model is not it
    quantized = [plan for plan in plans if not plan.keep]
    decoder_quantized = any((_block_of(plan.name) or ("",))[0] in decoder for plan in quantized)
    matrices = [plan for plan in plans if _is_matrix(plan)]
    missed = [plan.name for plan in matrices if plan.keep and (_block_of(plan.name) or ("",))[0] in decoder
              and not _kept_on_purpose(plan.name, recipe)]
    if quantized and (decoder_quantized or not missed):
        return None
    if missed:
        examples = ", ".join(missed[:_EXAMPLES_SHOWN])
        hint = _include_hint(missed)
        if quantized and (recipe.include or any(rule.scheme != KEEP for rule in recipe.rules)):
            return (f"the plan quantizes {len(quantized)} tensor(s) picked by --include / rules but none of the "
                    f"{len(missed)} Linear weight(s) of the decoder blocks (e.g. {examples}); add {hint} to quantize them")
        raise Unsupported(f"{model_type}: the plan quantizes {'no weight' if not quantized else 'none of the decoder blocks'}: "
                          f"{len(missed)} of the model's {len(matrices)} 2-D weights are Linear weights of decoder "
                          f"blocks laid out as qtool's default rule (model.layers.N.*) does not know (e.g. {examples}); "
                          f"pass {hint} to quantize them, or --include GLOB to pick tensors")
    kept_on_purpose = [plan for plan in matrices if _kept_on_purpose(plan.name, recipe)]
    if kept_on_purpose:
        return (f"the plan quantizes no weight: --skip / keep rules keep {len(kept_on_purpose)} of the model's "
                f"{len(matrices)} 2-D weights; the output holds the model's weights unchanged")
    if not matrices:
        raise Unsupported(f"{model_type}: the plan quantizes no weight: the model has no 2-D weight to quantize")
    raise Unsupported(f"{model_type}: the plan quantizes no weight: the model has {len(matrices)} 2-D weight(s) "
                      f"(e.g. {', '.join(plan.name for plan in matrices[:_EXAMPLES_SHOWN])}), none in numbered "
                      "decoder blocks; pass --include GLOB to pick tensors to quantize")


# -- presets (YAML) and scheme parameters ----------------------------------------------------
PRESET_KEYS = ("scheme", "params", "include", "skip", "rules", "format", "description")
RULE_KEYS = tuple(f.name for f in fields(Rule))
MAX_PRESET_BYTES = 1 << 20     # presets are a few hundred bytes; this bounds a hostile file's parse
MAX_PRESET_NESTING = 64


def _shown(value: Any, limit: int = 60) -> str:
    """A value from a file, for a message: repr, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_block_size(value: Any) -> str | None:
    from qtool.schemes.nf4 import BLOCK_SIZES

    if _is_int(value) and value in BLOCK_SIZES:
        return None
    return f"{_shown(value)} is not a block size; choose one of {', '.join(map(str, BLOCK_SIZES))}"


def _check_group_size(value: Any) -> str | None:
    # int4 levels are packed 8 to a 32-bit word; a group is a whole number of words.
    if _is_int(value) and value > 0 and value % 8 == 0:
        return None
    return f"{_shown(value)} is not a group size; use a positive multiple of 8 that divides the input columns, e.g. 128"


def _check_choice(choices_of: Callable[[], tuple[str, ...]]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        choices = choices_of()
        return None if isinstance(value, str) and value in choices else \
            f"{_shown(value)}: choose one of {', '.join(choices)}"
    return check


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"{_shown(value)}: use true or false"


def _check_alpha(value: Any) -> str | None:
    return None if _is_number(value) and 0 <= value <= 1 else \
        f"{_shown(value)}: choose an alpha between 0 (off) and 1, e.g. 0.8"


def _check_percentile(value: Any) -> str | None:
    return None if _is_number(value) and 0 < value <= 100 else \
        f"{_shown(value)}: choose a percentile above 0 and at most 100, e.g. 99.99"


def _act_ranges() -> tuple[str, ...]:
    from qtool.schemes.int8 import ACT_RANGES

    return ACT_RANGES


def _act_strategies() -> tuple[str, ...]:
    from qtool.schemes.base import all_schemes

    return tuple(dict.fromkeys(s for scheme in all_schemes().values() for s in scheme.act_strategies))


# What a valid value of each scheme parameter is; which schemes read it is each Scheme's ``params``.
PARAM_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "block_size": _check_block_size,
    "double_quant": _check_bool,
    "group_size": _check_group_size,
    "act_range": _check_choice(_act_ranges),
    "act_strategy": _check_choice(_act_strategies),
    "act_percentile": _check_percentile,
    "act_symmetric": _check_bool,
    "smooth": _check_alpha,
    "smooth_down": _check_alpha,
}


def check_param(name: str, value: Any, where: str) -> None:
    """``where`` names the origin for the message: ``--group-size`` or ``preset p.yaml: params.group_size``."""
    check = PARAM_CHECKS.get(name)
    if check is None:
        raise BadArgument(f"{where}: unknown parameter; known: {', '.join(PARAM_CHECKS)}")
    problem = check(value)
    if problem is not None:
        raise BadArgument(f"{where}: {problem}")


def check_scheme_name(name: Any, where: str, *, keep_allowed: bool) -> str:
    """A registered scheme name (or ``keep`` where a rule may keep a tensor)."""
    from qtool.schemes.base import all_schemes

    if keep_allowed and name == KEEP:
        return name
    schemes = all_schemes()
    if not isinstance(name, str) or name not in schemes:
        extra = f"{KEEP}, " if keep_allowed else ""
        raise BadArgument(f"{where}: unknown scheme {_shown(name)}; choose one of {extra}{', '.join(sorted(schemes))}")
    return name


def check_params_apply(scheme: str, params: dict[str, Any], where_of: Callable[[str], str]) -> None:
    """Every parameter is one ``scheme`` reads: a parameter it ignores would be silently lost."""
    from qtool.schemes.base import get_scheme

    if scheme == KEEP:
        if params:
            raise BadArgument(f"{where_of(next(iter(params)))}: a tensor kept as it is takes no parameters")
        return
    accepted = get_scheme(scheme).params
    for name in params:
        if name not in accepted:
            readers = sorted(s.name for s in _all_schemes() if name in s.params)
            raise BadArgument(f"{where_of(name)} does not apply to scheme {scheme} "
                              f"({'it takes ' + ', '.join(accepted) if accepted else 'it takes no parameters'}); "
                              f"{name} is for {', '.join(readers) or 'no scheme'}")


def _all_schemes() -> list[Any]:
    from qtool.schemes.base import all_schemes

    return list(all_schemes().values())


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ ] and { } (brackets inside quotes count too: an upper bound)."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _read_preset(path: Path) -> Any:
    """The parsed YAML of a preset file (safe_load: tags that build objects are refused)."""
    if not path.exists():
        raise NotFound(f"preset {path} does not exist; see configs/ for examples")
    if not path.is_file():   # a folder, a FIFO (whose read would block), a device
        raise BadArgument(f"preset {path} is not a regular file; pass a YAML file (see configs/)")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_PRESET_BYTES + 1)
    except OSError as exc:
        raise BadArgument(f"preset {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > MAX_PRESET_BYTES:
        raise BadArgument(f"preset {path} is larger than {MAX_PRESET_BYTES // 1024} KiB; a preset is a short YAML file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadArgument(f"preset {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if _flow_depth(text) > MAX_PRESET_NESTING:   # PyYAML recurses per level: slow, then RecursionError
        raise BadArgument(f"preset {path} nests lists or mappings more than {MAX_PRESET_NESTING} levels deep; "
                          "a preset is a short, flat YAML file")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadArgument(f"preset {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except (ValueError, RecursionError, OverflowError) as exc:   # 5000-digit integers, deep nesting
        raise BadArgument(f"preset {path} is not a usable YAML file ({type(exc).__name__}); "
                          "see configs/ for examples") from None


def _recipe_from_mapping(raw: Any, path: Path) -> Recipe:
    def bad(key: str, problem: str) -> BadArgument:
        return BadArgument(f"preset {path}: {key}: {problem}")

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadArgument(f"preset {path} must be a mapping of keys (scheme, params, rules, ...)")
    unknown = [key for key in raw if key not in PRESET_KEYS]
    if unknown:
        names = ", ".join(key if isinstance(key, str) else _shown(key) for key in unknown)
        raise BadArgument(f"preset {path}: unknown key(s) {names}; a preset has {', '.join(PRESET_KEYS)}")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise bad("description", "must be text")
    fmt = raw.get("format")
    if fmt is not None:
        from qtool.containers import formats

        if not isinstance(fmt, str) or fmt not in formats():
            raise bad("format", f"{_shown(fmt)}: choose one of {', '.join(formats())}")
    scheme = raw.get("scheme")
    if scheme is not None:
        check_scheme_name(scheme, f"preset {path}: scheme", keep_allowed=False)
    params = _preset_params(raw.get("params"), "params", bad)
    globs = {key: _preset_globs(raw.get(key), key, bad) for key in ("include", "skip")}
    rules_raw = raw.get("rules")
    if rules_raw is None:
        rules_raw = []
    if not isinstance(rules_raw, list):
        raise bad("rules", "must be a list of {match: GLOB, scheme: NAME, layers: ..., params: {...}}")
    rules = [_preset_rule(rule, f"rules[{index}]", path, bad) for index, rule in enumerate(rules_raw)]
    return Recipe(scheme=scheme, params=params, include=globs["include"], skip=globs["skip"], rules=rules,
                  format=fmt, name=path.stem)


def _preset_params(raw: Any, key: str, bad: Callable[[str, str], BadArgument]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad(key, f"must be a mapping of parameter: value (known: {', '.join(PARAM_CHECKS)})")
    for name, value in raw.items():
        if not isinstance(name, str) or name not in PARAM_CHECKS:
            raise bad(f"{key}.{name}", f"unknown parameter; known: {', '.join(PARAM_CHECKS)}")
        problem = PARAM_CHECKS[name](value)
        if problem is not None:
            raise bad(f"{key}.{name}", problem)
    return dict(raw)


def _preset_globs(raw: Any, key: str, bad: Callable[[str, str], BadArgument]) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):   # list("model.*") would be its characters
        raise bad(key, f"must be a list of globs; write {key}: [{_shown(raw)}]")
    if not isinstance(raw, list) or not all(isinstance(glob, str) and glob for glob in raw):
        raise bad(key, "must be a list of non-empty globs (text), e.g. ['model.layers.*.weight']")
    return list(raw)


def _preset_rule(raw: Any, key: str, path: Path, bad: Callable[[str, str], BadArgument]) -> Rule:
    if not isinstance(raw, dict):
        raise bad(key, "must be a mapping {match: GLOB, scheme: NAME, layers: ..., params: {...}}")
    unknown = [name for name in raw if name not in RULE_KEYS]
    if unknown:
        raise bad(key, f"bad rule: unknown key(s) {', '.join(map(str, unknown))}; a rule has {', '.join(RULE_KEYS)}")
    match = raw.get("match")
    if not isinstance(match, str) or not match:
        raise bad(f"{key}.match", "bad rule: needs a glob of tensor names (text)")
    if raw.get("scheme") is None:
        raise bad(f"{key}.scheme", f"bad rule: needs a scheme (or {KEEP})")
    scheme = check_scheme_name(raw["scheme"], f"preset {path}: {key}.scheme", keep_allowed=True)
    layers = raw.get("layers")
    if isinstance(layers, list):
        if not all(_is_int(layer) and layer >= 0 for layer in layers):
            raise bad(f"{key}.layers", "a list of layers holds layer numbers (0, 1, ...)")
    elif layers is not None and not (isinstance(layers, str) and layers in LAYER_SELECTORS):
        raise bad(f"{key}.layers", f"{_shown(layers)}: use {', '.join(LAYER_SELECTORS)} or a list of layer numbers")
    params = _preset_params(raw.get("params"), f"{key}.params", bad)
    check_params_apply(scheme, params, lambda name: f"preset {path}: {key}.params.{name}")
    return Rule(match=match, scheme=scheme, layers=layers, params=params)
