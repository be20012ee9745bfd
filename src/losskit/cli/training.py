"""The two training demos of the tour: a loss driving a linear model to its optimum."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from .. import functional as F
from .datasets import Split

# The tutorial's data: heights (cm) and weights (kg) of ten people.
HEIGHTS_CM = [152.4, 157.5, 160.0, 165.1, 172.7, 177.8, 185.4, 190.5, 195.6, 203.2]
WEIGHTS_KG = [50.0, 54.4, 56.7, 59.0, 63.5, 68.0, 72.6, 77.1, 81.6, 90.7]


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (a no-op one when disabled)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, mininterval=0.25, disable=not enabled)


@dataclass
class RegressionResult:
    slope: float
    intercept: float
    final_mse: float
    optimum_mse: float  # the least-squares optimum, solved in closed form
    history: list[float] = field(repr=False)


def fit_height_weight(steps: int = 10_000, lr: float = 0.1, seed: int = 0, progress: bool = True) -> RegressionResult:
    """Fit weight = slope * height + intercept with losskit's mse_loss and Adam.

    On the raw (unscaled) heights Adam's per-parameter step sizes still reach the
    least-squares line; its MSE is the floor that no straight line can beat.
    """
    x = torch.tensor(HEIGHTS_CM).unsqueeze(1)
    y = torch.tensor(WEIGHTS_KG).unsqueeze(1)
    torch.manual_seed(seed)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    with _progress_bar(steps, "linear regression (MSE, Adam)", progress) as bar:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            history.append(loss.item())
            bar.update()
    with torch.no_grad():
        final = F.mse_loss(model(x), y).item()
    design = torch.cat([x.double(), torch.ones_like(x).double()], dim=1)
    solution = torch.linalg.lstsq(design, y.double()).solution
    optimum = F.mse_loss(design @ solution, y.double()).item()
    return RegressionResult(model.weight.item(), model.bias.item(), final, optimum, history)


@dataclass
class ClassifierResult:
    test_accuracy: float
    final_train_loss: float
    epoch_losses: list[float]  # mean training loss of each epoch
    batch_losses: list[float] = field(repr=False)


def train_softmax_classifier(
    data: Split,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> ClassifierResult:
    """A linear softmax classifier (logits = W x + b) trained by SGD on losskit's cross_entropy."""
    torch.manual_seed(seed)
    num_classes = int(data.train_y.max()) + 1
    model = torch.nn.Linear(data.num_features, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order_rng = torch.Generator().manual_seed(seed)
    n = len(data.train_x)
    batches_per_epoch = -(-n // batch_size)
    batch_losses: list[float] = []
    epoch_losses: list[float] = []
    with _progress_bar(epochs * batches_per_epoch, f"softmax classifier ({data.name})", progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=order_rng)
            start = len(batch_losses)
            for i in range(0, n, batch_size):
                index = order[i : i + batch_size]
                optimizer.zero_grad()
                loss = F.cross_entropy(model(data.train_x[index]), data.train_y[index])
                loss.backward()
                optimizer.step()
                batch_losses.append(loss.item())
                bar.update()
            epoch_losses.append(sum(batch_losses[start:]) / (len(batch_losses) - start))
    with torch.no_grad():
        accuracy = (model(data.test_x).argmax(dim=1) == data.test_y).float().mean().item()
    return ClassifierResult(accuracy, batch_losses[-1], epoch_losses, batch_losses)

