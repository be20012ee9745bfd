"""`losskit tour`: the tutorials' worked examples, each printed beside the value it should have."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as torch_F

from .. import functional as F
from .. import info
from .datasets import load_digits, load_mnist
from .training import HEIGHTS_CM, WEIGHTS_KG, fit_height_weight, train_softmax_classifier

MNIST_TUTORIAL_ACCURACY = 0.9180  # what the tutorial reports for the same classifier on MNIST


@dataclass
class Check:
    """One worked example: losskit's value beside the expected one and where that comes from."""

    what: str
    ours: float
    expected: float
    source: str
    tolerance: float = 1e-6

    @property
    def ok(self) -> bool:
        return abs(self.ours - self.expected) <= self.tolerance


class Report:
    def __init__(self) -> None:
        self.checks: list[Check] = []

    def section(self, title: str, note: str = "") -> None:
        print(f"\n== {title} ==")
        if note:
            print(f"   {note}")

    def check(self, what: str, ours: float, expected: float, source: str, tolerance: float = 1e-6) -> None:
        row = Check(what, ours, expected, source, tolerance)
        self.checks.append(row)
        mark = "ok" if row.ok else "MISMATCH"
        print(f"   {what:<52} losskit {ours:>9.4f}   expected {expected:>9.4f} ({source})  {mark}")

    def line(self, text: str) -> None:
        print(f"   {text}")


def _entropy(report: Report) -> None:
    report.section("Entropy", "the average surprise of a distribution, in nats (natural log)")
    report.check("fair coin  H([1/2, 1/2])", info.entropy(torch.tensor([0.5, 0.5])).item(), 0.693, "tutorial", 5e-4)
    report.check("fair die   H([1/6] * 6)", info.entropy(torch.full((6,), 1 / 6)).item(), 1.792, "tutorial", 5e-4)
    report.check("fair coin in bits (base=2)", info.entropy(torch.tensor([0.5, 0.5]), base=2).item(), 1.0, "definition")


def _cross_entropy_by_hand(report: Report) -> None:
    report.section(
        "Cross-entropy of one prediction",
        "prediction [0.5, 0.1, 0.3] for true class 'lion' (index 2): only the true class's log counts",
    )
    prediction = torch.tensor([[0.5, 0.1, 0.3]])
    ours = F.nll_loss(prediction.log(), torch.tensor([2])).item()
    report.check("nll_loss(log(prediction), lion)", ours, 1.204, "tutorial: -ln(0.3)", 5e-4)
    try:
        info.cross_entropy(torch.tensor([0.0, 0.0, 1.0]), prediction[0])
    except ValueError as error:
        report.line(f"losskit.info refuses the prediction as a distribution: {error}")


def _binary(report: Report) -> None:
    report.section(
        "BCELoss vs BCEWithLogitsLoss",
        "BCE wants probabilities (after sigmoid); BCEWithLogits takes the raw logits and is stable",
    )
    logits = torch.tensor([1.5, -0.3, 0.8, -2.2])
    target = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expected = torch_F.binary_cross_entropy_with_logits(logits, target).item()
    report.check("BCELoss(sigmoid(logits), y)", F.binary_cross_entropy(torch.sigmoid(logits), target).item(), expected, "torch BCEWithLogits")
    report.check("BCEWithLogitsLoss(logits, y)", F.binary_cross_entropy_with_logits(logits, target).item(), expected, "torch BCEWithLogits")
    pos_weight = torch.tensor(3.0)
    report.check(
        "BCEWithLogitsLoss(..., pos_weight=3)",
        F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight).item(),
        torch_F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight).item(),
        "torch",
    )
    big = torch.tensor([100.0, -100.0])
    report.check(
        "logits +-100: BCEWithLogits stays exact",
        F.binary_cross_entropy_with_logits(big, torch.tensor([0.0, 1.0]), reduction="sum").item(),
        200.0,
        "definition",
    )


def _multiclass(report: Report) -> None:
    report.section(
        "CrossEntropyLoss on raw logits",
        "logits [[1.2, 0.5, -0.8], [-0.5, 0.8, 2.0]], targets [0, 2]; softmax is inside the loss",
    )
    logits = torch.tensor([[1.2, 0.5, -0.8], [-0.5, 0.8, 2.0]])
    target = torch.tensor([0, 2])
    # From scratch: log-softmax is x - log(sum(exp(x))); pick each row's target entry.
    log_softmax = logits - logits.exp().sum(dim=1, keepdim=True).log()
    by_hand = -log_softmax.gather(1, target.unsqueeze(1)).mean().item()
    ours = F.cross_entropy(logits, target).item()
    report.check("cross_entropy(logits, targets)", ours, torch_F.cross_entropy(logits, target).item(), "torch")
    report.check("log_softmax + gather, from scratch", by_hand, ours, "losskit")
    weight = torch.tensor([1.0, 2.0, 0.5])
    for label, kwargs in [
        ("weight=[1, 2, 0.5] (mean over summed weights)", {"weight": weight}),
        ("ignore_index: second target ignored", {"target": torch.tensor([0, -100])}),
        ("label_smoothing=0.1", {"label_smoothing": 0.1}),
        ("reduction='sum'", {"reduction": "sum"}),
    ]:
        t = kwargs.pop("target", target)
        report.check(label, F.cross_entropy(logits, t, **kwargs).item(), torch_F.cross_entropy(logits, t, **kwargs).item(), "torch")


def _sparse_vs_categorical(report: Report) -> None:
    report.section(
        "Sparse vs categorical cross-entropy",
        "Keras's two names for one loss: integer labels, or the same labels one-hot",
    )
    logits = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, 0.3], [0.2, 0.4, 3.0]])
    labels = torch.tensor([0, 1, 2])
    one_hot = torch.eye(3)[labels]
    sparse = F.cross_entropy(logits, labels).item()
    report.check("from integer labels (sparse)", sparse, torch_F.cross_entropy(logits, labels).item(), "torch")
    report.check("from one-hot labels (categorical)", F.cross_entropy(logits, one_hot).item(), sparse, "sparse")


def _regression_and_kl(report: Report) -> None:
    report.section("MSE, MAE and KL divergence")
    pred, true = torch.tensor([2.5, 0.0, 2.0]), torch.tensor([3.0, -0.5, 2.0])
    report.check("mse_loss: mean of squared errors", F.mse_loss(pred, true).item(), torch_F.mse_loss(pred, true).item(), "torch")
    report.check("l1_loss: mean of absolute errors", F.l1_loss(pred, true).item(), torch_F.l1_loss(pred, true).item(), "torch")
    p = torch.tensor([0.36, 0.48, 0.16], dtype=torch.float64)
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    definition = float((p * (p / q).log()).sum())
    report.check("KL(p || uniform), p = [0.36, 0.48, 0.16]", info.kl_divergence(p, q).item(), definition, "sum p ln(p/q)", 1e-12)
    report.check(
        "kl_div(log q, p, reduction='batchmean')",
        F.kl_div(q.log().unsqueeze(0), p.unsqueeze(0), reduction="batchmean").item(),
        definition,
        "sum p ln(p/q)",
        1e-12,
    )


def _linear_regression(report: Report, out: Path, progress: bool) -> None:
    report.section(
        "A loss drives training: weight from height",
        "MSE + Adam (lr 0.1, 10000 steps) on ten people's heights (cm) and weights (kg)",
    )
    result = fit_height_weight(progress=progress)
    report.line(f"fitted line: weight = {result.slope:.4f} * height {result.intercept:+.3f}")
    report.check("final MSE after 10000 Adam steps", result.final_mse, 1.8617, "tutorial", 1e-4)
    report.check("least-squares optimum MSE (closed form)", result.optimum_mse, 1.8617, "tutorial", 1e-4)
    path = _plot_regression(out, result.slope, result.intercept)
    report.line(f"plot: {path}")


def _classifier(report: Report, out: Path, mnist: Path | None, progress: bool) -> None:
    data = load_mnist(mnist) if mnist else load_digits()
    report.section(
        f"A loss drives training: softmax classifier on {data.name}",
        f"{len(data.train_x)} training / {len(data.test_x)} test images, {data.num_features} pixels; "
        "cross_entropy + SGD (lr 0.01, batch 64, 10 epochs)",
    )
    result = train_softmax_classifier(data, progress=progress)
    report.line("mean training loss per epoch: " + " ".join(f"{v:.3f}" for v in result.epoch_losses))
    report.line(f"test accuracy: {result.test_accuracy:.2%}")
    if mnist:
        report.line(f"(the tutorial reports {MNIST_TUTORIAL_ACCURACY:.2%} for this classifier on MNIST)")
    path = _plot_losses(out, result.batch_losses, result.epoch_losses, data.name)
    report.line(f"plot: {path}")


def _plot_regression(out: Path, slope: float, intercept: float) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.scatter(HEIGHTS_CM, WEIGHTS_KG, label="people")
    xs = [min(HEIGHTS_CM) - 5, max(HEIGHTS_CM) + 5]
    ax.plot(xs, [slope * x + intercept for x in xs], color="tab:red", label=f"fit: {slope:.3f} h {intercept:+.1f}")
    ax.set(xlabel="height (cm)", ylabel="weight (kg)", title="Linear regression trained on MSE")
    ax.legend()
    path = out / "regression.png"
    fig.savefig(path, bbox_inches="tight")
    return path


def _plot_losses(out: Path, batch_losses: list[float], epoch_losses: list[float], name: str) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    ax.plot(range(1, len(batch_losses) + 1), batch_losses, alpha=0.4, label="batch")
    per_epoch = len(batch_losses) / len(epoch_losses)
    ax.plot([per_epoch * (i + 1) for i in range(len(epoch_losses))], epoch_losses, marker="o", label="epoch mean")
    ax.set(xlabel="SGD step", ylabel="cross-entropy", title=f"Softmax classifier on {name}")
    ax.legend()
    path = out / "classifier_loss.png"
    fig.savefig(path, bbox_inches="tight")
    return path


def run_tour(out: Path, mnist: Path | None = None, progress: bool = True) -> int:
    """Run every worked example; return 0 when each matches its expected value, else 1."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print("losskit tour: each worked example beside the value the tutorial (or torch) gives")
    report = Report()
    _entropy(report)
    _cross_entropy_by_hand(report)
    _binary(report)
    _multiclass(report)
    _sparse_vs_categorical(report)
    _regression_and_kl(report)
    _linear_regression(report, out, progress)
    _classifier(report, out, mnist, progress)
    failed = [c for c in report.checks if not c.ok]
    print(
        f"\n{len(report.checks) - len(failed)} of {len(report.checks)} worked examples match"
        f" ({time.perf_counter() - start:.1f} s); plots in {out}/"
    )
    for check in failed:
        print(f"MISMATCH: {check.what}: losskit {check.ours!r}, expected {check.expected!r}", file=sys.stderr)
    return 1 if failed else 0

