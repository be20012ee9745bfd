"""linear_cross_entropy against torch 2.13's F.linear_cross_entropy and the composed reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from losskit.kernels import fused_only, reference_only
from compare import DTYPES, REDUCTIONS, check_against_torch, check_raises

N, H, C = 13, 6, 11

@pytest.fixture(autouse=True)
def fused_float64():
    """float64 normally takes the reference path; here it runs the kernel, so that the
    kernel is held to float64's tight tolerances."""
    with fused_only():
        yield



def inputs(dtype=torch.float64, bias=True, n=N):
    x = torch.randn(n, H, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(C, H, dtype=torch.float64) * 0.7).to(dtype).requires_grad_()
    b = (torch.randn(C, dtype=torch.float64) * 0.3).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, C, (n,))
    target[[2, 7]] = -100
    return x, w, b, target


def composed(x, w, target, **kwargs):
    """The reference: linear, then losskit's cross_entropy, with the fused kernels off."""
    bias = kwargs.pop("linear_bias", None)
    ignore_index = kwargs.pop("ignore_index", None)
    kwargs.pop("chunk_size", None)
    with reference_only():
        return LF.cross_entropy(TF.linear(x, w, bias), target, ignore_index=-100 if ignore_index is None else ignore_index,
                                **kwargs)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize(
    "options",
    [{}, {"weight": True}, {"label_smoothing": 0.15}, {"weight": True, "label_smoothing": 0.1, "ignore_index": 3}],
    ids=["plain", "weight", "smoothing", "all"],
)
def test_matches_torch(options, chunk_size, reduction, dtype, atol, rtol):
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = (torch.rand(C, dtype=torch.float64) + 0.2).to(dtype)
    x, w, b, target = inputs(dtype)
    if "ignore_index" in options:
        target[target == -100] = options["ignore_index"]
    check_against_torch(
        lambda *a, **k: LF.linear_cross_entropy(*a, chunk_size=chunk_size, **k),
        TF.linear_cross_entropy,
        x, w, target, linear_bias=b, reduction=reduction, atol=atol, rtol=rtol, **options,
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_z_loss_and_softcap_match_the_composed_reference(reduction):
    x, w, b, target = inputs()
    for options in ({"lse_square_scale": 1e-2}, {"softcap": 1.5}, {"lse_square_scale": 0.1, "softcap": 2.0, "label_smoothing": 0.1}):
        check_against_torch(LF.linear_cross_entropy, composed, x, w, target, linear_bias=b, reduction=reduction,
                            chunk_size=5, atol=1e-10, rtol=1e-10, **options)


def test_matches_torch_chunked_path_and_accepts_its_options():
    x, w, b, target = inputs(torch.float32)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4)
    check_against_torch(LF.linear_cross_entropy, TF.linear_cross_entropy, x, w, target, linear_bias=b, options=options)


def test_all_targets_ignored():
    x, w, b, _ = inputs(torch.float32)
    target = torch.full((N,), -100)
    for reduction in REDUCTIONS:
        check_against_torch(LF.linear_cross_entropy, TF.linear_cross_entropy, x, w, target, linear_bias=b, reduction=reduction)


def test_frozen_weight_and_no_bias():
    x, w, _, target = inputs(torch.float32, bias=False)
    w = w.detach()  # only the input needs a gradient
    check_against_torch(
        lambda *a: LF.linear_cross_entropy(*a, chunk_size=3), TF.linear_cross_entropy, x, w, target
    )


def test_unbatched_input():
    x = torch.randn(H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, H, dtype=torch.float64, requires_grad=True)
    for reduction in REDUCTIONS:
        check_against_torch(LF.linear_cross_entropy, TF.linear_cross_entropy, x, w, torch.tensor(4), reduction=reduction)


def test_probability_targets_and_k_dimensional_weight_use_the_reference():
    x, w, b, _ = inputs()
    soft = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1)
    check_against_torch(LF.linear_cross_entropy, TF.linear_cross_entropy, x, w, soft, linear_bias=b, label_smoothing=0.1)
    w3 = torch.randn(C, 2, H, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, C, (N, 2))
    check_against_torch(LF.linear_cross_entropy, TF.linear_cross_entropy, x, w3, target, reduction="none")


def test_leading_dimensions_beyond_torch_equal_flattened_tokens():
    x = torch.randn(2, 5, H, dtype=torch.float64)
    w = torch.randn(C, H, dtype=torch.float64)
    target = torch.randint(0, C, (2, 5))
    for reduction in REDUCTIONS:
        got = LF.linear_cross_entropy(x, w, target, reduction=reduction)
        want = LF.linear_cross_entropy(x.reshape(10, H), w, target.reshape(10), reduction=reduction)
        torch.testing.assert_close(got, want.reshape(got.shape))


def test_auto_chunk_follows_the_weight_gradient_size():
    # One (chunk, C) buffer: as many rows as features (so it is the size of the weight
    # gradient), or 64 MiB of float32 logits where that is more, within 16..1024 rows.
    from losskit.kernels.linear_cross_entropy import auto_chunk_rows

    assert auto_chunk_rows(65536, 512) == 512
    assert auto_chunk_rows(4096, 512) == 1024
    assert auto_chunk_rows(32768, 64) == 512
    assert auto_chunk_rows(10**7, 8) == 16


def test_underflowing_target_probability_in_place():
    # The chunk buffer is overwritten by the softmax; rows whose p_y underflows get their
    # lse before that, so the loss stays exact.
    x = torch.zeros(3, 4, dtype=torch.float32)
    x[0, 0] = 1.0
    w = torch.zeros(5, 4)
    w[1, 0] = 300.0
    w.requires_grad_()
    target = torch.tensor([0, 2, 3])
    check_against_torch(LF.linear_cross_entropy, TF.linear_cross_entropy, x, w, target, reduction="none")


def test_bad_input():
    x, w, b, target = inputs(torch.float32)
    check_raises(LF.linear_cross_entropy, x, w[:, :4], target,
                 match="linear_cross_entropy: input has 6 features but linear_weight expects 4")
    check_raises(LF.linear_cross_entropy, x, w, target, linear_bias=torch.zeros(3),
                 match="linear_cross_entropy: linear_bias must have shape (11,); got (3,)")
    bad = target.clone()
    bad[4] = 11
    check_raises(LF.linear_cross_entropy, x, w, bad, error=IndexError,
                 match="linear_cross_entropy: target 11 at index (4,) is out of range for 11 classes")
    check_raises(LF.linear_cross_entropy, x, w, target[:5],
                 match="target shape (5,) does not fit input shape (13, 6); class-index targets must have shape (13,)")
    check_raises(LF.linear_cross_entropy, x, w, torch.softmax(torch.randn(N, C), 1), ignore_index=-100,
                 match="ignore_index cannot be given when target holds class probabilities")
    check_raises(LF.linear_cross_entropy, x, w, target, chunk_size=0, match="chunk_size must be a positive number")
    check_raises(LF.linear_cross_entropy, x, w, target, weight=torch.ones(3), match="one entry per class (11)")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_the_tensor_core_path_on_cpu_matches_float64(dtype, reduction, batch_invariant):
    """The accelerator's path (half operands kept as they are, float32 logits and weight
    gradient, dlogits rounded once), run on the CPU: every option, a bias, an ignored row,
    several chunks, against float64 on the same inputs."""
    from losskit._core import switches

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 32, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(1000, 32, generator=gen) * 0.1).to(dtype).requires_grad_()
    b = (torch.randn(1000, generator=gen) * 0.1).to(dtype).requires_grad_()
    t = torch.randint(0, 1000, (300,), generator=gen)
    t[3] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1, lse_square_scale=1e-3, softcap=20.0)
    with switches.tensor_cores_on_cpu():
        loss = LF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=128, batch_invariant=batch_invariant, **kw)
    grad_out = torch.randn(loss.shape, generator=gen) if reduction == "none" else torch.tensor(1.0)
    grads = torch.autograd.grad(loss, (x, w, b), grad_out.to(dtype))
    x64, w64, b64 = (v.detach().double().requires_grad_() for v in (x, w, b))
    z = TF.linear(x64, w64, b64)
    z = 20.0 * torch.tanh(z / 20.0)
    loss64 = TF.cross_entropy(z, t, reduction="none", label_smoothing=0.1)
    loss64 = loss64 + 1e-3 * torch.where(t != -100, torch.logsumexp(z, 1).square(), 0.0)
    loss64 = loss64.sum() / (t != -100).sum() if reduction == "mean" else loss64
    grads64 = torch.autograd.grad(loss64, (x64, w64, b64), grad_out.double())
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=4e-3, atol=5e-4)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), loss64.detach(), **tol)
    for got, want in zip(grads, grads64):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)
