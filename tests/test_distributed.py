"""losskit.distributed on real gloo process groups (CPU), against the single-process losses.

Each world size spawns its processes once and runs every scenario in them: unequal shards
(one of them empty), vocabularies that do not divide by the world size, targets on every
rank's slice, ignored rows, every option; values and gradients must equal
losskit.functional's on the gathered logits, and the collectives are counted.
"""

from __future__ import annotations

import os
import re
import tempfile
import zlib
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losskit.functional as LF

SPLITS = {2: [7, 4], 4: [3, 0, 5, 3]}  # 11 classes, unequal, one rank with none


def _bounds(world: int, rank: int) -> tuple[int, int]:
    sizes = SPLITS[world]
    return sum(sizes[:rank]), sum(sizes[: rank + 1])


CE_SCENARIOS: list[dict[str, Any]] = [
    {},
    {"reduction": "sum", "weight": "global", "ignored": True, "label_smoothing": 0.1},
    {"reduction": "mean", "weight": "local", "ignored": True, "label_smoothing": 0.2},
    {"reduction": "none", "spatial": True, "label_smoothing": 0.3},
    {"lse_square_scale": 1e-2, "softcap": 5.0, "ignored": True, "weight": "global"},
    {"dtype": torch.bfloat16, "label_smoothing": 0.1},
    {"all_ignored": True},
    {"unbatched": True, "reduction": "none"},
    {"given_bounds": True, "reduction": "sum"},
    {"temperature": 0.7, "label_smoothing": 0.1, "weight": "local", "ignored": True},
]

LCE_SCENARIOS: list[dict[str, Any]] = [
    {},
    {"bias": True, "chunk_size": 3, "ignored": True, "label_smoothing": 0.1, "weight": "global"},
    {"reduction": "none", "sequence": True, "chunk_size": 4},
    {"reduction": "sum", "lse_square_scale": 1e-2, "softcap": 5.0, "weight": "local", "bias": True},
    {"reduction": "none", "temperature": 1.5, "softcap": 4.0, "ignored": True},
]


class Counter:
    """Counts the collectives losskit.distributed makes, forward and backward apart."""

    def __init__(self) -> None:
        import losskit.distributed.vocab_parallel as vp

        self.vp, self.calls = vp, 0
        self.original = vp.all_reduce

        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        vp.all_reduce = counted

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


def _options(scenario: dict[str, Any], world: int, rank: int, num_classes: int, compute) -> tuple[dict, dict]:
    """(kwargs for the single-process loss, kwargs for the sharded one)."""
    start, end = _bounds(world, rank)
    common = {k: scenario[k] for k in ("reduction", "label_smoothing", "lse_square_scale", "softcap", "temperature")
              if k in scenario}
    full, sharded = dict(common), dict(common)
    if "weight" in scenario:
        weight = torch.linspace(0.5, 2.0, num_classes, dtype=compute)
        full["weight"] = weight
        sharded["weight"] = weight if scenario["weight"] == "global" else weight[start:end]
    if scenario.get("given_bounds"):
        sharded.update(vocab_start=start, num_classes=num_classes)
    return full, sharded


def _targets(shape, num_classes: int, scenario: dict[str, Any], gen) -> torch.Tensor:
    target = torch.randint(0, num_classes, shape, generator=gen)
    flat = target.view(-1)
    flat[: min(num_classes, flat.numel())] = torch.arange(min(num_classes, flat.numel()))  # every slice
    if scenario.get("ignored"):
        flat[1::3] = -100
    if scenario.get("all_ignored"):
        flat.fill_(-100)
    return target


def _close(got: torch.Tensor, want: torch.Tensor, what: str, dtype) -> None:
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _check_ce(world: int, rank: int, scenario: dict[str, Any], counter: Counter) -> None:
    from losskit.distributed import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(zlib.crc32(repr(sorted(scenario.items(), key=str)).encode()))  # same on every rank
    num_classes, dtype = 11, scenario.get("dtype", torch.float32)
    shape = (num_classes,) if scenario.get("unbatched") else (6, num_classes, 3) if scenario.get("spatial") else (
        9, num_classes)
    logits = (torch.randn(shape, generator=gen) * 3).to(dtype)
    target_shape = () if scenario.get("unbatched") else (shape[0], *shape[2:])
    target = _targets(target_shape, num_classes, scenario, gen)
    full_kwargs, shard_kwargs = _options(scenario, world, rank, num_classes, torch.float32)
    start, end = _bounds(world, rank)
    class_dim = 0 if len(shape) == 1 else 1

    x = logits.clone().requires_grad_()
    want = LF.cross_entropy(x, target, **full_kwargs)
    grad_out = torch.rand(want.shape, generator=gen) + 0.5
    (want_grad,) = torch.autograd.grad(want, x, grad_out.to(want.dtype))

    shard = logits.narrow(class_dim, start, end - start).clone().requires_grad_()
    counter.take()
    got = vocab_parallel_cross_entropy(shard, target, **shard_kwargs)
    forward_calls = counter.take()
    (got_grad,) = torch.autograd.grad(got, shard, grad_out.to(got.dtype))
    backward_calls = counter.take()

    what = f"rank {rank}/{world} {scenario}"
    assert got.dtype == want.dtype and got.shape == want.shape, what
    _close(got, want, what + " value", dtype)
    _close(got_grad, want_grad.narrow(class_dim, start, end - start), what + " gradient", dtype)
    assert forward_calls == (2 if scenario.get("given_bounds") else 3), f"{what}: {forward_calls} forward collectives"
    assert backward_calls == 0, f"{what}: {backward_calls} backward collectives"


def _check_lce(world: int, rank: int, scenario: dict[str, Any], counter: Counter) -> None:
    from losskit.distributed import vocab_parallel_linear_cross_entropy

    gen = torch.Generator().manual_seed(7)
    num_classes, hidden = 11, 4
    batch = (2, 5) if scenario.get("sequence") else (10,)
    x_full = torch.randn(*batch, hidden, generator=gen)
    w_full = torch.randn(num_classes, hidden, generator=gen)
    b_full = torch.randn(num_classes, generator=gen) if scenario.get("bias") else None
    target = _targets(batch, num_classes, scenario, gen)
    full_kwargs, shard_kwargs = _options(scenario, world, rank, num_classes, torch.float32)
    start, end = _bounds(world, rank)

    leaves = [x_full.clone().requires_grad_(), w_full.clone().requires_grad_()]
    if b_full is not None:
        leaves.append(b_full.clone().requires_grad_())
    want = LF.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2] if b_full is not None else None,
                                   **full_kwargs)
    grad_out = torch.rand(want.shape, generator=gen) + 0.5
    want_grads = torch.autograd.grad(want, leaves, grad_out)

    mine = [x_full.clone().requires_grad_(), w_full[start:end].clone().requires_grad_()]
    if b_full is not None:
        mine.append(b_full[start:end].clone().requires_grad_())
    counter.take()
    got = vocab_parallel_linear_cross_entropy(mine[0], mine[1], target, bias_shard=mine[2] if b_full is not None else None,
                                              chunk_size=scenario.get("chunk_size"), **shard_kwargs)
    forward_calls = counter.take()
    got_grads = torch.autograd.grad(got, mine, grad_out)
    backward_calls = counter.take()

    what = f"rank {rank}/{world} linear {scenario}"
    _close(got, want, what + " value", torch.float32)
    _close(got_grads[0], want_grads[0], what + " input gradient", torch.float32)
    _close(got_grads[1], want_grads[1][start:end], what + " weight gradient", torch.float32)
    if b_full is not None:
        _close(got_grads[2], want_grads[2][start:end], what + " bias gradient", torch.float32)
    # The shard bounds (1), the logsumexp (2), the input's gradient summed over the ranks (1): all in forward for
    # a scalar loss; reduction='none' makes the gradients in backward, repeating the first three.
    expected = (3, 4) if scenario.get("reduction") == "none" else (4, 0)
    assert (forward_calls, backward_calls) == expected, f"{what}: {forward_calls} + {backward_calls} collectives"


def _check_dtensor(world: int, rank: int, counter: Counter) -> None:
    """losskit.functional.cross_entropy of a DTensor sharded on classes: no gather."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")  # the world group itself, no new one
    gen = torch.Generator().manual_seed(3)
    logits, target = torch.randn(9, 11, generator=gen), torch.randint(0, 11, (9,), generator=gen)
    target[::4] = -100
    for options in ({}, {"label_smoothing": 0.1, "lse_square_scale": 1e-2, "softcap": 5.0, "reduction": "sum",
                         "weight": torch.linspace(0.5, 2.0, 11)}):
        x = logits.clone().requires_grad_()
        want = LF.cross_entropy(x, target, **options)
        (want_grad,) = torch.autograd.grad(want, x)
        sharded = distribute_tensor(logits.clone(), mesh, [Shard(1)]).requires_grad_()
        counter.take()
        got = LF.cross_entropy(sharded, target, **options)
        assert counter.take() == 2, "DTensor: the shard bounds come from its placement, two all-reduces"
        (got_grad,) = torch.autograd.grad(got, sharded)
        assert counter.take() == 0
        assert isinstance(got_grad, DTensor) and got_grad.placements == sharded.placements
        _close(got, want, f"rank {rank}/{world} DTensor {options} value", torch.float32)
        _close(got_grad.full_tensor(), want_grad, f"rank {rank}/{world} DTensor {options} gradient", torch.float32)


def _check_compiled(world: int, rank: int) -> None:
    """Both losses under torch.compile(fullgraph=True) over the gloo group, with and without
    the slice bounds: one graph (a graph break would raise), eager's values and gradients."""
    from losskit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    start, end = _bounds(world, rank)
    logits, target = torch.randn(9, 11, generator=gen), torch.randint(0, 11, (9,), generator=gen)
    target[::4] = -100
    hidden, head = torch.randn(9, 4, generator=gen), torch.randn(11, 4, generator=gen)[start:end]
    options = {"label_smoothing": 0.1, "temperature": 0.8, "softcap": 6.0}

    def ce(shard, bounds):
        return vocab_parallel_cross_entropy(shard, target, **bounds, **options)

    def lce(x, w, bounds):
        return vocab_parallel_linear_cross_entropy(x, w, target, chunk_size=4, **bounds, **options)

    for bounds in ({}, {"vocab_start": start, "num_classes": 11}):
        for fn, inputs in ((ce, [logits[:, start:end]]), (lce, [hidden, head])):
            eager_leaves = [t.clone().requires_grad_() for t in inputs]
            want = fn(*eager_leaves, bounds)
            want_grads = torch.autograd.grad(want, eager_leaves)
            leaves = [t.clone().requires_grad_() for t in inputs]
            got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves, bounds)
            got_grads = torch.autograd.grad(got, leaves)
            what = f"rank {rank}/{world} compiled {fn.__name__} {bounds}"
            _close(got, want, what + " value", torch.float32)
            for g, w in zip(got_grads, want_grads):
                _close(g, w, what + " gradient", torch.float32)


def _check_errors(world: int, rank: int) -> None:
    """Bad input raises the same clear error on every rank, before any rank waits on another."""
    from losskit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    start, end = _bounds(world, rank)
    shard = torch.randn(4, end - start)
    cases = [
        (lambda: vocab_parallel_cross_entropy(shard, torch.tensor([0, 1, 11, 2])), IndexError,
         "target 11 at index (2,) is out of range for 11 classes"),
        (lambda: vocab_parallel_cross_entropy(shard, torch.tensor([0, 1, 2])), ValueError,
         "target shape (3,) does not fit logits shard shape"),
        (lambda: vocab_parallel_cross_entropy(shard, torch.zeros(4)), TypeError, "target must hold class indices"),
        (lambda: vocab_parallel_cross_entropy(shard, torch.tensor([0, 1, 2, 3]), weight=torch.ones(13)), ValueError,
         "weight must have one entry per class, either all 11 or this rank's"),
        (lambda: vocab_parallel_cross_entropy(shard, torch.tensor([0, 1, 2, 3]), vocab_start=9, num_classes=11),
         ValueError, "do not lie in the 11 classes"),
        (lambda: vocab_parallel_cross_entropy(shard, torch.tensor([0, 1, 2, 3]), label_smoothing=1.5), ValueError,
         "vocab_parallel_cross_entropy: label_smoothing must be between 0.0 and 1.0; got 1.5"),
        (lambda: vocab_parallel_cross_entropy(shard, torch.tensor([0, 1, 2, 3]), temperature=0.0), ValueError,
         "vocab_parallel_cross_entropy: temperature must be a positive, finite number; got 0.0"),
        (lambda: vocab_parallel_linear_cross_entropy(torch.randn(4, 3), torch.randn(end - start, 5),
                                                     torch.tensor([0, 1, 2, 3])), ValueError,
         "weight_shard must be (C_r, H) with H = input's last dimension (3)"),
    ]
    for call, kind, message in cases:
        if "do not lie" in message and end - start < 3:
            continue  # [9, 9 + size) fits: only the wider slices overflow
        with pytest.raises(kind, match=re.escape(message)):
            call()


def _worker(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        counter = Counter()
        for scenario in CE_SCENARIOS:
            _check_ce(world, rank, scenario, counter)
        for scenario in LCE_SCENARIOS:
            _check_lce(world, rank, scenario, counter)
        _check_dtensor(world, rank, counter)
        _check_errors(world, rank)
        if world == 2:
            _check_compiled(world, rank)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_equals_the_single_process_loss(world):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "store")), nprocs=world, join=True)


def test_the_example_trains_in_step_with_a_single_process():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "vocab_parallel.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(example)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 4]
    assert len(steps) == 15
    losses = [(float(a), float(b)) for _, a, b, _ in steps]
    assert all(abs(a - b) < 1e-4 for a, b in losses), losses
    assert losses[-1][0] < losses[0][0]  # it learns
    assert "shards and the single-process output layer" in done.stdout
