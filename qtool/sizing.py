"""Quantize to a size, not a type (``--target-bpw``, ``--max-size``): each decoder-block Linear's GGUF type
chosen from its measured damage under a byte budget.

Damage of a tensor at a type: the importance-weighted squared error of its quantized weight,
``sum_c E[x_c^2] * sum_r (w_rc - q_rc)^2``, the expected squared error of the Linear's output on the
calibration inputs (their mean squares: ``--imatrix`` or ``--stats``; without them every column weighs
1), measured by quantizing a sample of the tensor's rows with each candidate type as the final pass
will (the type's importance-weighted quantizer where it has one). The allocation minimizes the total
damage within the budget: every tensor takes the type minimizing damage + lambda * bytes, lambda
bisected to the budget (a Lagrangian relaxation of the knapsack), then the bytes left are spent on the
upgrades that remove the most damage per byte.

Only decoder-block Linears are allocated; the embeddings and the output matrix take fixed types (the
output Q6_K, the embeddings the K-quant nearest the target), their bytes counted against the budget.
The experts of one merged GGUF tensor share one type (their damages and bytes are summed).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from qtool.errors import BadArgument
from qtool.plan import Recipe, Rule, TensorPlan, layer_index

# Rows of each tensor quantized to measure its damage (evenly spaced; scaled to the whole tensor).
SAMPLE_ROWS = 256
# Types the embeddings may take, by precision (the first whose bits reach the target).
_EMBEDDING_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
_OUTPUT_TYPE = "Q6_K"
_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass
class Option:
    scheme: str
    nbytes: int
    damage: float


@dataclass
class Group:
    """Tensors that take one type together (one tensor, or the experts of a merged GGUF tensor)."""

    key: str
    names: list[str]
    options: list[Option] = field(default_factory=list)   # by size, smallest first


@dataclass
class SizingReport:
    target_bpw: float | None
    max_size: int | None
    budget_bytes: int             # for the allocated tensors
    allocated_bytes: int
    fixed_bytes: int              # the quantized tensors outside the allocation (embeddings, output)
    predicted_damage: float
    importance: str               # where the column weights came from
    choices: dict[str, str]       # allocated tensor -> type


def candidate_types(importance: bool) -> list[str]:
    """The GGUF block types to choose from: every registered block type of at most 8.5 bits (those that
    cannot quantize without an importance matrix only when one is given)."""
    from qtool.schemes.base import all_schemes

    return [name for name, scheme in all_schemes().items()
            if scheme.family == "gguf" and (scheme.block_size or 1) > 1 and scheme.bits <= 8.5
            and (importance or not scheme.requires_importance)]


def group_key(name: str) -> str:
    return _EXPERT.sub(".experts.*.", name)


def sample_rows(weight: torch.Tensor, rows: int = SAMPLE_ROWS) -> torch.Tensor:
    if weight.shape[0] <= rows:
        return weight
    return weight[torch.linspace(0, weight.shape[0] - 1, rows).round().long()]


def damage(weight: torch.Tensor, scheme_name: str, importance: torch.Tensor | None) -> float:
    """sum_c importance_c * sum_r (w - q)^2 of ``weight`` (a row sample) quantized as ``scheme_name``, with the
    type's importance-weighted quantizer when it has one and ``importance`` is given."""
    from qtool.schemes.base import get_scheme

    scheme = get_scheme(scheme_name)
    weight = weight.to(torch.float32)
    packed = scheme.quantize(weight, importance=importance) if importance is not None and scheme.takes_importance \
        else scheme.quantize(weight)
    error = (scheme.dequantize(packed) - weight).pow(2).sum(0)
    return float((error * importance).sum() if importance is not None else error.sum())


def measure(source: Any, plans: list[TensorPlan], importance: dict[str, torch.Tensor] | None,
            candidates: list[str]) -> list[Group]:
    """The options (type, bytes, damage) of every allocated group: decoder-block 2-D weights the plan
    quantizes. A tensor without importance values (none collected for it) weighs every column 1."""
    from qtool import ui
    from qtool.schemes.base import get_scheme

    groups: dict[str, Group] = {}
    for plan in plans:
        if plan.keep or layer_index(plan.name) is None or len(plan.shape) != 2:
            continue
        groups.setdefault(group_key(plan.name), Group(group_key(plan.name), [])).names.append(plan.name)
    shapes = {plan.name: plan.shape for plan in plans}
    with ui.task("measuring each tensor's damage per type", total=len(groups)) as progress:
        for group in groups.values():
            totals: dict[str, list[float]] = {}
            for name in group.names:
                shape = shapes[name]
                weight = source.load(name)
                sample = sample_rows(weight.reshape(shape))
                scale = shape[0] / sample.shape[0]
                columns = importance.get(name) if importance is not None else None
                for scheme_name in candidates:
                    scheme = get_scheme(scheme_name)
                    if not scheme.supports(tuple(shape)) or (scheme.requires_importance and columns is None):
                        continue
                    entry = totals.setdefault(scheme_name, [0, 0.0])
                    entry[0] += scheme.nbytes(tuple(shape))
                    entry[1] += damage(sample, scheme_name, columns) * scale
                del weight
            # A type must fit every tensor of the group.
            options = [Option(s, int(b), d) for s, (b, d) in totals.items()
                       if all(get_scheme(s).supports(tuple(shapes[n])) for n in group.names)]
            if not options:
                raise BadArgument(f"no GGUF block type fits {group.key} {list(shapes[group.names[0]])}; "
                                  "keep it with --skip")
            group.options = sorted(options, key=lambda option: (option.nbytes, option.damage))
            progress.advance(1, status=group.key)
    return list(groups.values())


def _pick(group: Group, price: float) -> Option:
    return min(group.options, key=lambda option: (option.damage + price * option.nbytes, option.nbytes))


def allocate(groups: list[Group], budget: int) -> dict[str, Option]:
    """The option of each group minimizing the total damage with total bytes <= ``budget``: the Lagrangian
    choice at the smallest price per byte that fits, then upgrades by damage removed per byte added."""
    smallest = sum(group.options[0].nbytes for group in groups)
    if smallest > budget:
        raise BadArgument(f"the size asked for leaves {budget:,} bytes for the decoder-block tensors, and their "
                          f"smallest types take {smallest:,}; ask for more, or --skip fewer tensors")
    dominated = {id(g): [o for o in g.options if not any(p.nbytes <= o.nbytes and p.damage < o.damage for p in g.options)]
                 for g in groups}
    frontier = [Group(g.key, g.names, dominated[id(g)]) for g in groups]

    def spend(price: float) -> tuple[int, dict[str, Option]]:
        chosen = {g.key: _pick(g, price) for g in frontier}
        return sum(o.nbytes for o in chosen.values()), chosen

    low, high = 0.0, 1.0
    while spend(high)[0] > budget:
        high *= 4
        if high > 1e30:
            break
    if spend(low)[0] <= budget:
        high = low
    for _ in range(100):
        if high - low <= high * 1e-9:
            break
        middle = (low + high) / 2
        if spend(middle)[0] <= budget:
            high = middle
        else:
            low = middle
    used, chosen = spend(high)
    if used > budget:        # the cheapest types alone: always fits (checked above)
        chosen = {g.key: g.options[0] for g in frontier}
        used = sum(o.nbytes for o in chosen.values())
    # Spend what is left: the upgrade removing the most damage per added byte that still fits, repeatedly.
    by_key = {g.key: g for g in frontier}
    while True:
        best, best_rate = None, 0.0
        for key, option in chosen.items():
            for upgrade in by_key[key].options:
                extra = upgrade.nbytes - option.nbytes
                gain = option.damage - upgrade.damage
                if extra > 0 and gain > 0 and used + extra <= budget and gain / extra > best_rate:
                    best, best_rate = (key, upgrade), gain / extra
        if best is None:
            break
        used += best[1].nbytes - chosen[best[0]].nbytes
        chosen[best[0]] = best[1]
    return chosen


def fixed_types(target_bpw: float) -> tuple[str, str]:
    """(output matrix, embeddings) types outside the allocation."""
    from qtool.schemes.base import get_scheme

    embeddings = next((name for name in _EMBEDDING_TYPES if get_scheme(name).bits >= target_bpw), _EMBEDDING_TYPES[-1])
    return _OUTPUT_TYPE, embeddings


def sized_recipe(plan_with: Any, source: Any, base: Recipe, *, target_bpw: float | None, max_size: int | None,
                 importance: dict[str, torch.Tensor] | None, importance_label: str, packed_nbytes: Any,
                 overhead_nbytes: Any) -> tuple[Recipe, SizingReport]:
    """The recipe meeting the size asked for: ``base``'s choices of what to quantize, with one rule per
    allocated tensor naming its type. ``plan_with(recipe)`` builds a plan as the pipeline does;
    ``packed_nbytes(plan)``: the bytes the output's sink stores for a planned tensor;
    ``overhead_nbytes(plans)``: the file's bytes besides the tensors (metadata, vocabulary, padding)."""
    if (target_bpw is None) == (max_size is None):
        raise BadArgument("pass one of --target-bpw and --max-size")
    if target_bpw is not None and not (1.0 <= target_bpw <= 16.0):
        raise BadArgument(f"--target-bpw {target_bpw}: choose bits per weight between 1 and 16, e.g. 3.5")
    def fixed_rules(output: str, embeddings: str) -> list[Rule]:
        return [Rule("lm_head.weight", output), Rule("model.embed_tokens.weight", embeddings)]

    probe = plan_with(Recipe(scheme="Q8_0", format=base.format, include=base.include, skip=base.skip,
                             rules=fixed_rules("Q8_0", "Q8_0")))
    weights = sum(math.prod(p.shape) for p in probe if not p.keep)
    if not weights:
        raise BadArgument("nothing to quantize: the plan keeps every tensor")
    bpw = target_bpw if target_bpw is not None else 8 * max_size / weights
    output_type, embedding_type = fixed_types(bpw)
    rules = fixed_rules(output_type, embedding_type)
    fixed_plans = plan_with(Recipe(scheme="Q8_0", format=base.format, include=base.include, skip=base.skip,
                                   rules=rules))
    allocated = {p.name for p in fixed_plans if not p.keep and layer_index(p.name) is not None and len(p.shape) == 2}
    fixed_bytes = sum(packed_nbytes(p) for p in fixed_plans if not p.keep and p.name not in allocated)
    kept_bytes = sum(packed_nbytes(p) for p in fixed_plans if p.keep)
    if target_bpw is not None:
        budget = int(target_bpw * weights / 8) - fixed_bytes
    else:
        # The plan itself goes into the metadata: a line per allocated tensor.
        plan_text = 300 + sum(len(name) + 40 for name in allocated)
        budget = max_size - fixed_bytes - kept_bytes - overhead_nbytes(fixed_plans) - plan_text
    candidates = candidate_types(importance is not None)
    groups = measure(source, [p for p in fixed_plans if p.name in allocated], importance, candidates)
    chosen = allocate(groups, budget)
    choices = {name: option.scheme for group in groups for name in group.names
               for option in [chosen[group.key]]}
    recipe = Recipe(scheme=embedding_type, format=base.format, include=base.include, skip=base.skip,
                    rules=rules + [Rule(name, scheme) for name, scheme in choices.items()],
                    name=f"target-bpw {target_bpw:g}" if target_bpw is not None else f"max-size {max_size:,} bytes")
    report = SizingReport(target_bpw=target_bpw, max_size=max_size, budget_bytes=budget,
                          allocated_bytes=sum(o.nbytes for o in chosen.values()), fixed_bytes=fixed_bytes,
                          predicted_damage=sum(o.damage for o in chosen.values()), importance=importance_label,
                          choices=choices)
    return recipe, report


def recipe_yaml(recipe: Recipe, description: str) -> str:
    """A preset file holding ``recipe`` (what ``--config`` reads back)."""
    import yaml

    from qtool.atomic import PLAN_MARK

    document: dict[str, Any] = {"description": description, "format": recipe.format, "scheme": recipe.scheme}
    if recipe.include:
        document["include"] = list(recipe.include)
    if recipe.skip:
        document["skip"] = list(recipe.skip)
    document["rules"] = [{"match": rule.match, "scheme": rule.scheme} for rule in recipe.rules]
    return f"{PLAN_MARK.decode()}: --config reads it back\n" + yaml.safe_dump(document, sort_keys=False, width=200)
