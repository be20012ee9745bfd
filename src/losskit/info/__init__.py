"""Information theory on discrete distributions, in nats or any base."""

from .measures import cross_entropy, entropy, js_divergence, kl_divergence

__all__ = ["cross_entropy", "entropy", "js_divergence", "kl_divergence"]
