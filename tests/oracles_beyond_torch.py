"""Written-out definitions of the losses torch lacks: the oracles of the focal and Poly-1
tests and of their fuzz (torchvision has no CPU wheel here, so its focal loss is written
out line for line)."""

from __future__ import annotations

import torch
import torch.nn.functional as TF

HALF = (torch.float16, torch.bfloat16)


def _reduce(loss: torch.Tensor, reduction: str, count: torch.Tensor | None = None) -> torch.Tensor:
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / (loss.numel() if count is None else count)


def sigmoid_focal_definition(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, line for line."""
    p = torch.sigmoid(inputs)
    ce = TF.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return _reduce(loss, reduction)


def _target_log_probs(input, target, ignore_index):
    class_dim = 0 if input.dim() == 1 else 1
    valid = target != ignore_index
    log_p = input.float().log_softmax(class_dim).to(input.dtype) if input.dtype in HALF else input.log_softmax(
        class_dim)
    picked = log_p.gather(class_dim, target.masked_fill(~valid, 0).unsqueeze(class_dim)).squeeze(class_dim)
    return picked, valid


def softmax_focal_definition(input, target, alpha=None, gamma=2.0, ignore_index=-100, reduction="mean"):
    """Lin et al.'s focal loss on the softmax: -alpha_y (1 - p_y)^gamma log p_y."""
    log_p, valid = _target_log_probs(input, target, ignore_index)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if isinstance(alpha, torch.Tensor):
        loss = alpha[target.masked_fill(~valid, 0)] * loss
    elif alpha is not None:
        loss = alpha * loss
    return _reduce(torch.where(valid, loss, 0.0), reduction, valid.sum())


def poly1_definition(input, target, epsilon=1.0, ignore_index=-100, reduction="mean"):
    """Leng et al.'s Poly-1: -log p_y + epsilon (1 - p_y)."""
    log_p, valid = _target_log_probs(input, target, ignore_index)
    loss = -log_p + epsilon * (1 - log_p.exp())
    return _reduce(torch.where(valid, loss, 0.0), reduction, valid.sum())
