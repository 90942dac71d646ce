"""Which sink writes which output: chosen from the format and the plan's scheme families."""
from __future__ import annotations

import importlib

from qtool.errors import BadArgument
from qtool.schemes.base import get_scheme
from qtool.sinks.base import Sink

# family -> (module, class) for safetensors outputs; GGUF has one sink for every block type.
_SAFETENSORS_SINKS = {"bnb": ("qtool.sinks.bnb", "BnbSink"), "compressed": ("qtool.sinks.compressed", "CompressedSink")}
_GGUF_SINK = ("qtool.sinks.gguf", "GGUFSink")


def sink_class(fmt: str, schemes: set[str]) -> type[Sink]:
    families = {get_scheme(name).family for name in schemes}
    if fmt == "gguf":
        wrong = sorted(name for name in schemes if get_scheme(name).family != "gguf")
        if wrong:
            raise BadArgument(f"--format gguf stores GGML block types only, not {', '.join(wrong)}; "
                              "use --type Q4_K_M (or another GGUF type)")
        module, name = _GGUF_SINK
    else:
        if "gguf" in families:
            raise BadArgument("GGML block types need --format gguf")
        if len(families) > 1:
            raise BadArgument(f"one safetensors output holds one scheme family; got {', '.join(sorted(schemes))}: "
                              "bitsandbytes (nf4, fp4, int8-sym) and compressed-tensors (int8-asym, int4-*) "
                              "cannot be mixed")
        family = families.pop() if families else "bnb"
        module, name = _SAFETENSORS_SINKS[family]
    return getattr(importlib.import_module(module), name)
