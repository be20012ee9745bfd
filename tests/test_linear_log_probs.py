"""linear_log_probs and linear_log_probs_and_entropy against torch on the same inputs: the
oracle is ``log_softmax(x @ W.T + b).gather`` (and -sum p log p) on materialised logits,
computed in float64."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as TF

import losskit.functional as LF
from compare import check_raises
from losskit.kernels import fused_only, reference_only, triton_support
from test_memory import LargestAllocation, saved_bytes

C, H = 37, 8
NAMES = ["log_p", "entropy", "grad input", "grad weight", "grad bias"]


def oracle(x, w, b, target, temperature=1.0, ignore_index=-100):
    """(log p_y, entropy) by torch in float64 on the materialised logits, 0 where ignored."""
    logits = TF.linear(x.double(), w.double(), None if b is None else b.double()) / temperature
    log_p = logits.log_softmax(-1)
    valid = target != ignore_index
    picked = log_p.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return torch.where(valid, picked, 0.0), torch.where(valid, entropy, 0.0)


def make(batch=(13,), dtype=torch.float32, bias=True, classes=C, hidden=H, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(classes, hidden, generator=g, dtype=torch.float64) * 0.7).to(dtype)
    b = (torch.randn(classes, generator=g, dtype=torch.float64) * 0.3).to(dtype) if bias else None
    target = torch.randint(0, classes, batch, generator=g)
    if ignored:
        target.view(-1)[1::4] = -100
    upstream = (torch.randn(batch, generator=g, dtype=torch.float64), torch.randn(batch, generator=g,
                                                                                    dtype=torch.float64))
    return x, w, b, target, upstream


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def objective(log_p, entropy, upstream, which):
    """The scalar whose gradient is checked: log-probs and/or entropy times an arbitrary
    upstream gradient (never all ones)."""
    g, h = (u.to(log_p.dtype) for u in upstream)
    if which == "log_p":
        return (log_p * g).sum()
    if which == "entropy":
        return (entropy * h).sum()
    return (log_p * g).sum() + (entropy * h).sum()


def values_and_grads(fn, x, w, b, target, upstream, which="both", **kwargs):
    x, w, b = leaves(x, w, b)
    log_p, entropy = fn(x, w, target, b, **kwargs)
    inputs = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(objective(log_p, entropy, upstream, which), inputs)
    return [log_p.detach(), entropy.detach(), *grads]


def ours(x, w, target, b, **kwargs):
    return LF.linear_log_probs_and_entropy(x, w, target, b, **kwargs)


def theirs(x, w, target, b, temperature=1.0, **_):
    return oracle(x, w, b, target, temperature)


def assert_all_close(got, want, atol, rtol, what=""):
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{what}{n}: {m}")


# ---- values and gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["both", "log_p", "entropy"])
@pytest.mark.parametrize("options", [
    {}, {"chunk_size": 3}, {"temperature": 0.7, "chunk_size": 5}, {"temperature": 2.0}, {"bias": False},
    {"batch": (2, 5)}, {"batch_invariant": True, "chunk_size": 4},
], ids=str)
def test_matches_torch_float32(options, which):
    options = dict(options)
    x, w, b, target, upstream = make(batch=options.pop("batch", (13,)), bias=options.pop("bias", True))
    got = values_and_grads(ours, x, w, b, target, upstream, which, **options)
    want = values_and_grads(theirs, x.double(), w.double(), None if b is None else b.double(), target, upstream,
                            which, temperature=options.get("temperature", 1.0))
    assert got[0].shape == target.shape and got[0].dtype == torch.float32
    assert_all_close(got, want, atol=2e-5, rtol=2e-5)


def test_linear_log_probs_alone_equals_the_pair_and_takes_any_upstream():
    x, w, b, target, (g, _) = make(batch=(3, 6))
    lx, lw, lb = leaves(x, w, b)
    log_p = LF.linear_log_probs(lx, lw, target, lb, temperature=1.3)
    assert isinstance(log_p, torch.Tensor) and log_p.shape == target.shape
    pair = LF.linear_log_probs_and_entropy(x, w, target, b, temperature=1.3)[0]
    assert torch.equal(log_p.detach(), pair)
    got = torch.autograd.grad((log_p * g.float()).sum(), (lx, lw, lb))
    want = values_and_grads(theirs, x.double(), w.double(), b.double(), target, (g, g), "log_p", temperature=1.3)
    assert_all_close([log_p.detach(), want[1], *got], want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_only", "reference"])
def test_float64_gradcheck(fused):
    x, w, b, target, _ = make(batch=(5,), dtype=torch.float64, classes=9, hidden=3)
    target[1] = -100

    def fn(x, w, b):
        log_p, entropy = LF.linear_log_probs_and_entropy(x, w, target, b, temperature=0.8, chunk_size=2)
        return log_p, entropy

    with fused_only() if fused else reference_only():
        assert torch.autograd.gradcheck(fn, leaves(x, w, b))
        want = values_and_grads(theirs, x, w, b, target, make(batch=(5,))[4], temperature=0.8)
        got = values_and_grads(ours, x, w, b, target, make(batch=(5,))[4], temperature=0.8, chunk_size=2)
    assert_all_close(got, want, atol=1e-12, rtol=1e-10)


def test_double_backward_and_a_second_backward():
    x, w, b, target, _ = make(batch=(5,), dtype=torch.float64, classes=9, hidden=3)

    def fn(x, w, b):
        return LF.linear_log_probs_and_entropy(x, w, target, b, temperature=1.5)

    with fused_only():  # the kernel's op, whose create_graph backward goes through the composed ops
        assert torch.autograd.gradgradcheck(fn, leaves(x, w, b))
        lx, lw, lb = leaves(x, w, b)
        log_p, entropy = fn(lx, lw, lb)
        first = torch.autograd.grad((log_p + entropy).sum(), (lx, lw, lb), retain_graph=True)
        second = torch.autograd.grad((log_p + entropy).sum(), (lx, lw, lb))
    assert all(torch.equal(a, c) for a, c in zip(first, second))


# ---- accuracy (issue 17): float64 is the oracle, torch in the same dtype the bar -------------------
def confident(classes, confidence, dtype, n=8, hidden=16, seed=0):
    """Rows whose target, class 3, has a probability of about ``confidence`` (the bias sets
    its logit); below 0.99, half the rows take a random target instead."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    w = torch.randn(classes, hidden, generator=g) * 0.1
    b = torch.randn(classes, generator=g) * 0.5
    b[3] = torch.logsumexp(torch.cat([b[:3], b[4:]]), 0) + math.log(confidence / (1 - confidence))
    target = torch.full((n,), 3)
    if confidence < 0.99:
        target[n // 2:] = torch.randint(0, classes, (n - n // 2,), generator=g)
    # Upstream gradients that the dtype holds exactly, so that the oracle sees the same ones.
    upstream = tuple(torch.randn(n, generator=g).to(dtype).double() for _ in range(2))
    return x.to(dtype), w.to(dtype), b.to(dtype), target, upstream


def torch_same_dtype(x, w, target, b, **_):
    log_p = TF.linear(x, w, b).log_softmax(-1)
    return log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def relative_error(name, got, want):
    """Per token for what is per token (the largest over tokens, so that a confident row is
    not hidden behind the others), over the whole tensor for the sums over tokens."""
    error = (got.double() - want)
    if name in ("log_p", "entropy"):
        return (error.abs() / want.abs()).max().item()
    if name == "grad input":
        return (error.norm(dim=-1) / want.norm(dim=-1)).max().item()
    return (error.norm() / want.norm()).item()


@pytest.mark.parametrize("classes", [1000, 131072])
@pytest.mark.parametrize("confidence", [0.5, 0.9999])
def test_float32_is_at_least_as_accurate_as_torch(classes, confidence):
    x, w, b, target, upstream = confident(classes, confidence, torch.float32)
    exact = values_and_grads(theirs, x.double(), w.double(), b.double(), target, upstream)
    mine = values_and_grads(ours, x, w, b, target, upstream)
    torch_ = values_and_grads(torch_same_dtype, x, w, b, target, upstream)
    for name, m, t, e in zip(NAMES, mine, torch_, exact):
        ours_error, torch_error = relative_error(name, m, e), relative_error(name, t, e)
        # No larger than torch's, or at float32's own level (16 units of 2^-24) where both are
        # there and the matmul's rounding decides. A confident row is held to that level
        # whatever torch's error (torch's 1 - softmax loses ~1e-2 of 1 - p_y there; 1 - p_y
        # from exp(log p_y) would lose ~1e-5).
        bound = 2e-6 if confidence > 0.99 else max(torch_error, 2e-6)
        assert ours_error <= bound, f"{name}: losskit {ours_error:.2e}, torch {torch_error:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("classes, confidence", [(1000, 0.5), (131072, 0.9999)])
def test_half_precision_is_within_two_roundings(dtype, classes, confidence):
    x, w, b, target, upstream = confident(classes, confidence, dtype)
    exact = values_and_grads(theirs, x.double(), w.double(), b.double(), target, upstream)
    mine = values_and_grads(ours, x, w, b, target, upstream)
    unit = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)  # the unit roundoff
    for name, m, e in zip(NAMES, mine, exact):
        assert m.dtype == dtype, name
        # Two roundings of each element (in float16's subnormal range, of its spacing there),
        # plus float32's error on elements near 0 (relative to the tensor's largest).
        bound = 2 * unit * torch.clamp(e.abs(), min=torch.finfo(dtype).tiny) + 1e-5 * e.abs().max()
        excess = ((m.double() - e).abs() - bound).max().item()
        assert excess <= 0, f"{name}: an element is {excess:.2e} beyond two roundings"


# ---- ignored tokens, shapes, options ---------------------------------------------------------------
def test_ignored_tokens_have_zero_log_prob_entropy_and_gradient():
    x, w, b, target, upstream = make(batch=(12,), ignored=False)
    target[::3] = 7  # with ignore_index=7
    lx, lw, lb = leaves(x, w, b)
    log_p, entropy = LF.linear_log_probs_and_entropy(lx, lw, target, lb, ignore_index=7)
    ignored = target == 7
    assert (log_p[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (log_p[~ignored] < 0).all() and (entropy[~ignored] > 0).all()
    grad_x, = torch.autograd.grad(objective(log_p, entropy, upstream, "both"), lx)
    assert (grad_x[ignored] == 0).all() and (grad_x[~ignored] != 0).all()


def test_all_ignored_gives_zeros_and_zero_gradients():
    x, w, b, target, upstream = make(batch=(2, 3))
    target.fill_(-100)
    lx, lw, lb = leaves(x, w, b)
    log_p, entropy = LF.linear_log_probs_and_entropy(lx, lw, target, lb)
    assert (log_p == 0).all() and (entropy == 0).all()
    for grad in torch.autograd.grad(objective(log_p, entropy, upstream, "both"), (lx, lw, lb)):
        assert (grad == 0).all()


def test_an_upstream_nan_on_an_ignored_token_stays_there():
    x, w, b, target, (g, h) = make(batch=(6,))
    target[2] = -100
    g[2], h[2] = math.nan, math.inf
    lx, lw, lb = leaves(x, w, b)
    grads = torch.autograd.grad(objective(*LF.linear_log_probs_and_entropy(lx, lw, target, lb), (g, h), "both"),
                                (lw, lb))
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_unbatched_token_and_empty_batch():
    x, w, b, target, _ = make(batch=(1,), ignored=False)
    log_p, entropy = LF.linear_log_probs_and_entropy(x[0], w, target[0], b)
    assert log_p.shape == () and entropy.shape == ()
    torch.testing.assert_close(log_p.double(), oracle(x[0], w, b, target[0])[0], atol=1e-5, rtol=1e-5)
    empty = LF.linear_log_probs(x[:0], w, target[:0], b)
    assert empty.shape == (0,)


def test_meta_device():
    x = torch.empty(2, 5, H, device="meta", requires_grad=True)
    w = torch.empty(C, H, device="meta", requires_grad=True)
    target = torch.empty(2, 5, dtype=torch.long, device="meta")
    log_p, entropy = LF.linear_log_probs_and_entropy(x, w, target)
    assert log_p.device.type == "meta" and log_p.shape == (2, 5) and entropy.shape == (2, 5)
    grad_x, grad_w = torch.autograd.grad((log_p + entropy).sum(), (x, w))
    assert grad_x.shape == x.shape and grad_w.shape == w.shape and grad_w.device.type == "meta"


def test_compiled_fullgraph_equals_eager():
    torch._dynamo.reset()
    x, w, b, target, upstream = make(batch=(2, 7))

    def fn(x, w, b):
        return objective(*LF.linear_log_probs_and_entropy(x, w, target, b, temperature=0.9, chunk_size=4),
                         upstream, "both")

    want = fn(*(eager := leaves(x, w, b)))
    want_grads = torch.autograd.grad(want, eager)
    # aot_eager: the op's forward, fake and backward as a compiled graph holds them; inductor
    # runs it through tests/test_compile.py's catalog.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*(mine := leaves(x, w, b)))
    got_grads = torch.autograd.grad(got, mine)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w_ in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w_, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ---- memory ----------------------------------------------------------------------------------
def test_no_logits_sized_tensor_is_kept_or_made():
    n, classes, hidden, chunk = 256, 2048, 32, 16
    x, w, b, target, upstream = make(batch=(n,), classes=classes, hidden=hidden)
    logits_bytes = 4 * n * classes
    lx, lw, lb = leaves(x, w, b)
    kept = saved_bytes(lambda *a: LF.linear_log_probs_and_entropy(*a, chunk_size=chunk)[0], (lx, lw, target, lb), {})
    inputs_bytes = sum(t.untyped_storage().nbytes() for t in (x, w, b, target))
    # The inputs and five float32 statistics per token, nothing like the logits.
    assert kept <= inputs_bytes + 5 * 4 * n + 1024, kept
    with LargestAllocation() as mode:
        log_p, entropy = LF.linear_log_probs_and_entropy(lx, lw, target, lb, chunk_size=chunk)
        torch.autograd.grad(objective(log_p, entropy, upstream, "both"), (lx, lw, lb))
    # The weight gradient (C x H) and the chunk (16 x C) are the largest things made.
    assert mode.largest <= max(4 * classes * hidden, 4 * chunk * classes), mode.largest
    assert mode.largest < logits_bytes // 4


# ---- batch invariance and determinism ---------------------------------------------------------
def test_batch_invariant_rows_are_bitwise_independent_of_the_batch_and_chunk():
    x, w, b, target, upstream = make(batch=(300,), classes=3000, hidden=32, ignored=False)

    def run(rows, chunk):
        return values_and_grads(ours, x[rows], w, b, target[rows], tuple(u[rows] for u in upstream),
                                chunk_size=chunk, batch_invariant=True)[:3]

    full = run(slice(None), None)
    for rows, chunk in [(slice(None), 7), (slice(None), 1000), (slice(5, 6), None), (slice(3, 90), 7),
                        (slice(299, 300), 3), (slice(40, 297), 256)]:
        for name, got, want in zip(["log_p", "entropy", "grad input"], run(rows, chunk), full):
            assert torch.equal(got, want[rows]), f"{name} of rows {rows} with chunk_size={chunk}"


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_identical_calls_are_bitwise_identical(batch_invariant):
    x, w, b, target, upstream = make(batch=(70,), classes=500, hidden=16)
    first = values_and_grads(ours, x, w, b, target, upstream, chunk_size=32, batch_invariant=batch_invariant)
    second = values_and_grads(ours, x, w, b, target, upstream, chunk_size=32, batch_invariant=batch_invariant)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


# ---- bad input -------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    x, w, b, target, _ = make(batch=(4,), ignored=False)
    fn = LF.linear_log_probs
    check_raises(fn, x, torch.randn(C, H + 1), target, match="linear_log_probs: input has 8 features but weight "
                                                              "expects 9")
    check_raises(fn, x, w, target[:3], match="linear_log_probs: target shape (3,) does not fit input shape (4, 8)")
    check_raises(fn, x, w, target.float(), error=TypeError,
                 match="linear_log_probs: class-index target must be an integer tensor; got torch.float32")
    bad = target.clone()
    bad[2] = C
    check_raises(fn, x, w, bad, error=IndexError, match=f"linear_log_probs: target {C} at index (2,) is out of range "
                                                         f"for {C} classes")
    check_raises(fn, x, w, target, torch.randn(C + 1), match="linear_log_probs: bias must have shape (37,)")
    check_raises(fn, x, w[0], target, match="linear_log_probs: weight must be [C, H]")
    check_raises(fn, x, w, target, chunk_size=0, match="linear_log_probs: chunk_size must be a positive number")
    check_raises(fn, x, w, target, temperature=0.0, match="linear_log_probs: temperature must be a positive")
    check_raises(fn, x.long(), w, target, error=TypeError, match="linear_log_probs: input must be a floating-point")
    check_raises(LF.linear_log_probs_and_entropy, x, w.long(), target, error=TypeError,
                 match="linear_log_probs_and_entropy: weight must be a floating-point")


# ---- Triton (interpreted on CPU, compiled on CUDA) ---------------------------------------------
@pytest.mark.parametrize("options", [{}, {"temperature": 0.8, "chunk_size": 5}], ids=str)
def test_triton_kernels_equal_the_torch_ops(options):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, b, target, upstream = make(batch=(2, 9), classes=2100, hidden=16)  # 2100 spans three 1024-blocks
    target[1, 0] = -100
    want = values_and_grads(ours, x, w, b, target, upstream, **options)
    args = [t.to(device) for t in (x, w, b, target)]
    import losskit.kernels.triton_log_probs as kernel

    launches = {"n": 0}
    stats, gradient = kernel.local_stats_rows, kernel.gradient_rows

    def count(fn):
        def counted(*a, **k):
            launches["n"] += 1
            return fn(*a, **k)
        return counted

    kernel.local_stats_rows, kernel.gradient_rows = count(stats), count(gradient)
    try:
        context = triton_support.on_cpu() if device == "cpu" else warnings.catch_warnings()
        with context, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy on masked lanes
            got = values_and_grads(ours, *args[:3], args[3], tuple(u.to(device) for u in upstream), **options)
    finally:
        kernel.local_stats_rows, kernel.gradient_rows = stats, gradient
    assert launches["n"] >= 2
    assert_all_close([g.cpu() for g in got], want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch_invariant", [False, True])
def test_the_tensor_core_path_on_cpu_matches_float64(dtype, batch_invariant):
    """The accelerator's path (half operands kept, float32 logits and weight gradient, dz
    rounded once), run on the CPU, against float64 on the same inputs: within a few
    roundings of the dtype, for both outputs and every gradient."""
    from losskit._core import switches

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(1000, 32, generator=gen) * 0.1).to(dtype).requires_grad_()
    b = (torch.randn(1000, generator=gen) * 0.1).to(dtype).requires_grad_()
    t = torch.randint(0, 1000, (300,), generator=gen)
    t[3] = -100
    up, ue = torch.randn(300, generator=gen), torch.randn(300, generator=gen)
    with switches.tensor_cores_on_cpu():
        lp, ent = LF.linear_log_probs_and_entropy(x, w, t, bias=b, chunk_size=128, temperature=0.9,
                                                  batch_invariant=batch_invariant)
    grads = torch.autograd.grad((lp * up.to(dtype)).sum() + (ent * ue.to(dtype)).sum(), (x, w, b))
    x64, w64, b64 = (v.detach().double().requires_grad_() for v in (x, w, b))
    z = (torch.nn.functional.linear(x64, w64, b64) / 0.9).log_softmax(-1)
    counts = t != -100
    lp64 = torch.where(counts, z.gather(1, t.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ent64 = torch.where(counts, -(z.exp() * z).sum(1), 0.0)
    grads64 = torch.autograd.grad((lp64 * up).sum() + (ent64 * ue).sum(), (x64, w64, b64))
    u = torch.finfo(dtype).eps / 2
    assert lp.dtype == ent.dtype == dtype
    assert (lp.double() - lp64).abs().max() <= 2 * u * lp64.abs().max()
    assert (ent.double() - ent64).abs().max() <= 2 * u * ent64.abs().max()
    for got, want in zip(grads, grads64):
        assert got.dtype == dtype
        assert (got.double() - want).abs().max() <= 4 * u * want.abs().max()
