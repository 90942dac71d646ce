"""Which tensor gets which scheme: rules from a YAML preset and the command line, per tensor name.

Names are Hugging Face names (``model.layers.3.mlp.down_proj.weight``) whatever the source or
output format. Resolution order for one tensor, first hit wins:

1. ``rules`` (preset rules first, then command-line ones), each ``{match: GLOB, scheme: NAME,
   layers: SELECTOR?, params: {...}?}``; ``scheme: keep`` keeps the tensor as it is;
2. ``skip`` globs keep the tensor;
3. ``include`` globs, or the default set (2-D Linear weights inside decoder blocks), get ``scheme``;
4. everything else (embeddings, lm_head, norms, biases) is kept.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qtool.errors import BadArgument, NotFound
from qtool.sources.base import TensorInfo

KEEP = "keep"
# Linear weights of decoder blocks: the tensors quantized when no rule says otherwise.
DEFAULT_QUANTIZED = ("model.layers.*.weight",)
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
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"preset {path} does not exist; see configs/ for examples")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BadArgument(f"preset {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise BadArgument(f"preset {path} must be a mapping of keys (scheme, params, rules, ...)")
        unknown = set(raw) - {"scheme", "params", "include", "skip", "rules", "format", "description"}
        if unknown:
            raise BadArgument(f"preset {path}: unknown key(s) {', '.join(sorted(unknown))}")
        try:
            rules = [Rule(**rule) for rule in raw.get("rules") or []]
        except TypeError as exc:
            raise BadArgument(f"preset {path}: bad rule ({exc})") from None
        return cls(scheme=raw.get("scheme"), params=dict(raw.get("params") or {}),
                   include=list(raw.get("include") or []), skip=list(raw.get("skip") or []),
                   rules=rules, format=raw.get("format"), name=path.stem)


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


def _layers_match(selector: str | list[int] | None, layer: int | None, n_layers: int) -> bool:
    if selector is None:
        return True
    if layer is None:
        return False
    if isinstance(selector, list):
        return layer in selector
    if selector == "more_bits":
        return uses_more_bits(layer, n_layers)
    if selector == "first_eighth":
        return layer < n_layers // 8
    if selector == "first_sixteenth":   # llama-quantize's Q3_K_M ffn_down choice
        return layer < n_layers // 16
    raise BadArgument(f"unknown layer selector {selector!r}; use more_bits, first_eighth, first_sixteenth "
                      "or a list of layer numbers")


def _is_default_quantized(info: TensorInfo) -> bool:
    return len(info.shape) == 2 and any(fnmatch.fnmatchcase(info.name, g) for g in DEFAULT_QUANTIZED)


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
