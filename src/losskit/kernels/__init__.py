"""Fast paths behind losskit.functional, each an autograd.Function checked against the
composed reference code, which stays the oracle. Chosen per call by device, shape and
options; ``reference_only()`` turns them off for a block of code."""

from .cross_entropy import fused_applies, fused_cross_entropy, reference_only

__all__ = ["fused_applies", "fused_cross_entropy", "reference_only"]
