"""Quantize to a size, not a type (``--target-bpw``, ``--max-size``): each tensor's type (GGUF, or
compressed-tensors' weight-only schemes) chosen from its measured damage under a byte budget.

Damage of a tensor at a type: the KL divergence per token its quantization error adds to the model's
output, to second order ``1/2 sum F_ij (w_ij - q_ij)^2`` (qtool.calibration.fisher: F the weight's Fisher
diagonal, measured by backward passes over calibration windows), with q a sample of the tensor's rows
quantized by each candidate type as the final pass will (the type's importance-weighted quantizer when
--imatrix / --stats give an importance matrix). The allocation minimizes the total
damage within the budget: every tensor takes the type minimizing damage + lambda * bytes, lambda
bisected to the budget (a Lagrangian relaxation of the knapsack), then the bytes left are spent on the
upgrades that remove the most damage per byte.

Every 2-D tensor the plan quantizes is allocated, for GGUF the embeddings and the output matrix included
(a tied one is measured once, with the Fisher of both its uses); types that need an importance matrix go
only to decoder-block tensors, the ones calibration reaches. Tensors the container needs in one type (the
experts of a merged GGUF tensor; Linears vLLM fuses) are one group: their damages and bytes are summed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from qtool.errors import BadArgument
from qtool.plan import Recipe, Rule, TensorPlan, layer_index

# Rows of each tensor quantized to measure its damage (see fisher_rows).
SAMPLE_ROWS = 256


@dataclass
class Writer:
    """What the output's container tells the sizing: the scheme family to choose from, whether the
    embeddings and the output matrix are sized, and its sink's answers for a planned tensor."""

    family: str
    sizes_embeddings: bool
    packed_nbytes: Callable[[TensorPlan], int]          # bytes it stores for a plan
    overhead_nbytes: Callable[[list[TensorPlan]], int]  # the file's bytes besides the tensors
    fits: Callable[[TensorPlan], bool]                  # stores the plan as planned (no fallback)
    shared_type_groups: Callable[[list[str]], list[list[str]]]


@dataclass
class Option:
    scheme: str
    nbytes: int
    damage: float


@dataclass
class Group:
    """Tensors that take one type together (one tensor, or those the container needs in one type)."""

    key: str
    names: list[str]
    options: list[Option] = field(default_factory=list)   # by size, smallest first


@dataclass
class SizingReport:
    target_bpw: float | None
    max_size: int | None
    budget_bytes: int             # for the allocated tensors
    allocated_bytes: int
    fixed_bytes: int              # quantized tensors outside the allocation (not 2-D)
    predicted_damage: float       # the sum of the chosen types' damages (second-order KL divergence)
    measured: str                 # what the damages were measured with
    choices: dict[str, str]       # allocated tensor -> type


def candidate_types(family: str, importance: bool) -> list[str]:
    """The types of ``family`` to choose from: every registered one of more than 1 and at most 16 bits
    (GGUF's F16 spends what a size leaves once every tensor has 8.5) that quantizes only the weights (a
    scheme whose runtime quantizes the inputs too would add damage the weights' Fisher does not see), and
    those that need an importance matrix only with one."""
    from qtool.schemes.base import all_schemes

    return [name for name, scheme in all_schemes().items()
            if scheme.family == family and 1 < scheme.bits <= 16
            and not scheme.act_strategies and getattr(scheme, "input_args", None) is None and scheme.mixes
            and (importance or not scheme.requires_importance)]


@dataclass
class FisherRows:
    """What the damage of a tensor is measured on: a sample of its rows and their Fisher diagonal, each row
    weighed by the rows it stands for (see fisher_rows), and the Fisher's mean over the whole tensor."""

    rows: torch.Tensor       # row indices
    fisher: torch.Tensor     # (len(rows), columns): the rows' Fisher diagonal times their share
    mean: float


def fisher_rows(fisher: torch.Tensor, count: int = SAMPLE_ROWS) -> FisherRows:
    """Every row when there are few; else the half of ``count`` that carries the most Fisher mass (an
    embedding's frequent tokens) exactly, and the other half spread evenly over the rest, each standing for
    its share of them. Taken as each tensor's Fisher is measured: the full diagonals are not kept."""
    fisher = fisher.reshape(fisher.shape[0], -1)
    rows = fisher.shape[0]
    if rows <= count:
        return FisherRows(torch.arange(rows), fisher.clone(), float(fisher.mean()))
    top = fisher.sum(-1).topk(count // 2).indices
    rest = torch.ones(rows, dtype=torch.bool)
    rest[top] = False
    others = rest.nonzero().squeeze(-1)
    spread = others[torch.linspace(0, len(others) - 1, count - len(top)).round().long()]
    share = torch.cat([torch.ones(len(top)), torch.full((len(spread),), len(others) / len(spread))])
    picked = torch.cat([top, spread])
    return FisherRows(picked, fisher[picked] * share.unsqueeze(-1), float(fisher.mean()))


def damage(weight: torch.Tensor, scheme_name: str, fisher: torch.Tensor, importance: torch.Tensor | None) -> float:
    """1/2 sum F (w - q)^2 of ``weight`` (a row sample) quantized as ``scheme_name`` (with the type's
    importance-weighted quantizer when ``importance`` is given and it has one), F the weight's Fisher
    diagonal: the KL divergence per token the quantized weight adds, to second order."""
    from qtool.schemes.base import get_scheme

    scheme = get_scheme(scheme_name)
    weight = weight.to(torch.float32)
    packed = scheme.quantize(weight, importance=importance) if importance is not None and scheme.takes_importance \
        else scheme.quantize(weight)
    error = (scheme.dequantize(packed) - weight).pow(2)
    return 0.5 * float((fisher.to(torch.float64) * error.to(torch.float64)).sum())


@dataclass
class Weights:
    """What damage is measured with, per weight name: the weight's Fisher diagonal
    (qtool.calibration.fisher), and the importance matrix the final pass quantizes with (None: it rounds
    to nearest), which the types are measured with too."""

    fisher: dict[str, FisherRows]
    importance: dict[str, torch.Tensor] | None
    described: str = ""


def measure(source: Any, plans: list[TensorPlan], weights: Weights, candidates: list[str],
            writer: Writer) -> list[Group]:
    """The options (type, bytes, damage) of every group of the planned 2-D weights. A tensor the
    sensitivity pass did not see (a router asked for, which is no Linear) is weighed by the median of the
    others' mean Fisher values."""
    from qtool import ui
    from qtool.schemes.base import get_scheme

    key = {name: group[0] for group in writer.shared_type_groups([p.name for p in plans]) for name in group}
    groups: dict[str, Group] = {}
    for plan in plans:
        group_name = key.get(plan.name, plan.name)
        groups.setdefault(group_name, Group(group_name, [])).names.append(plan.name)
    shapes = {plan.name: plan.shape for plan in plans}

    def planned(name: str, scheme_name: str) -> TensorPlan:
        return TensorPlan(name, shapes[name], scheme_name)

    typical = float(torch.tensor([v.mean for v in weights.fisher.values()] or [1.0]).median())
    with ui.task("measuring each tensor's damage per type", total=len(groups)) as progress:
        for group in groups.values():
            totals: dict[str, list[float]] = {}
            for name in group.names:
                shape = tuple(shapes[name])
                measured = weights.fisher.get(name)
                if measured is None or measured.fisher[0].numel() * shape[0] != math.prod(shape):
                    measured = fisher_rows(torch.full(shape, typical))
                sample = source.load(name).reshape(shape)[measured.rows]
                fisher = measured.fisher.reshape(sample.shape)
                # The final pass calibrates only decoder-block tensors; the sink rounds the others to nearest.
                inside = weights.importance is not None and layer_index(name) is not None
                importance = weights.importance.get(name) if inside else None
                for scheme_name in candidates:
                    if not writer.fits(planned(name, scheme_name)) or (
                            get_scheme(scheme_name).requires_importance and importance is None):
                        continue
                    entry = totals.setdefault(scheme_name, [0, 0.0])
                    entry[0] += writer.packed_nbytes(planned(name, scheme_name))
                    entry[1] += damage(sample, scheme_name, fisher, importance)
            # A type must fit every tensor of the group.
            options = [Option(s, int(b), d) for s, (b, d) in totals.items()
                       if all(writer.fits(planned(n, s)) for n in group.names)]
            if not options:
                raise BadArgument(f"no {writer.family} type fits {group.key} {list(shapes[group.names[0]])}; "
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
        raise BadArgument(f"the size asked for leaves {max(budget, 0):,} bytes for the decoder-block tensors, and "
                          f"their smallest types take {smallest:,}; ask for more, or --skip some tensors")
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


def _check_room(plans: list[TensorPlan], allocated: set[str], budget: int, writer: Writer,
                types: list[str] | None) -> None:
    """Refuse a budget below the smallest types that fit the allocated tensors (no measuring needed)."""
    import dataclasses

    names = [name for name in candidate_types(writer.family, True) if types is None or name in types]
    smallest = 0
    for plan in plans:
        if plan.name in allocated:
            sizes = [writer.packed_nbytes(candidate) for name in names
                     if writer.fits(candidate := dataclasses.replace(plan, scheme=name))]
            smallest += min(sizes, default=0)
    if smallest > budget:
        raise BadArgument(f"the size asked for leaves {max(budget, 0):,} bytes for the decoder-block tensors, and "
                          f"their smallest types take {smallest:,}; ask for more, or --skip some tensors")


_OUTPUT, _EMBEDDINGS = "lm_head.weight", "model.embed_tokens.weight"


def sized_recipe(plan_with: Any, source: Any, base: Recipe, writer: Writer, *, target_bpw: float | None,
                 max_size: int | None, weights: Any, types: list[str] | None = None) -> tuple[Recipe, SizingReport]:
    """The recipe meeting the size asked for: ``base``'s choices of what to quantize (for GGUF the
    embeddings and the output matrix too), with one rule per quantized tensor naming its type.
    ``plan_with(recipe)`` builds a plan as the pipeline does; ``weights()``: the :class:`Weights` damage is
    measured with (called once the size is checked); ``types``: the only types to choose from (--types)."""
    if (target_bpw is None) == (max_size is None):
        raise BadArgument("pass one of --target-bpw and --max-size")
    known = candidate_types(writer.family, True)
    unknown = [name for name in types or [] if name not in known]
    if unknown:
        raise BadArgument(f"--types {','.join(unknown)}: not a {writer.family} type sizing chooses from; use some "
                          f"of {', '.join(known)}")
    if target_bpw is not None and not (1.0 <= target_bpw <= 16.0):
        raise BadArgument(f"--target-bpw {target_bpw}: choose bits per weight between 1 and 16, e.g. 3.5")
    placeholder = candidate_types(writer.family, False)[-1]
    sized_ends = [Rule(_OUTPUT, placeholder), Rule(_EMBEDDINGS, placeholder)] if writer.sizes_embeddings else []
    plans = plan_with(Recipe(scheme=placeholder, format=base.format, include=base.include, skip=base.skip,
                             rules=sized_ends))
    allocated = {p.name for p in plans if not p.keep and len(p.shape) == 2}
    parameters = sum(math.prod(p.shape) for p in plans if p.name in allocated)
    if not parameters:
        raise BadArgument("nothing to quantize: the plan keeps every tensor")
    fixed_bytes = sum(writer.packed_nbytes(p) for p in plans if not p.keep and p.name not in allocated)
    if target_bpw is not None:
        budget = int(target_bpw * parameters / 8) - fixed_bytes
    else:
        kept_bytes = sum(writer.packed_nbytes(p) for p in plans if p.keep)
        # The plan itself goes into the metadata: a line per allocated tensor.
        plan_text = 300 + sum(len(name) + 40 for name in allocated)
        budget = max_size - fixed_bytes - kept_bytes - writer.overhead_nbytes(plans) - plan_text
    _check_room(plans, allocated, budget, writer, types)      # before the measurement's passes
    measured = weights()
    candidates = [name for name in candidate_types(writer.family, measured.importance is not None)
                  if types is None or name in types]
    groups = measure(source, [p for p in plans if p.name in allocated], measured, candidates, writer)
    chosen = allocate(groups, budget)
    choices = {name: chosen[group.key].scheme for group in groups for name in group.names}
    rules = [Rule(name, scheme) for name, scheme in choices.items()]
    if writer.sizes_embeddings and _EMBEDDINGS in choices and _OUTPUT not in choices:
        rules.insert(0, Rule(_OUTPUT, choices[_EMBEDDINGS]))       # tied: the output matrix is the embeddings
    recipe = Recipe(scheme=placeholder, format=base.format, include=base.include, skip=base.skip, rules=rules,
                    name=f"target-bpw {target_bpw:g}" if target_bpw is not None else f"max-size {max_size:,} bytes")
    report = SizingReport(target_bpw=target_bpw, max_size=max_size, budget_bytes=budget,
                          allocated_bytes=sum(o.nbytes for o in chosen.values()), fixed_bytes=fixed_bytes,
                          predicted_damage=sum(o.damage for o in chosen.values()), measured=measured.described,
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
