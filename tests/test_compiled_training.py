"""Whole training steps (forward, backward, optimizer) compiled with torch.compile give
eager's losses and parameters, with the cross-entropy and linear cross-entropy Modules."""

from __future__ import annotations

import torch

import losskit.nn as lnn


def _train(params, loss_of, batches, compiled: bool):
    """Three SGD steps of ``loss_of(x, y)`` over ``params``, eager or compiled whole."""
    opt = torch.optim.SGD(params, lr=0.1)

    def step(x, y):
        opt.zero_grad()
        loss = loss_of(x, y)
        loss.backward()
        return loss

    step_fn = torch.compile(step) if compiled else step
    losses = [float(step_fn(x, y).detach()) for x, y in batches]
    return losses, [p.detach().clone() for p in params]


def test_compiled_training_step_with_cross_entropy_loss_matches_eager():
    torch._dynamo.reset()
    batches = [(torch.randn(16, 8), torch.randint(0, 5, (16,))) for _ in range(3)]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 5)
        loss_fn = lnn.CrossEntropyLoss(label_smoothing=0.1)
        results.append(_train(list(model.parameters()), lambda x, y: loss_fn(model(x), y), batches, compiled))
    torch.testing.assert_close(results[0], results[1])
    explained = torch._dynamo.explain(lambda x, y: lnn.CrossEntropyLoss()(x, y))(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert explained.graph_break_count == 0


def test_compiled_training_step_with_linear_cross_entropy_loss_matches_eager():
    torch._dynamo.reset()
    batches = [(torch.randn(16, 8), torch.randint(0, 50, (16,))) for _ in range(3)]
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        body = torch.nn.Linear(8, 8)
        head = lnn.LinearCrossEntropyLoss(8, 50, chunk_size=5)
        params = list(body.parameters()) + list(head.parameters())
        results.append(_train(params, lambda x, y: head(torch.tanh(body(x)), y), batches, compiled))
    torch.testing.assert_close(results[0], results[1])
