"""Losses over torch.distributed process groups: cross-entropy, linear cross-entropy and
per-token log-probs (and entropy) with the vocabulary sharded across ranks (tensor
parallelism), and cross_entropy of class-sharded DTensors."""

from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from .vocab_parallel_log_probs import vocab_parallel_linear_log_probs, vocab_parallel_linear_log_probs_and_entropy

__all__ = [
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_log_probs",
    "vocab_parallel_linear_log_probs_and_entropy",
]
