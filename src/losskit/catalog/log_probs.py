"""Catalog: per-token log-probabilities of a linear output layer (post-training). For the
entry, its example, mistakes and curve as functions, then the Entry; nothing runs at import
(see :mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F

from .records import Curve, Entry, Mistake


# ---- linear log-probs -------------------------------------------------------------------------
def linear_log_probs_example():
    hidden = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # two tokens, H = 2
    head = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # C = 3 classes
    return F.linear_log_probs(hidden, head, torch.tensor([0, 2]))  # log softmax([2, 0, 0])[0], ...[0, 1, 0])[2]


def linear_log_probs_mistake_padding_counted():
    hidden, head = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 0.0], [0.0, 0.0]]), torch.eye(2)
    tokens = torch.tensor([0, 1, 0, 0])  # the last two are padding, given token id 0
    masked = torch.tensor([0, 1, -100, -100])
    return {
        'sum of log-probs, padding counted': F.linear_log_probs(hidden, head, tokens).sum().item(),
        'sum of log-probs, padding at -100': F.linear_log_probs(hidden, head, masked).sum().item(),
    }


def linear_log_probs_mistake_unshifted_targets():
    tokens = torch.tensor([2, 0, 3, 1])
    head = torch.eye(4)
    hidden = 5.0 * head[tokens[1:]]  # a model whose state at t predicts token t + 1
    return {
        'mean log p, target = next token': F.linear_log_probs(hidden, head, tokens[1:]).mean().item(),
        'mean log p, target = same position': F.linear_log_probs(hidden, head, tokens[:-1]).mean().item(),
    }


def linear_log_probs_mistake_temperature_mismatch():
    hidden, head = torch.tensor([[1.0, 0.5], [0.2, 1.5]]), torch.eye(2)
    sampled = torch.tensor([0, 1])  # drawn at temperature 0.7
    at_sampler = F.linear_log_probs(hidden, head, sampled, temperature=0.7)
    at_one = F.linear_log_probs(hidden, head, sampled)
    return {
        'log p at T = 0.7 (the sampler)': at_sampler.sum().item(),
        'log p at T = 1': at_one.sum().item(),
        'importance ratio of unchanged weights': (at_one - at_sampler).exp().prod().item(),
    }


def linear_log_probs_curve(x, temperature=1.0):
    # One token, three classes with logits (x, 0, 0): the negative log-prob of class 0.
    head = torch.tensor([[1.0], [0.0], [0.0]], dtype=x.dtype)
    target = torch.zeros(len(x), dtype=torch.long)
    return -F.linear_log_probs(x.unsqueeze(1), head, target, temperature=temperature)


LINEAR_LOG_PROBS = Entry(
    key="linear_log_probs", title="Per-token log-probabilities (and entropy) of a linear head",
    family="posttraining",
    problems=("RL fine-tuning of language models (GRPO, PPO)", "preference optimisation (DPO and relatives)",
              "distillation and evaluation: sequence log-likelihoods"),
    covers=("functional.linear_log_probs", "functional.linear_log_probs_and_entropy"),
    torch=(), keras=(), aliases=("log_probs", "selective_log_softmax", "token_log_probs", "logprobs"),
    prediction="hidden states [..., H] and the output layer's weight [C, H] (bias [C]): never the logits",
    target="the token ids whose log-probability is wanted, shaped like the hidden states without H; "
           "ignore_index (-100) for padding and prompt",
    output_layer="the language model's head, given as its weight",
    formula=r"\log p(y_i \mid x_i) = z_{i,y_i} - \log \sum_c e^{z_{i,c}},\quad "
            r"H_i = -\sum_c p_{i,c} \log p_{i,c},\quad z_i = (W x_i + b) / T",
    formula_text="log p_y = z_y - logsumexp(z), entropy = -sum_c p_c log p_c, z = (W x + b) / T",
    summary="What the post-training losses need of a model: each token's log-probability (and the "
            "entropy of its distribution), from the hidden states and the head, without the "
            "[tokens x vocabulary] logits.",
    properties={"convex": "log p_y is concave in the logits (its negative, the cross-entropy, is convex)",
                "bounded": "log p_y <= 0; entropy between 0 and log C",
                "robust to outliers": "not a loss by itself: the loss built on it decides"},
    options={"bias": "the head's bias [C], or None",
             "temperature": "divide the logits by T, as the sampler did (GRPO's importance ratios need the same T)",
             "ignore_index": "target value of the tokens that count for nothing: log-prob 0, entropy 0, no gradient",
             "chunk_size": "tokens whose logits are formed at a time (memory against speed)",
             "batch_invariant": "beyond the contract: bitwise the same result for a token alone or in any "
                                "batch, at some speed"},
    example=linear_log_probs_example,
    mistakes=(
        Mistake("Padding counted as tokens",
                "Padding positions carry a real token id (often 0 or eos) unless marked: their log-probs are "
                "added to the sequence's and their gradients train the model to predict padding. Mark them "
                "with ignore_index (-100): their log-prob is then exactly 0 and they pass no gradient.",
                linear_log_probs_mistake_padding_counted),
        Mistake("Targets not shifted",
                "The hidden state at position t predicts the token at t + 1: pair hidden[:, :-1] with "
                "input_ids[:, 1:]. Unshifted, each position is asked for the token it has just read, and the "
                "log-probs come out far too low (or, for a model that copies, meaninglessly high).",
                linear_log_probs_mistake_unshifted_targets),
        Mistake("A temperature that is not the sampler's",
                "Policy-gradient losses compare the log-probs of sampled tokens with those of the policy that "
                "sampled them. Sampled at T = 0.7 and scored at T = 1, the ratio of two identical policies is "
                "not 1: pass the sampler's temperature.",
                linear_log_probs_mistake_temperature_mismatch),
    ),
    curve=Curve(linear_log_probs_curve, "target logit x (other logits 0, C = 3)", (-6.0, 6.0),
                variants=({"temperature": 1.0}, {"temperature": 0.5})),
    notes=("Forward forms the logits a chunk of tokens at a time and keeps five numbers per token; backward "
           "forms each chunk again (one more matmul), so memory does not grow with the vocabulary times the "
           "tokens. Any upstream gradient works, for either output.",
           "losskit.distributed.vocab_parallel_linear_log_probs(_and_entropy) does the same with the head "
           "sharded by vocabulary over a process group."),
)

ENTRIES = [LINEAR_LOG_PROBS]
