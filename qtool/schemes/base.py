"""Scheme registry. A scheme is numerics only: pure torch, any device, no I/O, no printing.

Each scheme family lives in one module (int8.py, int4.py, nf4.py, ggml.py) and registers its
schemes by name with ``@register``; the CLI's ``--scheme`` / ``--type`` choices come from
``SCHEMES``, never from a second list.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from qtool.errors import BadArgument


class Scheme(ABC):
    name: ClassVar[str]           # "nf4", "int8-sym", "Q4_K", ...
    family: ClassVar[str]         # which sink writes it: "bnb", "compressed" or "gguf"
    bits: ClassVar[float]         # nominal bits per weight, for plans and reports
    # The recipe params quantize() reads (their checks: qtool.plan.PARAM_CHECKS); others are refused.
    params: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def quantize(self, weight: torch.Tensor, **params: Any) -> Any:
        """Packed representation of ``weight`` (a family-specific dataclass of tensors)."""

    @abstractmethod
    def dequantize(self, packed: Any) -> torch.Tensor:
        """Float tensor with the original shape."""


SCHEMES: dict[str, Scheme] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    SCHEMES[cls.name] = cls()
    return cls


def get_scheme(name: str) -> Scheme:
    _load_families()
    try:
        return SCHEMES[name]
    except KeyError:
        raise BadArgument(f"unknown scheme {name!r}; choose one of: {', '.join(sorted(SCHEMES))}") from None


def all_schemes() -> dict[str, Scheme]:
    _load_families()
    return dict(SCHEMES)


def _load_families() -> None:
    # Importing a family module registers its schemes.
    import importlib

    for module in ("int8", "int4", "nf4", "ggml"):
        try:
            importlib.import_module(f"qtool.schemes.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"qtool.schemes.{module}":
                raise
