"""Fast paths behind losskit.functional, each checked against the composed reference code,
which stays the oracle. Chosen per call by shape, dtype and options on any device; each is
built by one factory (:class:`~losskit.kernels.fused_op.FusedOp`): an autograd.Function in
eager mode, a custom op (one graph node) under torch.compile. ``reference_only()`` turns
them off for a block of code."""

from .._core.switches import fused_only, reference_only
from .binary_cross_entropy import fused_bce_applies, fused_bce_with_logits
from .cross_entropy import fused_applies, fused_cross_entropy
from .fused_op import Replay, fused_may_serve
from .linear_cross_entropy import auto_chunk_rows, fused_linear_cross_entropy

__all__ = [
    "Replay",
    "auto_chunk_rows",
    "fused_applies",
    "fused_bce_applies",
    "fused_bce_with_logits",
    "fused_cross_entropy",
    "fused_linear_cross_entropy",
    "fused_may_serve",
    "fused_only",
    "reference_only",
]
