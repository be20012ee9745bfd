"""Catalog: regression losses. For each loss, its example, mistakes and curve as functions,
then its Entry; nothing runs at import (see :mod:`losskit.catalog.records`)."""

from __future__ import annotations

import torch

import losskit.functional as F
import losskit.keras as K

from .records import REDUCTION, Curve, Entry, Mistake


# ---- mean squared error ---------------------------------------------------------------------
def mse_example():
    return F.mse_loss(torch.tensor([2.5, 0.0, 2.0]), torch.tensor([3.0, -0.5, 2.0]))  # (0.25 + 0.25 + 0) / 3


def mse_mistake_broadcast():
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 2.0, 3.0])
    return {
        'broadcast [3,1] vs [3]': F.mse_loss(x, y).item(),
        'same shape': F.mse_loss(x.squeeze(1), y).item(),
    }


def mse_curve(x):
    return F.mse_loss(x, torch.zeros_like(x), reduction='none')


MSE = Entry(
    key="mse", title="Mean squared error", family="regression", problems=("regression",),
    covers=("functional.mse_loss", "nn.MSELoss", "keras.mean_squared_error", "keras.MeanSquaredError"),
    torch=("torch.nn.MSELoss",), keras=("keras.losses.MeanSquaredError", "mse"),
    aliases=("l2", "l2_loss", "squared_error", "mean_squared_error"),
    prediction="any real numbers, the prediction itself (no activation)", target="real numbers, same shape",
    output_layer="linear (no activation)",
    formula=r"\ell = \frac{1}{n}\sum_i (x_i - y_i)^2", formula_text="mean over i of (x_i - y_i)^2",
    summary="The default for regression: the mean of the squared errors. Its minimiser is the conditional mean.",
    properties={"convex": "yes", "bounded": "no: grows with the square of the error",
                "robust to outliers": "no: one large error dominates (its gradient is 2 e)"},
    options={"reduction": REDUCTION, "weight": "per-element weights (torch 2.13); 'mean' divides by their sum"},
    example=mse_example,
    mistakes=(
        Mistake("Target shape differs from the prediction's",
                "A [N, 1] prediction against a [N] target broadcasts to [N, N]: every prediction is compared "
                "with every target. losskit warns; the loss is wrong.",
                mse_mistake_broadcast),
    ),
    torch_vs_keras="Keras averages over the last axis first, then applies the reduction over samples; for "
                   "equal-sized samples the mean is the same.",
    curve=Curve(mse_curve, "error x - y", (-3.0, 3.0)),
)


# ---- mean absolute error --------------------------------------------------------------------
def mae_example():
    return F.l1_loss(torch.tensor([2.5, 0.0, 2.0]), torch.tensor([3.0, -0.5, 2.0]))  # (0.5 + 0.5 + 0) / 3


def mae_curve(x):
    return F.l1_loss(x, torch.zeros_like(x), reduction='none')


MAE = Entry(
    key="mae", title="Mean absolute error", family="regression", problems=("regression",),
    covers=("functional.l1_loss", "nn.L1Loss", "keras.mean_absolute_error", "keras.MeanAbsoluteError"),
    torch=("torch.nn.L1Loss",), keras=("keras.losses.MeanAbsoluteError", "mae"),
    aliases=("l1", "absolute_error"),
    prediction="any real numbers (no activation)", target="real numbers, same shape",
    output_layer="linear (no activation)",
    formula=r"\ell = \frac{1}{n}\sum_i |x_i - y_i|", formula_text="mean over i of |x_i - y_i|",
    summary="The mean of the absolute errors. Its minimiser is the conditional median.",
    properties={"convex": "yes", "bounded": "no, but grows only linearly",
                "robust to outliers": "yes: every error pulls with the same force (gradient ±1)"},
    options={"reduction": REDUCTION, "weight": "per-element weights (torch 2.13)"},
    example=mae_example,
    torch_vs_keras="Same value; Keras averages the last axis first.",
    curve=Curve(mae_curve, "error x - y", (-3.0, 3.0)),
)


# ---- Huber ----------------------------------------------------------------------------------
def huber_example():
    return F.huber_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]), delta=2.0)  # (0.125 + 4) / 2


def huber_curve(x, **options):
    return F.huber_loss(x, torch.zeros_like(x), reduction='none', **options)


HUBER = Entry(
    key="huber", title="Huber loss", family="regression", problems=("regression",),
    covers=("functional.huber_loss", "nn.HuberLoss", "keras.huber", "keras.Huber"),
    torch=("torch.nn.HuberLoss",), keras=("keras.losses.Huber",), aliases=("huber_loss",),
    prediction="any real numbers (no activation)", target="real numbers, same shape",
    output_layer="linear (no activation)",
    formula=r"\ell = \begin{cases} \tfrac12 e^2 & |e| < \delta \\ \delta(|e| - \tfrac12\delta) & \text{otherwise}\end{cases}",
    formula_text="0.5 e^2 where |e| < delta, else delta (|e| - delta / 2); e = x - y",
    summary="Quadratic for small errors, linear for large ones: MSE's smoothness with MAE's robustness.",
    properties={"convex": "yes", "bounded": "no (linear growth)", "robust to outliers": "yes, beyond delta"},
    options={"delta": "where the quadratic turns linear (> 0)", "reduction": REDUCTION,
             "weight": "per-element weights"},
    example=huber_example,
    torch_vs_keras="Keras' `delta` is torch's `delta`; same value.",
    curve=Curve(huber_curve, "error x - y", (-3.0, 3.0), ({"delta": 0.5}, {"delta": 1.0}, {"delta": 2.0})),
)


# ---- smooth L1 ------------------------------------------------------------------------------
def smooth_l1_example():
    return F.smooth_l1_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))  # (0.125 + 2.5) / 2


def smooth_l1_curve(x, **options):
    return F.smooth_l1_loss(x, torch.zeros_like(x), reduction='none', **options)


SMOOTH_L1 = Entry(
    key="smooth_l1", title="Smooth L1 loss", family="regression", problems=("regression", "box regression"),
    covers=("functional.smooth_l1_loss", "nn.SmoothL1Loss"), torch=("torch.nn.SmoothL1Loss",), keras=(),
    aliases=("smoothl1",),
    prediction="any real numbers (no activation)", target="real numbers, same shape",
    output_layer="linear (no activation)",
    formula=r"\ell = \begin{cases} \tfrac{1}{2\beta} e^2 & |e| < \beta \\ |e| - \tfrac12\beta & \text{otherwise}\end{cases}",
    formula_text="0.5 e^2 / beta where |e| < beta, else |e| - beta / 2",
    summary="Huber divided by beta: the detection-box loss of Fast R-CNN. beta = 0 gives L1.",
    properties={"convex": "yes", "bounded": "no (linear growth)", "robust to outliers": "yes, beyond beta"},
    options={"beta": "where the quadratic turns linear (>= 0)", "reduction": REDUCTION},
    example=smooth_l1_example,
    curve=Curve(smooth_l1_curve, "error x - y", (-3.0, 3.0), ({"beta": 0.5}, {"beta": 1.0}, {"beta": 2.0})),
)


# ---- log-cosh -------------------------------------------------------------------------------
def log_cosh_example():
    return K.log_cosh(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]]))  # log(cosh(1)) / 2


def log_cosh_curve(x):
    return K.log_cosh(torch.zeros_like(x)[:, None], x[:, None])


LOG_COSH = Entry(
    key="log_cosh", title="Log-cosh loss", family="regression", problems=("regression",),
    covers=("keras.log_cosh", "keras.LogCosh"), torch=(), keras=("keras.losses.LogCosh",), aliases=("logcosh",),
    prediction="any real numbers (no activation)", target="real numbers, same shape",
    output_layer="linear (no activation)",
    formula=r"\ell = \frac{1}{n}\sum_i \log\cosh(x_i - y_i)", formula_text="mean of log(cosh(x - y))",
    summary="Like MSE near 0 and like MAE far away, smooth everywhere.",
    properties={"convex": "yes", "bounded": "no (linear growth)", "robust to outliers": "yes"},
    options={"reduction": "Keras reductions: 'sum_over_batch_size' (default), 'sum', 'none', ..."},
    example=log_cosh_example,
    curve=Curve(log_cosh_curve, "error", (-3.0, 3.0)),
)


# ---- mean absolute percentage error ---------------------------------------------------------
def mape_example():
    return K.mean_absolute_percentage_error(torch.tensor([[100.0, 50.0]]), torch.tensor([[110.0, 45.0]]))


def mape_curve(x):
    return K.mean_absolute_percentage_error(torch.ones_like(x)[:, None], x[:, None])


MAPE = Entry(
    key="mape", title="Mean absolute percentage error", family="regression", problems=("regression",),
    covers=("keras.mean_absolute_percentage_error", "keras.MeanAbsolutePercentageError"), torch=(),
    keras=("keras.losses.MeanAbsolutePercentageError", "mape"), aliases=(),
    prediction="real numbers", target="real numbers, not near 0", output_layer="linear (no activation)",
    formula=r"\ell = \frac{100}{n}\sum_i \frac{|y_i - x_i|}{\max(|y_i|, \epsilon)}",
    formula_text="100 * mean of |y - x| / max(|y|, eps)",
    summary="Error relative to the target, in percent.",
    properties={"convex": "yes in x", "bounded": "no", "robust to outliers": "no; explodes for targets near 0"},
    options={"reduction": "Keras reductions"},
    example=mape_example,
    curve=Curve(mape_curve, "prediction (target 1)", (-1.0, 3.0)),
)


# ---- mean squared logarithmic error ---------------------------------------------------------
def msle_example():
    return K.mean_squared_logarithmic_error(torch.tensor([[0.0, 9.0]]), torch.tensor([[0.0, 99.0]]))


def msle_curve(x):
    return K.mean_squared_logarithmic_error(torch.ones_like(x)[:, None], x[:, None])


MSLE = Entry(
    key="msle", title="Mean squared logarithmic error", family="regression", problems=("regression",),
    covers=("keras.mean_squared_logarithmic_error", "keras.MeanSquaredLogarithmicError"), torch=(),
    keras=("keras.losses.MeanSquaredLogarithmicError", "msle"), aliases=(),
    prediction="non-negative numbers", target="non-negative numbers", output_layer="softplus or relu",
    formula=r"\ell = \frac{1}{n}\sum_i (\log(1 + x_i) - \log(1 + y_i))^2",
    formula_text="mean of (log(1 + x) - log(1 + y))^2",
    summary="MSE of log(1 + value): relative errors for targets spanning orders of magnitude.",
    properties={"convex": "no", "bounded": "no", "robust to outliers": "partly (log scale)"},
    options={"reduction": "Keras reductions"},
    example=msle_example,
    curve=Curve(msle_curve, "prediction (target 1)", (0.0, 5.0)),
)


# ---- Poisson --------------------------------------------------------------------------------
def poisson_nll_example():
    return F.poisson_nll_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))  # (1 + e - 2) / 2


def poisson_nll_curve(x):
    return F.poisson_nll_loss(x, torch.full_like(x, 2.0), reduction='none')


POISSON_NLL = Entry(
    key="poisson_nll", title="Poisson negative log-likelihood", family="regression", problems=("count regression",),
    covers=("functional.poisson_nll_loss", "nn.PoissonNLLLoss", "keras.poisson", "keras.Poisson"),
    torch=("torch.nn.PoissonNLLLoss",), keras=("keras.losses.Poisson",), aliases=("poisson",),
    prediction="log-rate (log_input=True, default) or rate", target="counts >= 0",
    output_layer="linear for the log-rate; exp/softplus for the rate",
    formula=r"\ell = e^{x} - y\,x \;\;(\text{log\_input}), \qquad x - y \log(x + \epsilon)",
    formula_text="exp(x) - y x (log_input), else x - y log(x + eps)",
    summary="For counts: the negative log-likelihood of a Poisson distribution, without the constant log(y!).",
    properties={"convex": "yes in the log-rate", "bounded": "no", "robust to outliers": "no"},
    options={"log_input": "whether input is the log-rate", "full": "add Stirling's log(y!) term",
             "eps": "keeps log finite when log_input=False", "reduction": REDUCTION},
    example=poisson_nll_example,
    torch_vs_keras="Keras' poisson takes the rate (x - y log x, like log_input=False).",
    curve=Curve(poisson_nll_curve, "log-rate (count 2)", (-2.0, 3.0)),
)


# ---- Gaussian -------------------------------------------------------------------------------
def gaussian_nll_example():
    return F.gaussian_nll_loss(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([1.0]))  # 0.5 (0 + 1)


def gaussian_nll_curve(x):
    return F.gaussian_nll_loss(x, torch.zeros_like(x), torch.ones_like(x), reduction='none')


GAUSSIAN_NLL = Entry(
    key="gaussian_nll", title="Gaussian negative log-likelihood", family="regression",
    problems=("regression with uncertainty",),
    covers=("functional.gaussian_nll_loss", "nn.GaussianNLLLoss"), torch=("torch.nn.GaussianNLLLoss",), keras=(),
    aliases=("gaussian",),
    prediction="mean, and a variance > 0 (a second output, e.g. through softplus)", target="real numbers",
    output_layer="linear for the mean; softplus for the variance",
    formula=r"\ell = \tfrac12\left(\log \max(\sigma^2, \epsilon) + \frac{(x - y)^2}{\max(\sigma^2, \epsilon)}\right)",
    formula_text="0.5 (log var + (x - y)^2 / var), var clamped at eps",
    summary="Learns a mean and a variance per prediction: errors where the model is unsure cost less.",
    properties={"convex": "in the mean, yes", "bounded": "no", "robust to outliers": "the variance absorbs them"},
    options={"full": "add the constant 0.5 log(2 pi)", "eps": "variance clamp (value only)", "reduction": REDUCTION},
    example=gaussian_nll_example,
    curve=Curve(gaussian_nll_curve, "error (variance 1)", (-3.0, 3.0)),
)

ENTRIES = [MSE, MAE, HUBER, SMOOTH_L1, LOG_COSH, MAPE, MSLE, POISSON_NLL, GAUSSIAN_NLL]
