"""The accuracy contract (README, "Accuracy"): each fused path's error against float64 on
the same inputs, in roundings of the output dtype (losskit.cli.bench_accuracy.roundings:
|got - exact| / (u |exact| + eta), 1 = one correct rounding), on confident rows, where a
float32 softmax that sums the target with the rest gets 1 - p_y wrong.

    cross_entropy (fused CPU, Triton), vocab-parallel CE, probability targets:
        loss per token and every element of dlogits: <= 2 roundings in bfloat16 and
        float16, <= 64 in float32
    linear_cross_entropy: dh and dW normwise and the loss per token: <= 2 roundings in
        bfloat16 and float16, <= 256 in float32 (the logits' own float32 product)

The oracle is torch's float64 cross-entropy of the very same (rounded) inputs. Vocabularies
up to 131072 (few rows), confidences up to 0.9999, as cut-cross-entropy tests.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import losskit.functional as LF
from losskit._core import switches
from losskit.cli.bench_accuracy import (
    confident_logits, exact_cross_entropy, exact_linear, linear_inputs, norm_roundings, roundings,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BOUND = {torch.float32: 64.0, torch.bfloat16: 2.0, torch.float16: 2.0}
LINEAR_BOUND = {torch.float32: 256.0, torch.bfloat16: 2.0, torch.float16: 2.0}
CONFIDENCES = [0.5, 0.9, 0.999, 0.9999]


def _check(name: str, got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, bound: float) -> None:
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    err = roundings(got, exact, dtype)
    assert err <= bound, f"{name}: {err:.3g} roundings of {dtype} against float64 (contract: {bound})"


def _fused(logits: torch.Tensor, target: torch.Tensor, **options):
    x = logits.clone().requires_grad_()
    LF.cross_entropy(x, target, **options).backward()
    with torch.no_grad():  # the loss-only path
        per_token = LF.cross_entropy(logits, target, reduction="none", **options)
    return per_token, x.grad


def _exact(logits: torch.Tensor, target: torch.Tensor, **options):
    x = logits.double().requires_grad_()
    F.cross_entropy(x, target, **options).backward()
    with torch.no_grad():
        per_token = F.cross_entropy(x, target, reduction="none", **options)
    return per_token, x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("confidence", CONFIDENCES)
@pytest.mark.parametrize("vocab", [1000, 32768])
@pytest.mark.parametrize("wrong", [False, True], ids=["right", "confidently-wrong"])
def test_cross_entropy_fused_cpu(dtype, confidence, vocab, wrong):
    logits, target = confident_logits(6, vocab, confidence, dtype, wrong=wrong)
    loss, grad = _fused(logits, target)
    loss64, grad64 = exact_cross_entropy(logits, target)
    _check("loss", loss, loss64, dtype, BOUND[dtype])
    _check("dlogits", grad, grad64, dtype, BOUND[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("confidence", [0.5, 0.9999])
def test_cross_entropy_131072_classes(dtype, confidence):
    logits, target = confident_logits(2, 131072, confidence, dtype)
    loss, grad = _fused(logits, target)
    loss64, grad64 = exact_cross_entropy(logits, target)
    _check("loss", loss, loss64, dtype, BOUND[dtype])
    _check("dlogits", grad, grad64, dtype, BOUND[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# Not 0.9 under smoothing 0.1: there the target's exact gradient p_y - (1 - eps) - eps / C
# itself nearly vanishes, and no float32 path (torch's included) has its relative precision.
@pytest.mark.parametrize("confidence", [0.5, 0.9999])
@pytest.mark.parametrize("options", [dict(label_smoothing=0.1), dict(weight="w"), dict(ignore_index=3)],
                         ids=["smoothing", "weight", "ignored"])
def test_cross_entropy_options_in_chunks(dtype, confidence, options):
    """Several chunks (the per-chunk path, not the single-chunk plain one), with options."""
    logits, target = confident_logits(12, 4096, confidence, dtype)
    if options.get("weight") == "w":
        options = dict(weight=torch.rand(4096, generator=torch.Generator().manual_seed(1)) + 0.5)
    if "ignore_index" in options:
        target = target.clone()
        target[::4] = options["ignore_index"]
    with switches.chunk_sizes(cross_entropy_bytes=4 * 4096 * 5):
        loss, grad = _fused(logits, target, **options)
    exact_options = dict(options)
    if "weight" in exact_options:
        exact_options["weight"] = exact_options["weight"].double()
    loss64, grad64 = _exact(logits, target, **exact_options)
    _check("loss", loss, loss64, dtype, BOUND[dtype])
    _check("dlogits", grad, grad64, dtype, BOUND[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("confidence", [0.5, 0.999, 0.9999])
def test_probability_targets(dtype, confidence):
    logits, target = confident_logits(6, 4096, confidence, dtype)
    q = (F.one_hot(target, 4096).double() * 0.98 + 0.02 / 4096).to(dtype)
    loss, grad = _fused(logits, q)
    loss64, grad64 = _exact(logits, q.double())
    _check("loss", loss, loss64, dtype, BOUND[dtype])
    _check("dlogits", grad, grad64, dtype, BOUND[dtype])


@pytest.mark.parametrize(("dtype", "tensor_cores"), [(d, False) for d in DTYPES] + [
    (d, True) for d in DTYPES if d != torch.float32], ids=lambda v: str(v).replace("True", "tensor-cores"))
@pytest.mark.parametrize("confidence", [0.5, 0.99, 0.9999])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_linear_cross_entropy(dtype, tensor_cores, confidence, chunk_size):
    """dh and dW normwise (sums over classes and rows), accumulated in float32 whatever the
    number of chunks; the per-token loss elementwise. ``tensor_cores``: the accelerator path
    (half operands, float32 logits and weight gradient, dlogits rounded once to the
    operands' dtype before the backward products), run here on the CPU."""
    h, w, target = linear_inputs(64, 64, 2048, confidence, dtype)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with switches.tensor_cores_on_cpu() if tensor_cores else contextlib.nullcontext():
        LF.linear_cross_entropy(hh, ww, target, chunk_size=chunk_size).backward()
        with torch.no_grad():
            loss = LF.linear_cross_entropy(h, w, target, reduction="none", chunk_size=chunk_size)
    loss64, dh64, dw64 = exact_linear(h, w, target)
    bound = LINEAR_BOUND[dtype]
    _check("loss", loss, loss64, dtype, bound)
    for name, got, exact in (("dh", hh.grad, dh64), ("dW", ww.grad, dw64)):
        assert got.dtype == dtype
        err = norm_roundings(got, exact, dtype)
        assert err <= bound, f"{name}: {err:.3g} roundings (normwise) of {dtype} against float64 (contract: {bound})"


def test_the_measure_counts_one_rounding_as_one():
    """The yardstick itself: rounding float64 values once into each dtype costs <= 1."""
    exact = torch.randn(1000, dtype=torch.float64) * torch.logspace(-30, 3, 1000, dtype=torch.float64)
    for dtype in DTYPES:
        assert roundings(exact.to(dtype), exact, dtype) <= 1.0
        assert roundings((exact * (1 + 4 * torch.finfo(dtype).eps)).to(dtype), exact, dtype) > 2.0


def _vocab_parallel_worker(rank: int, world: int, init_file: str) -> None:
    """Each rank holds half the classes (the target on either half): the sharded losses'
    loss per token, dlogits (its slice) and linear dh, dW against float64."""
    import torch.distributed as dist

    from losskit.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        vocab = 4096
        start, end = rank * vocab // world, (rank + 1) * vocab // world
        for dtype in DTYPES:
            for confidence in (0.5, 0.9999):
                for wrong in (False, True):
                    logits, target = confident_logits(6, vocab, confidence, dtype, wrong=wrong)
                    shard = logits[:, start:end].clone().requires_grad_()
                    vocab_parallel_cross_entropy(shard, target).backward()
                    with torch.no_grad():
                        loss = vocab_parallel_cross_entropy(logits[:, start:end], target, reduction="none")
                    loss64, grad64 = exact_cross_entropy(logits, target)
                    what = f"vocab-parallel rank {rank} p={confidence} wrong={wrong}"
                    _check(what + " loss", loss, loss64, dtype, BOUND[dtype])
                    _check(what + " dlogits", shard.grad, grad64[:, start:end], dtype, BOUND[dtype])
                h, w, target = linear_inputs(32, 32, vocab, confidence, dtype)
                hh, ww = h.clone().requires_grad_(), w[start:end].clone().requires_grad_()
                vocab_parallel_linear_cross_entropy(hh, ww, target, chunk_size=8).backward()
                _, dh64, dw64 = exact_linear(h, w, target)
                for name, got, exact in (("dh", hh.grad, dh64), ("dW", ww.grad, dw64[start:end])):
                    err = norm_roundings(got, exact, dtype)
                    assert err <= LINEAR_BOUND[dtype], f"vocab-parallel linear {name} {dtype}: {err:.3g} roundings"
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_losses():
    import os
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_vocab_parallel_worker, args=(2, os.path.join(tmp, "store")), nprocs=2, join=True)
