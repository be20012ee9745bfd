"""Losses over torch.distributed process groups: cross-entropy and linear cross-entropy
with the vocabulary sharded across ranks (tensor parallelism), and cross_entropy of class-sharded DTensors."""

from .vocab_parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
