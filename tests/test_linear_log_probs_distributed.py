"""losskit.distributed.vocab_parallel_linear_log_probs(_and_entropy) on a real gloo group of
two CPU processes, against losskit.functional's single-process form on the concatenated
output layer (itself tested against torch in tests/test_linear_log_probs.py): values,
gradients of input, weight shard and bias shard under arbitrary upstream gradients, the
collectives counted, and the compiled op (fullgraph=True)."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losskit.functional as LF

NUM_CLASSES = 12  # 7 on rank 0 and 5 on rank 1, or (empty_shard) all 12 on rank 0 and none on rank 1

SCENARIOS: list[dict[str, Any]] = [
    {},
    {"bias": True, "ignored": True, "temperature": 0.7, "chunk_size": 3},
    {"sequence": True, "only": "entropy"},
    {"only": "log_p", "given_bounds": True, "bias": True},
    {"confident": True},  # a target at p ~ 0.9999, on either rank
    {"empty_shard": True, "ignored": True},
    {"all_ignored": True},
    {"batch_invariant": True, "bias": True},
]


def _bounds(rank: int, scenario: dict[str, Any]) -> tuple[int, int]:
    sizes = [NUM_CLASSES, 0] if scenario.get("empty_shard") else [7, 5]
    return sum(sizes[:rank]), sum(sizes[: rank + 1])


class Counter:
    """Counts the collectives of the log-prob op (the all-gather and the all-reduces)."""

    def __init__(self) -> None:
        import losskit.distributed.vocab_parallel as vp
        import losskit.distributed.vocab_parallel_log_probs as vlp

        self.calls = 0
        gather, reduce = vlp.all_gather, vlp.all_reduce

        def counted_gather(*args, **kwargs):
            self.calls += 1
            return gather(*args, **kwargs)

        def counted_reduce(*args, **kwargs):
            self.calls += 1
            return reduce(*args, **kwargs)

        vlp.all_gather, vlp.all_reduce, vp.all_reduce = counted_gather, counted_reduce, counted_reduce

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _inputs(scenario: dict[str, Any]):
    gen = torch.Generator().manual_seed(5)  # the same on every rank
    batch = (2, 5) if scenario.get("sequence") else (9,)
    x = torch.randn(*batch, 4, generator=gen)
    w = torch.randn(NUM_CLASSES, 4, generator=gen)
    b = torch.randn(NUM_CLASSES, generator=gen) if scenario.get("bias") else None
    target = torch.randint(0, NUM_CLASSES, batch, generator=gen)
    flat = target.view(-1)
    flat[:NUM_CLASSES] = torch.arange(min(NUM_CLASSES, flat.numel()))[: flat.numel()]
    if scenario.get("confident"):
        # Classes 2 (rank 0) and 9 (rank 1) take turns to dominate, at p up to 1 - 1e-6.
        w = w * 0.1
        w[2], w[9] = torch.tensor([4.0, 4.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 4.0, 4.0])
        x = x.abs() + 1.0
        flat[::2], flat[1::2] = 2, 9
    if scenario.get("ignored"):
        flat[1::3] = -100
    if scenario.get("all_ignored"):
        flat.fill_(-100)
    upstream = (torch.randn(batch, generator=gen), torch.randn(batch, generator=gen))
    return x, w, b, target, upstream


def _loss(log_p, entropy, upstream, only):
    g, h = upstream
    if only == "log_p":
        return (log_p * g).sum()
    if only == "entropy":
        return (entropy * h).sum()
    return (log_p * g).sum() + (entropy * h).sum()


def _check(rank: int, scenario: dict[str, Any], counter: Counter) -> None:
    from losskit.distributed import vocab_parallel_linear_log_probs, vocab_parallel_linear_log_probs_and_entropy

    x, w, b, target, upstream = _inputs(scenario)
    start, end = _bounds(rank, scenario)
    options = {k: scenario[k] for k in ("temperature", "chunk_size", "batch_invariant") if k in scenario}
    only = scenario.get("only")

    full = [x.clone().requires_grad_(), w.clone().requires_grad_()] + ([b.clone().requires_grad_()] if b is not None
                                                                        else [])
    want = LF.linear_log_probs_and_entropy(full[0], full[1], target, full[2] if b is not None else None, **options)
    want_grads = torch.autograd.grad(_loss(*want, upstream, only), full)

    mine = [x.clone().requires_grad_(), w[start:end].clone().requires_grad_()] + (
        [b[start:end].clone().requires_grad_()] if b is not None else [])
    if scenario.get("given_bounds"):
        options.update(vocab_start=start, num_classes=NUM_CLASSES)
    counter.take()
    got = vocab_parallel_linear_log_probs_and_entropy(mine[0], mine[1], target, mine[2] if b is not None else None,
                                                      **options)
    forward_calls = counter.take()
    got_grads = torch.autograd.grad(_loss(*got, upstream, only), mine)
    backward_calls = counter.take()

    what = f"rank {rank} {scenario}"
    names = ("log_p", "entropy", "input gradient", "weight gradient", "bias gradient")
    wants = [*want, want_grads[0], want_grads[1][start:end], *([want_grads[2][start:end]] if b is not None else [])]
    for name, g_, w_ in zip(names, [*got, *got_grads], wants):
        assert g_.shape == w_.shape and g_.dtype == w_.dtype, f"{what} {name}"
        torch.testing.assert_close(g_, w_, atol=2e-5, rtol=2e-5, msg=lambda m, n=name: f"{what} {n}: {m}")
    bounds = 0 if scenario.get("given_bounds") else 1
    assert (forward_calls, backward_calls) == (1 + bounds, 1 + bounds), f"{what}: {forward_calls}, {backward_calls}"

    alone = vocab_parallel_linear_log_probs(x, w[start:end], target, b[start:end] if b is not None else None,
                                            **options)
    assert torch.equal(alone, got[0].detach()), f"{what}: log-probs alone differ from the pair's"


def _check_compiled(rank: int) -> None:
    from losskit.distributed import vocab_parallel_linear_log_probs_and_entropy

    torch._dynamo.reset()
    x, w, b, target, upstream = _inputs({"ignored": True, "bias": True})
    start, end = _bounds(rank, {})
    target = target.clone()

    def fn(x, w, b):
        return _loss(*vocab_parallel_linear_log_probs_and_entropy(x, w, target, b, temperature=0.9, chunk_size=4),
                     upstream, None)

    inputs = [x, w[start:end], b[start:end]]
    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    want = fn(*eager_leaves)
    want_grads = torch.autograd.grad(want, eager_leaves)
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g, w_ in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w_, atol=1e-6, rtol=1e-6)


def _check_errors(rank: int) -> None:
    from losskit.distributed import vocab_parallel_linear_log_probs

    start, end = _bounds(rank, {})
    x, shard = torch.randn(4, 3), torch.randn(end - start, 3)
    cases = [
        (lambda: vocab_parallel_linear_log_probs(x, shard, torch.tensor([0, 1, 12, 2])), IndexError,
         "target 12 at index (2,) is out of range for 12 classes"),
        (lambda: vocab_parallel_linear_log_probs(x, shard, torch.zeros(4)), TypeError,
         "target must hold class indices"),
        (lambda: vocab_parallel_linear_log_probs(x, torch.randn(end - start, 5), torch.zeros(4, dtype=torch.long)),
         ValueError, "weight_shard must be [C_r, H] with H = input's last dimension (3)"),
        (lambda: vocab_parallel_linear_log_probs(x, shard, torch.zeros(3, dtype=torch.long)), ValueError,
         "target shape (3,) must be input's without H"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=re.escape(message)):
            call()


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        counter = Counter()
        for scenario in SCENARIOS:
            _check(rank, scenario, counter)
        _check_errors(rank)
        _check_compiled(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_log_probs_equal_the_single_process_ones():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)
