"""The Triton kernels, run on CPU through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py), against losskit's reference path, torch, and float64.

On a machine with a GPU the same tests run the compiled kernels on CUDA tensors.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as TF

pytest.importorskip("triton")

import losskit.functional as LF  # noqa: E402
from losskit.kernels import triton_support  # noqa: E402
from losskit.kernels import reference_only  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_serves():
    """Route CPU tensors to the kernels (the interpreter), and count the launches."""
    import losskit.kernels.triton_binary_cross_entropy as bce_kernel
    import losskit.kernels.triton_cross_entropy as ce_kernel

    counts = {"ce": 0, "bce": 0}
    ce_launch, bce_launch = ce_kernel.cross_entropy_rows, bce_kernel.bce_with_logits

    def ce(*args, **kwargs):
        counts["ce"] += 1
        return ce_launch(*args, **kwargs)

    def bce(*args, **kwargs):
        counts["bce"] += 1
        return bce_launch(*args, **kwargs)

    ce_kernel.cross_entropy_rows, bce_kernel.bce_with_logits = ce, bce
    context = triton_support.on_cpu() if DEVICE == "cpu" else warnings.catch_warnings()
    with context, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on masked lanes
        yield counts
    ce_kernel.cross_entropy_rows, bce_kernel.bce_with_logits = ce_launch, bce_launch


def _grads(fn, leaves, grad_output=None):
    loss = fn(*leaves)
    if grad_output is None:
        grad_output = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(loss.dtype) + 2
    grad_output = grad_output.to(loss.device)  # drawn on the CPU, the same numbers on every device
    return loss, torch.autograd.grad(loss, leaves, grad_output), grad_output


def _reference(fn, leaves, grad_output):
    with reference_only():
        loss = fn(*leaves)
        return loss, torch.autograd.grad(loss, leaves, grad_output.to(loss.device))


def _leaf(t):
    return t.to(DEVICE).detach().requires_grad_()


CE_OPTIONS = [
    {},
    {"reduction": "none"},
    {"reduction": "sum", "label_smoothing": 0.2},
    {"weight": "w", "label_smoothing": 0.1, "ignore_index": 3},
    {"lse_square_scale": 1e-2, "softcap": 4.0},
    {"weight": "w", "reduction": "none", "lse_square_scale": 1e-3, "label_smoothing": 0.3},
]


@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(7, 2500), (1, 5), (33, 130)])  # 2500 spans three 1024-blocks
def test_cross_entropy_kernel_equals_the_reference_and_torch(options, shape, _triton_serves):
    n, c = shape
    gen = torch.Generator().manual_seed(n * c)
    options = {k: (torch.rand(c, generator=gen) + 0.5).to(DEVICE) if v == "w" else v for k, v in options.items()}
    x = _leaf(torch.randn(n, c, generator=gen) * 4)
    target = torch.randint(0, c, (n,), generator=gen).to(DEVICE)
    target[::3] = options.get("ignore_index", -100)
    loss, (grad,), g = _grads(lambda a: LF.cross_entropy(a, target, **options), [x])
    assert _triton_serves["ce"] == 1
    want, (want_grad,) = _reference(lambda a: LF.cross_entropy(a, target, **options), [x], g)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5, equal_nan=True)  # all ignored: nan, as torch
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)
    if "lse_square_scale" not in options and "softcap" not in options:
        torch.testing.assert_close(loss, TF.cross_entropy(x, target, **options), atol=1e-5, rtol=1e-5, equal_nan=True)


def test_cross_entropy_kernel_edge_rows(_triton_serves):
    # All ignored: nan mean and zero gradient, as torch. Confident logits of ±1e4, and an
    # ignored row holding inf: finite everywhere it counts, 0 where it does not.
    x = _leaf(torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [float("inf"), 0.0, 0.0]]))
    loss, (grad,), _ = _grads(lambda a: LF.cross_entropy(a, torch.tensor([-100, -100, -100], device=DEVICE)), [x])
    assert loss.isnan() and (grad == 0).all()
    target = torch.tensor([0, 0, -100], device=DEVICE)
    loss, (grad,), g = _grads(lambda a: LF.cross_entropy(a, target, reduction="none"), [x])
    torch.testing.assert_close(loss, torch.tensor([0.0, 2e4, 0.0], device=DEVICE))
    assert torch.isfinite(grad).all() and (grad[2] == 0).all()


def test_cross_entropy_kernel_reads_strided_logits():
    x = _leaf(torch.randn(9, 300)).t()  # a (300, 9) view with column-major strides
    x.retain_grad()
    target = torch.randint(0, 9, (300,), device=DEVICE)
    loss, (grad,), g = _grads(lambda a: LF.cross_entropy(a, target, reduction="none"), [x])
    want, (want_grad,) = _reference(lambda a: LF.cross_entropy(a, target, reduction="none"), [x], g)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)


def test_bfloat16_cross_entropy_is_at_least_as_accurate_as_torch():
    # The training case: 'mean' with grad_output 1 (or any power of two, as loss scaling
    # uses): the gradient is rounded to bfloat16 once, from float32.
    gen = torch.Generator().manual_seed(5)
    x64 = torch.randn(16, 3000, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 3000, (16,), generator=gen).to(DEVICE)
    x = _leaf(x64.bfloat16())
    exact = x.detach().double().requires_grad_()
    for scale in (1.0, 1024.0):
        loss = LF.cross_entropy(x, target)
        (grad,) = torch.autograd.grad(loss * scale, x)
        want = TF.cross_entropy(exact, target)
        (want_grad,) = torch.autograd.grad(want * scale, exact)
        theirs_x = x.detach().clone().requires_grad_()
        theirs = TF.cross_entropy(theirs_x, target)
        (theirs_grad,) = torch.autograd.grad(theirs * scale, theirs_x)
        assert loss.dtype == grad.dtype == torch.bfloat16
        assert (loss.double() - want).abs() <= (theirs.double() - want).abs() + 1e-12
        assert (grad.double() - want_grad).abs().max() <= (theirs_grad.double() - want_grad).abs().max() + 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("confidence", [0.5, 0.999, 0.9999])
@pytest.mark.parametrize("wrong", [False, True], ids=["right", "confidently-wrong"])
def test_cross_entropy_kernel_keeps_the_accuracy_contract(dtype, confidence, wrong, _triton_serves):
    """tests/test_accuracy.py's contract, for the kernel: loss per token and dlogits within
    2 roundings of bfloat16 / float16 (64 of float32) of float64 on the same logits, on
    confident rows (the others' sum leaves the target's lane out)."""
    from losskit.cli.bench_accuracy import confident_logits, exact_cross_entropy, roundings

    bound = 64.0 if dtype == torch.float32 else 2.0
    logits, target = confident_logits(3, 3000, confidence, dtype, wrong=wrong)
    x = _leaf(logits)
    loss = LF.cross_entropy(x, target.to(DEVICE))
    loss.backward()
    with torch.no_grad():
        per_token = LF.cross_entropy(logits.to(DEVICE), target.to(DEVICE), reduction="none")
    loss64, grad64 = exact_cross_entropy(logits, target)
    assert _triton_serves["ce"] == 2
    for name, got, exact in (("loss", per_token, loss64), ("dlogits", x.grad, grad64)):
        err = roundings(got.cpu(), exact, dtype)
        assert err <= bound, f"{name}: {err:.3g} roundings of {dtype} (contract: {bound})"


def test_bfloat16_cross_entropy_with_a_per_row_grad_output_is_within_one_rounding():
    # reduction='none' under an arbitrary per-row grad_output: the gradient made in forward
    # is rounded to bfloat16, then scaled in bfloat16, one rounding more than torch.
    gen = torch.Generator().manual_seed(6)
    x = _leaf((torch.randn(16, 3000, generator=gen, dtype=torch.float64) * 3).bfloat16())
    target = torch.randint(0, 3000, (16,), generator=gen).to(DEVICE)
    loss, (grad,), g = _grads(lambda a: LF.cross_entropy(a, target, reduction="none"), [x])
    exact = x.detach().double().requires_grad_()
    want = TF.cross_entropy(exact, target, reduction="none")
    (want_grad,) = torch.autograd.grad(want, exact, g.double())
    assert (loss.double() - want).abs().max() <= 2.0 ** -8 * want.abs().max()
    ulp = 2.0 ** -7 * want_grad.abs().clamp_min(2.0 ** -126)  # two bfloat16 roundings at most
    assert ((grad.double() - want_grad).abs() <= ulp).all()


@pytest.mark.parametrize("options", [
    {}, {"reduction": "none", "chunk_size": 3, "label_smoothing": 0.1},
    {"bias": True, "weight": True, "lse_square_scale": 1e-3, "ignore_index": 0},
], ids=str)
def test_linear_cross_entropy_runs_its_chunks_through_the_kernel(options, _triton_serves):
    gen = torch.Generator().manual_seed(3)
    hidden, head = _leaf(torch.randn(2, 5, 8, generator=gen)), _leaf(torch.randn(1500, 8, generator=gen) * 0.3)
    target = torch.randint(0, 1500, (2, 5), generator=gen).to(DEVICE)
    kwargs = dict(options)
    leaves = [hidden, head]
    if kwargs.pop("bias", False):
        leaves.append(_leaf(torch.randn(1500, generator=gen)))
        kwargs["linear_bias"] = leaves[-1]
    if kwargs.pop("weight", False):
        kwargs["weight"] = (torch.rand(1500, generator=gen) + 0.5).to(DEVICE)

    def fn(h, w, *bias):
        return LF.linear_cross_entropy(h, w, target, **kwargs)

    loss, grads, g = _grads(fn, leaves)
    assert _triton_serves["ce"] >= 1
    want, want_grads = _reference(fn, leaves, g)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_linear_cross_entropy_accumulates_the_weight_gradient_in_float32():
    gen = torch.Generator().manual_seed(4)
    hidden, head = torch.randn(64, 16, generator=gen), torch.randn(2000, 16, generator=gen) * 0.2
    target = torch.randint(0, 2000, (64,), generator=gen).to(DEVICE)
    h, w = _leaf(hidden.bfloat16()), _leaf(head.bfloat16())
    loss = LF.linear_cross_entropy(h, w, target)
    grad_h, grad_w = torch.autograd.grad(loss, [h, w])
    assert grad_w.dtype == torch.bfloat16
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact_h, exact_w = torch.autograd.grad(TF.cross_entropy(h64 @ w64.T, target), [h64, w64])
    th, tw = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    theirs_h, theirs_w = torch.autograd.grad(TF.cross_entropy(th @ tw.T, target), [th, tw])
    assert (grad_w.double() - exact_w).abs().max() <= (theirs_w.double() - exact_w).abs().max()
    assert (grad_h.double() - exact_h).abs().max() <= (theirs_h.double() - exact_h).abs().max()


@pytest.mark.parametrize("options", [
    {}, {"reduction": "none"}, {"reduction": "sum", "weight": "row", "pos_weight": "row"},
    {"weight": "column"}, {"pos_weight": "row", "weight": "full", "reduction": "none"},
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bce_with_logits_kernel(options, dtype, _triton_serves):
    gen = torch.Generator().manual_seed(2)
    n, c = 9, 1100  # not a multiple of the block
    shapes = {"row": (c,), "column": (n, 1), "full": (n, c)}
    kwargs = {k: (torch.rand(shapes[v], generator=gen) * 2 + 0.2).to(DEVICE) if isinstance(v, str) and v in shapes
              else v for k, v in options.items()}
    x64 = torch.randn(n, c, generator=gen, dtype=torch.float64) * 6
    x64[0, :4] = torch.tensor([1e4, -1e4, 50.0, -50.0])
    y = torch.rand(n, c, generator=gen).round().to(dtype).to(DEVICE)
    x = _leaf(x64.to(dtype))
    loss, (grad,), g = _grads(lambda a: LF.binary_cross_entropy_with_logits(a, y, **kwargs), [x])
    assert _triton_serves["bce"] == 1 and loss.dtype == grad.dtype == dtype
    exact = x.detach().double().requires_grad_()
    want = TF.binary_cross_entropy_with_logits(exact, y.double(), **{k: v.double() for k, v in kwargs.items()
                                                                      if isinstance(v, torch.Tensor)},
                                               **{k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
    (want_grad,) = torch.autograd.grad(want, exact, g.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(grad.double(), want_grad, atol=tol, rtol=tol)


def test_compiled_cross_entropy_runs_the_kernel_inside_its_custom_op(_triton_serves):
    x = _leaf(torch.randn(6, 40))
    target = torch.tensor([0, 5, -100, 39, 2, 2], device=DEVICE)

    def step(a):
        return LF.cross_entropy(a, target, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    (grad,) = torch.autograd.grad(loss, x)
    assert _triton_serves["ce"] >= 1
    want, (want_grad,) = _reference(step, [x], torch.ones(()))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)


def test_importing_losskit_does_not_import_triton():
    code = "import sys, losskit, losskit.functional, losskit.kernels; print('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
