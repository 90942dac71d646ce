"""The container registry: one record per quantized-checkpoint layout (GGUF, bitsandbytes,
compressed-tensors), each in its own module here (``gguf.py``, ``bnb.py``, ``compressed.py``).

Everything that needs a container's name or behaviour asks this registry: the output formats
(``--format``, presets), which writer a plan gets (``qtool.sinks.sink_class``), how a quantized
checkpoint is read back (``qtool.sources.quantized``) and recognised (``qtool.inspect``). Adding a
container is adding a module with a ``Container`` subclass; nothing else names it.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from qtool.containers.base import CONTAINERS, Container, InputQuantization, QuantizedWeight, StoredCheckpoint
from qtool.errors import BadArgument

if TYPE_CHECKING:
    from qtool.sinks.base import Sink


def _load() -> None:
    # Importing a module registers its containers; sorted, so the order (messages, defaults) is stable.
    for module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
        if module != "base":
            importlib.import_module(f"{__name__}.{module}")


def all_containers() -> list[type[Container]]:
    _load()
    return list(CONTAINERS.values())


def formats() -> tuple[str, ...]:
    """The output formats, the default one first."""
    containers = sorted(all_containers(), key=lambda container: not container.default)
    return tuple(dict.fromkeys(container.format for container in containers))


def default_format() -> str:
    return formats()[0]


def format_help() -> str:
    """--format's help: the formats and how the default is chosen."""
    picked = [f"{container.format} when {container.scheme_flag} is given"
              + (f" or OUT ends in {container.suffix}" if container.suffix else "")
              for container in all_containers() if container.scheme_flag != "--scheme"]
    return f"{' or '.join(formats())} (default: {'; '.join([*picked, default_format()])})."


def containers_of(fmt: str) -> list[type[Container]]:
    return [container for container in all_containers() if container.format == fmt]


def check_format(fmt: object, what: str = "--format") -> str:
    """``fmt`` when it names an output format; BadArgument naming ``what`` otherwise."""
    if not isinstance(fmt, str) or fmt not in formats():
        raise BadArgument(f"{what} {fmt}: choose one of {', '.join(formats())}")
    return fmt


def format_option(fmt: str, attribute: str):
    """A per-format setting (bits_defaults, scheme_flag, plan_recipe, named_recipe): every container
    of a format gives it alike, so the first one's is the format's."""
    return getattr(containers_of(check_format(fmt))[0], attribute)


def sizing_container(fmt: str) -> type[Container] | None:
    """The container of ``fmt`` that --target-bpw / --max-size write (its ``sizing_family``), or None."""
    return next((container for container in containers_of(check_format(fmt)) if container.sizing_family), None)


def format_for_path(path_suffix: str) -> str | None:
    """The single-file format an output path's suffix names (``.gguf``), or None."""
    for container in all_containers():
        if container.suffix is not None and container.suffix == path_suffix:
            return container.format
    return None


def format_for_flag(flag: str) -> str | None:
    """The format whose encodings the command-line flag (``--type``) names, when only one does."""
    named = {container.format for container in all_containers() if container.scheme_flag == flag}
    return named.pop() if len(named) == 1 else None


def by_quant_method(method: object) -> type[Container] | None:
    """The container that reads checkpoints whose quantization_config has this quant_method."""
    for container in all_containers():
        if container.quant_method is not None and container.quant_method == method:
            return container
    return None


def readable_methods() -> list[str]:
    return [container.quant_method for container in all_containers() if container.quant_method]


def container_for(fmt: str, schemes: set[str]) -> type[Container]:
    """The container of ``fmt`` that stores every one of ``schemes`` (scheme names); BadArgument
    naming the format, its containers and the schemes when none does."""
    from qtool.schemes.base import get_scheme

    candidates = containers_of(check_format(fmt))
    families = {name: get_scheme(name).family for name in schemes}
    strangers = sorted(name for name, family in families.items()
                       if not any(family in container.families for container in candidates))
    if strangers:
        elsewhere = sorted({f"{container.name}: --format {container.format}" for container in all_containers()
                            for name in strangers if families[name] in container.families})
        kinds = ", ".join(container.name for container in candidates)
        raise BadArgument(f"--format {fmt} ({kinds}) does not store {', '.join(strangers)}"
                          + (f" ({'; '.join(elsewhere)})" if elsewhere else "")
                          + f"; give {format_option(fmt, 'scheme_flag')} with an encoding it stores")
    holding = [container for container in candidates if set(families.values()) <= set(container.families)]
    if not holding:
        described = "; ".join(f"{container.name} ({', '.join(sorted(n for n, f in families.items() if f in container.families))})"
                              for container in candidates
                              if any(f in container.families for f in families.values()))
        raise BadArgument(f"one {fmt} output is one container; got {', '.join(sorted(schemes))}: {described} "
                          "cannot be mixed")
    if not families:   # a plan that quantizes nothing: the format's default container
        return next((container for container in holding if container.default), holding[0])
    return holding[0]


def sink_class(fmt: str, schemes: set[str]) -> type[Sink]:
    """The writer of the container of ``fmt`` that stores ``schemes``."""
    return container_for(fmt, schemes).writer()


__all__ = ["Container", "CONTAINERS", "InputQuantization", "QuantizedWeight", "StoredCheckpoint", "all_containers",
           "by_quant_method", "check_format", "container_for", "containers_of", "default_format", "format_for_flag",
           "format_for_path", "format_help", "format_option", "formats", "readable_methods", "sink_class",
           "sizing_container"]
