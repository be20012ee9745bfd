"""How the differential fuzz (tests/test_fuzz.py) draws its calls: one hypothesis strategy
per loss family, each drawing a loss's options and a data seed.

A strategy returns a ``Call`` whose ``build(dtype)`` makes the same tensors afresh for each
run (losskit, torch, and the float64 reference) from tests/inputs.py, views and all:
transposed storage, expanded rows, empty batches, unbatched and K-dimensional inputs,
all-ignored targets, uint8 targets, legacy size_average/reduce, extreme values, and some
invalid calls (an out-of-range class, a negative variance) that both sides must refuse.
``STRATEGIES`` maps each fuzzed loss to its strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as TF
from hypothesis import strategies as st

from inputs import Inputs
from oracles_beyond_torch import poly1_definition, sigmoid_focal_definition, softmax_focal_definition

REDUCTIONS = ["mean", "sum", "none"]
LEGACY = [(None, None), (False, None), (None, False), (True, True), (False, False)]


@dataclass
class Call:
    """One call of a loss: ``build(dtype) -> (args, kwargs, leaves)`` makes fresh tensors."""

    name: str
    # build(dtype, rounded_to) -> (args, kwargs, leaves): fresh tensors of ``dtype`` holding
    # values first rounded to ``rounded_to`` (the float64 reference of a float16 run sees
    # the float16 inputs).
    build: Callable[..., tuple[list[Any], dict[str, Any], list[torch.Tensor]]]
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    # Where torch in float64 is non-finite and losskit is finite by design (README table).
    finite_by_design: bool = False
    # A documented addition: where torch raises with a message matching ``addition``,
    # losskit computes, and ``twin`` (torch on an equivalent call) is the oracle.
    addition: str | None = None
    twin: Callable[..., torch.Tensor] | None = None
    # For losses torch lacks: the written-out definition in torch ops, run in each dtype as
    # "torch" and in float64 as the reference.
    oracle: Callable[..., torch.Tensor] | None = None


def call(name: str, seed: int, make: Callable[[Inputs], tuple[list[Any], dict[str, Any]]], **extra: Any) -> Call:
    def build(dtype: torch.dtype, rounded_to: torch.dtype | None = None):
        data = Inputs("cpu", dtype, seed, rounded_to)
        args, kwargs = make(data)
        return args, kwargs, data.leaves

    return Call(name, build, **extra)


# ---- strategies: one per loss family --------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
batches = st.sampled_from([0, 1, 2, 3, 7])
layouts = st.sampled_from(["contiguous", "transposed", "expanded"])
scales = st.sampled_from([1.0, 1.0, 30.0, 1e4])  # 1e4: logits far beyond exp's range


def _legacy(draw) -> dict[str, Any]:
    if draw(st.integers(0, 4)):
        return {"reduction": draw(st.sampled_from(REDUCTIONS))}
    size_average, reduce = draw(st.sampled_from(LEGACY))
    return {"size_average": size_average, "reduce": reduce}


@st.composite
def class_index_calls(draw, name: str) -> Call:
    """cross_entropy / nll_loss: unbatched, (N, C) or (N, C, d...), index or probabilities."""
    seed = draw(seeds)
    num_classes = draw(st.sampled_from([1, 2, 5, 9]))
    form = draw(st.sampled_from(["unbatched", "rows", "rows", "spatial"]))
    n = draw(batches)
    spatial = draw(st.sampled_from([(2,), (3, 2)])) if form == "spatial" else ()
    shape = (num_classes,) if form == "unbatched" else (n, num_classes, *spatial)
    target_shape = () if form == "unbatched" else (n, *spatial)
    probabilities = name == "cross_entropy" and draw(st.integers(0, 5)) == 0
    target_dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.uint8]))
    ignore_index = draw(st.sampled_from([-100, 0, num_classes - 1]))
    if target_dtype == torch.uint8 and ignore_index < 0:
        ignore_index = -100  # never matches a uint8 class: nothing ignored
    ignored = draw(st.sampled_from(["none", "some", "all"]))
    weighted = draw(st.booleans())
    smoothing = draw(st.sampled_from([0.0, 0.0, 0.1, 0.7])) if name == "cross_entropy" else 0.0
    scale = draw(scales)
    layout = draw(layouts) if form == "rows" else "contiguous"
    out_of_range = draw(st.integers(0, 15)) == 0  # an invalid call: both must raise
    options = _legacy(draw)

    def make(d: Inputs):
        logits = d.normal(*shape, scale=scale)
        if name == "nll_loss":
            logits = logits.log_softmax(0 if form == "unbatched" else 1)
        x = d.leaf(logits, layout)
        kwargs: dict[str, Any] = dict(options)
        if probabilities:
            target = d.const(d.normal(*shape).softmax(0 if form == "unbatched" else 1))
        else:
            target = d.index(num_classes, *target_shape)
            if ignored == "all" and (ignore_index >= 0 or target_dtype == torch.int64):
                target = torch.full_like(target, ignore_index)
            elif ignored == "some" and target.numel() and (ignore_index >= 0 or target_dtype == torch.int64):
                target.view(-1)[::2] = ignore_index
            if out_of_range and target.numel():
                target.view(-1)[0] = num_classes
            target = target.to(target_dtype)
            kwargs["ignore_index"] = ignore_index
        if weighted:
            kwargs["weight"] = d.const(d.uniform(num_classes, low=0.1, high=2.0))
        if smoothing:
            kwargs["label_smoothing"] = smoothing
        return [x, target], kwargs

    def twin(input, target, *args, **kwargs):  # the same call with int64 targets
        return getattr(TF, name)(input, target.long() if not target.is_floating_point() else target, *args, **kwargs)

    return call(name, seed, make, finite_by_design=True, addition="expected scalar type Long but found Byte|Expected dtype int32/int64 for index",
                twin=twin)


@st.composite
def binary_calls(draw, name: str) -> Call:
    seed = draw(seeds)
    shape = draw(st.sampled_from([(0,), (5,), (3, 4), (2, 3, 2), ()]))
    weighted = draw(st.sampled_from([None, "full", "row"]))
    pos_weighted = name == "binary_cross_entropy_with_logits" and draw(st.booleans())
    scale = draw(scales)
    layout = draw(layouts)
    hard = draw(st.booleans())
    edge = draw(st.integers(0, 5)) == 0  # probabilities of exactly 0 and 1
    bad_target = name == "binary_cross_entropy" and draw(st.integers(0, 15)) == 0
    options = _legacy(draw)

    def make(d: Inputs):
        if name == "binary_cross_entropy":
            p = d.uniform(*shape, low=0.001, high=0.999)
            if edge and p.numel() >= 2:
                p.view(-1)[0], p.view(-1)[1] = 0.0, 1.0
            x = d.leaf(p, layout)
        else:
            x = d.leaf(d.normal(*shape, scale=scale), layout)
        y = d.uniform(*shape)
        if hard:
            y = y.round()
        if bad_target and y.numel():
            y.view(-1)[0] = 1.5
        kwargs: dict[str, Any] = dict(options)
        if weighted == "full":
            kwargs["weight"] = d.const(d.uniform(*shape, low=0.1, high=2.0))
        elif weighted == "row" and len(shape) >= 1:
            kwargs["weight"] = d.const(d.uniform(shape[-1], low=0.1, high=2.0))
        if pos_weighted and len(shape) >= 1:
            kwargs["pos_weight"] = d.const(d.uniform(shape[-1], low=0.2, high=3.0))
        return [x, d.const(y)], kwargs

    return call(name, seed, make, finite_by_design=name != "binary_cross_entropy")


@st.composite
def regression_calls(draw, name: str) -> Call:
    seed = draw(seeds)
    shape = draw(st.sampled_from([(0,), (5,), (3, 4), (2, 3, 2), ()]))
    layout = draw(layouts)
    broadcast_target = draw(st.integers(0, 5)) == 0 and len(shape) >= 2
    infinite = name in ("l1_loss", "smooth_l1_loss", "huber_loss") and draw(st.integers(0, 4)) == 0
    integer_target = draw(st.integers(0, 5)) == 0 and name != "huber_loss"  # torch's huber backward fails on it
    scale = draw(st.sampled_from([1.0, 1.0, 100.0]))
    kwargs: dict[str, Any] = {}
    if name == "smooth_l1_loss":
        kwargs["beta"] = draw(st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    if name == "huber_loss":
        kwargs["delta"] = draw(st.sampled_from([0.5, 1.0, 3.0]))
        kwargs["reduction"] = draw(st.sampled_from(REDUCTIONS))
    else:
        kwargs.update(_legacy(draw))
    if name == "poisson_nll_loss":
        kwargs.update(log_input=draw(st.booleans()), full=draw(st.booleans()))
        # torch forms the Stirling term of an integer target in float32 (log of an integer
        # tensor); losskit promotes first (README: differences), so compare float targets.
        integer_target = integer_target and not kwargs["full"]

    def make(d: Inputs):
        target_shape = (1, *shape[1:]) if broadcast_target else shape
        if name == "poisson_nll_loss":
            x = d.normal(*shape) if kwargs["log_input"] else d.uniform(*shape, low=0.01, high=5.0)
            y = d.index(6, *target_shape).double()
        else:
            x = d.normal(*shape, scale=scale)
            y = d.normal(*target_shape, scale=scale)
            if integer_target:
                y = y.round()
            if infinite and x.numel():
                x.view(-1)[0] = math.inf
                if x.numel() > 1:
                    x.view(-1)[-1] = -math.inf
        target = y.long() if integer_target else d.const(y)
        return [d.leaf(x, layout), target], dict(kwargs)

    return call(name, seed, make)


@st.composite
def gaussian_calls(draw) -> Call:
    seed = draw(seeds)
    n, k = draw(batches), draw(st.sampled_from([1, 3]))
    var_form = draw(st.sampled_from(["full", "last", "scalar_per_row"]))
    kwargs = {"full": draw(st.booleans()), "eps": draw(st.sampled_from([1e-6, 1e-2])),
              "reduction": draw(st.sampled_from(REDUCTIONS))}
    negative = draw(st.integers(0, 15)) == 0

    def make(d: Inputs):
        x, y = d.leaf(d.normal(n, k)), d.const(d.normal(n, k))
        var_shape = {"full": (n, k), "last": (n,), "scalar_per_row": (n, 1)}[var_form]
        var = d.uniform(*var_shape, low=0.01, high=3.0)
        if negative and var.numel():
            var.view(-1)[0] = -1.0
        return [x, y, d.leaf(var)], dict(kwargs)

    return call("gaussian_nll_loss", seed, make)


@st.composite
def kl_calls(draw) -> Call:
    seed = draw(seeds)
    shape = draw(st.sampled_from([(0, 4), (3, 4), (2, 3, 4), (4,)]))
    log_target = draw(st.booleans())
    kwargs = {"log_target": log_target, "reduction": draw(st.sampled_from([*REDUCTIONS, "batchmean"]))}
    zeros = draw(st.booleans())

    def make(d: Inputs):
        x = d.leaf(d.normal(*shape).log_softmax(-1))
        q = d.normal(*shape).softmax(-1)
        if zeros and q.numel():
            q.view(-1)[0] = 0.0
        target = q.log() if log_target else q
        return [x, d.leaf(target)], dict(kwargs)

    return call("kl_div", seed, make)


@st.composite
def margin_calls(draw, name: str) -> Call:
    seed = draw(seeds)
    n, c = draw(batches), draw(st.sampled_from([1, 2, 5]))
    if name in ("multi_margin_loss", "multilabel_margin_loss") and n == 0:
        n = 1  # torch returns uninitialised memory for an empty 'mean' (README: differences)
    layout = draw(layouts)
    # Values on a coarse grid: hinge terms of exactly 0. Not for the distance losses, whose
    # eps (rounded differently in each precision) decides such ties, as it does in torch.
    ties = draw(st.booleans()) and name not in ("triplet_margin_loss", "cosine_embedding_loss")
    options = _legacy(draw)

    def values(d: Inputs, *shape: int) -> torch.Tensor:
        v = d.normal(*shape)
        return (v * 2).round() / 4 if ties else v

    def make(d: Inputs):
        kwargs: dict[str, Any] = dict(options)
        if name == "soft_margin_loss":
            return [d.leaf(values(d, n, c), layout), d.const(d.index(2, n, c).double() * 2 - 1)], kwargs
        if name == "multilabel_soft_margin_loss":
            if draw_weight:
                kwargs["weight"] = d.const(d.uniform(c, low=0.1, high=2.0))
            return [d.leaf(values(d, n, c), layout), d.const(d.index(2, n, c).double())], kwargs
        if name == "multi_margin_loss":
            kwargs.update(p=p, margin=margin)
            if draw_weight:
                kwargs["weight"] = d.const(d.uniform(c, low=0.1, high=2.0))
            return [d.leaf(values(d, n, c), layout), d.index(c, n)], kwargs
        if name == "multilabel_margin_loss":
            target = torch.stack([torch.randperm(c, generator=d.gen) for _ in range(n)]) if n else torch.zeros(
                0, c, dtype=torch.long)
            cut = d.index(c + 1, n)
            target = torch.where(torch.arange(c) < cut.unsqueeze(1), target, -1) if n else target
            return [d.leaf(values(d, n, c), layout), target], kwargs
        if name == "margin_ranking_loss":
            kwargs["margin"] = margin
            return [d.leaf(values(d, n)), d.leaf(values(d, n)), d.const(d.index(2, n).double() * 2 - 1)], kwargs
        if name == "hinge_embedding_loss":
            kwargs["margin"] = margin
            return [d.leaf(values(d, n, c), layout), d.const(d.index(2, n, c).double() * 2 - 1)], kwargs
        if name == "cosine_embedding_loss":
            kwargs["margin"] = margin - 1.0  # in [-1, 1)
            return [d.leaf(values(d, n, c)), d.leaf(values(d, n, c)), d.const(d.index(2, n).double() * 2 - 1)], kwargs
        kwargs.update(margin=margin, p=p, swap=swap, eps=1e-6)  # triplet_margin_loss
        return [d.leaf(values(d, n, c)), d.leaf(values(d, n, c)), d.leaf(values(d, n, c))], kwargs

    draw_weight = draw(st.booleans())
    p = draw(st.sampled_from([1, 2]))
    margin = draw(st.sampled_from([0.5, 1.0, 2.0]))
    swap = draw(st.booleans())
    return call(name, seed, make, finite_by_design=name == "soft_margin_loss")


@st.composite
def ctc_calls(draw) -> Call:
    seed = draw(seeds)
    steps, n, c = draw(st.sampled_from([1, 2, 5, 8])), draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([2, 4]))
    longest = draw(st.sampled_from([0, 1, 3]))
    layout = draw(st.sampled_from(["padded", "concatenated"]))
    blank = draw(st.sampled_from([0, c - 1]))
    kwargs = {"blank": blank, "reduction": draw(st.sampled_from(REDUCTIONS)), "zero_infinity": draw(st.booleans())}

    def make(d: Inputs):
        lp = d.leaf(d.normal(steps, n, c).log_softmax(2))
        labels = d.index(c - 1, n, longest)
        labels = labels + (labels >= blank).long()  # never the blank
        input_lengths = d.index(steps + 1, n)
        target_lengths = d.index(longest + 1, n)
        if layout == "concatenated":
            targets = torch.cat([labels[i, : int(k)] for i, k in enumerate(target_lengths)])
            return [lp, targets, input_lengths.tolist(), target_lengths.tolist()], dict(kwargs)
        return [lp, labels, input_lengths, target_lengths], dict(kwargs)

    # Half precision log-probs: torch's CPU ctc is float/double only.
    return call("ctc_loss", seed, make, dtypes=(torch.float64, torch.float32))


@st.composite
def linear_calls(draw) -> Call:
    seed = draw(seeds)
    batch = draw(st.sampled_from([(0,), (1,), (5,), (9,), (2, 3)]))
    hidden, c = draw(st.sampled_from([1, 4])), draw(st.sampled_from([1, 3, 11]))
    biased, weighted = draw(st.booleans()), draw(st.booleans())
    ignore_index = draw(st.sampled_from([None, 0]))
    smoothing = draw(st.sampled_from([0.0, 0.2]))
    reduction = draw(st.sampled_from(REDUCTIONS))
    chunk = draw(st.sampled_from([None, 1, 2, 4]))

    def make(d: Inputs):
        x = d.leaf(d.normal(*batch, hidden))
        w = d.leaf(d.normal(c, hidden))
        target = d.index(c, *batch)
        kwargs: dict[str, Any] = {"reduction": reduction, "label_smoothing": smoothing}
        if ignore_index is not None:
            kwargs["ignore_index"] = ignore_index
        if biased:
            kwargs["linear_bias"] = d.leaf(d.normal(c))
        if weighted:
            kwargs["weight"] = d.const(d.uniform(c, low=0.1, high=2.0))
        if chunk is not None:
            from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

            kwargs["options"] = LinearCrossEntropyOptions(batch_chunk_size=chunk)
        return [x, w, target], kwargs

    def twin(input, linear_weight, target, **kwargs):  # (..., H) input: torch on the flattened rows
        out = TF.linear_cross_entropy(input.reshape(-1, input.shape[-1]), linear_weight, target.reshape(-1), **kwargs)
        return out.reshape(target.shape) if kwargs["reduction"] == "none" else out

    return call("linear_cross_entropy", seed, make, finite_by_design=True,
                addition="expected input with dimensionality 1 or 2", twin=twin)


# ---- beyond torch: against the written-out definitions (tests/oracles_beyond_torch.py) -------

@st.composite
def sigmoid_focal_calls(draw) -> Call:
    seed = draw(seeds)
    shape = draw(st.sampled_from([(0,), (5,), (3, 4), (2, 3, 2)]))
    kwargs = {"alpha": draw(st.sampled_from([0.25, 0.0, 1.0, -1])), "gamma": draw(st.sampled_from([0.0, 0.5, 1.0, 2.0])),
              "reduction": draw(st.sampled_from(REDUCTIONS))}
    scale, layout, hard = draw(st.sampled_from([1.0, 1.0, 30.0])), draw(layouts), draw(st.booleans())

    def make(d: Inputs):
        y = d.uniform(*shape)
        return [d.leaf(d.normal(*shape, scale=scale), layout), d.const(y.round() if hard else y)], dict(kwargs)

    return call("sigmoid_focal_loss", seed, make, finite_by_design=True, oracle=sigmoid_focal_definition)


@st.composite
def softmax_target_calls(draw, name: str) -> Call:
    seed = draw(seeds)
    c = draw(st.sampled_from([1, 2, 5]))
    form = draw(st.sampled_from(["unbatched", "rows", "spatial"]))
    n = draw(batches)
    shape = (c,) if form == "unbatched" else (n, c, 3) if form == "spatial" else (n, c)
    target_shape = () if form == "unbatched" else (n, 3) if form == "spatial" else (n,)
    ignore_index = draw(st.sampled_from([-100, 0]))
    some_ignored = draw(st.booleans())
    kwargs: dict[str, Any] = {"ignore_index": ignore_index, "reduction": draw(st.sampled_from(REDUCTIONS))}
    if name == "softmax_focal_loss":
        kwargs["gamma"] = draw(st.sampled_from([0.0, 0.5, 2.0]))
        alpha = draw(st.sampled_from([None, 0.25, "per_class"]))
    else:
        kwargs["epsilon"] = draw(st.sampled_from([1.0, -0.5, 2.0]))
        alpha = None
    scale, layout = draw(st.sampled_from([1.0, 1.0, 30.0])), draw(layouts) if form == "rows" else "contiguous"

    def make(d: Inputs):
        x = d.leaf(d.normal(*shape, scale=scale), layout)
        target = d.index(c, *target_shape)
        if some_ignored and target.numel():
            target.view(-1)[::2] = ignore_index
        extra = dict(kwargs)
        if alpha == "per_class":
            extra["alpha"] = d.const(d.uniform(c, low=0.1, high=1.0))
        elif alpha is not None:
            extra["alpha"] = alpha
        return [x, target], extra

    oracle = softmax_focal_definition if name == "softmax_focal_loss" else poly1_definition
    return call(name, seed, make, finite_by_design=True, oracle=oracle)


# ---- one strategy per loss -----------------------------------------------------------------

STRATEGIES: dict[str, Callable[[], st.SearchStrategy[Call]]] = {
    "cross_entropy": lambda: class_index_calls("cross_entropy"),
    "nll_loss": lambda: class_index_calls("nll_loss"),
    "binary_cross_entropy": lambda: binary_calls("binary_cross_entropy"),
    "binary_cross_entropy_with_logits": lambda: binary_calls("binary_cross_entropy_with_logits"),
    "mse_loss": lambda: regression_calls("mse_loss"),
    "l1_loss": lambda: regression_calls("l1_loss"),
    "smooth_l1_loss": lambda: regression_calls("smooth_l1_loss"),
    "huber_loss": lambda: regression_calls("huber_loss"),
    "poisson_nll_loss": lambda: regression_calls("poisson_nll_loss"),
    "gaussian_nll_loss": gaussian_calls,
    "kl_div": kl_calls,
    "soft_margin_loss": lambda: margin_calls("soft_margin_loss"),
    "multilabel_soft_margin_loss": lambda: margin_calls("multilabel_soft_margin_loss"),
    "multi_margin_loss": lambda: margin_calls("multi_margin_loss"),
    "multilabel_margin_loss": lambda: margin_calls("multilabel_margin_loss"),
    "margin_ranking_loss": lambda: margin_calls("margin_ranking_loss"),
    "hinge_embedding_loss": lambda: margin_calls("hinge_embedding_loss"),
    "cosine_embedding_loss": lambda: margin_calls("cosine_embedding_loss"),
    "triplet_margin_loss": lambda: margin_calls("triplet_margin_loss"),
    "ctc_loss": ctc_calls,
    "linear_cross_entropy": linear_calls,
    # beyond torch, against their written-out definitions
    "sigmoid_focal_loss": sigmoid_focal_calls,
    "softmax_focal_loss": lambda: softmax_target_calls("softmax_focal_loss"),
    "poly1_cross_entropy": lambda: softmax_target_calls("poly1_cross_entropy"),
}
