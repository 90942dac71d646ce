"""What the numerics raise when a weight cannot be stored. A leaf module (it imports nothing of
qtool): the schemes, the kernels (qtool/kernels/) and the sinks all raise or catch these."""
from __future__ import annotations


class NonFiniteWeight(ValueError):
    """The weight holds inf or nan. Schemes find it through their reductions (absmax, min/max),
    which propagate both, instead of a separate pass over the weight."""


class ScaleOverflow(ValueError):
    """A finite weight whose block scale (an fp16 field of the block) would be inf: the block
    cannot hold it. Raised instead of writing a block that dequantizes to inf or NaN."""
