"""Fast paths behind losskit.functional, each checked against the composed reference code,
which stays the oracle. Chosen per call by shape, dtype and options on any device: an
autograd.Function in eager mode, a custom op (one graph node) under torch.compile.
``reference_only()`` turns them off for a block of code."""

from .common import reference_only
from .cross_entropy import fused_applies, fused_cross_entropy

__all__ = ["fused_applies", "fused_cross_entropy", "reference_only"]
