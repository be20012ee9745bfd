"""losskit.keras against Keras 3 itself (torch backend), on the same torch tensors."""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported

import keras  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import losskit.keras as LK  # noqa: E402
from compare import check_against_torch, check_raises  # noqa: E402

N, C = 6, 5


def probs(shape=(N, C)):
    return torch.softmax(torch.randn(shape) * 2, -1).requires_grad_()


def one_hot(shape=(N, C)):
    return torch.nn.functional.one_hot(torch.randint(0, shape[-1], shape[:-1]), shape[-1]).float()


CASES = {
    # name: (kwargs, y_true, y_pred) makers
    "binary_crossentropy": [
        ({}, lambda: torch.randint(0, 2, (N, C)).float(), lambda: torch.rand(N, C).requires_grad_()),
        ({"from_logits": True, "label_smoothing": 0.2}, lambda: torch.randint(0, 2, (N, C)).float(),
         lambda: (torch.randn(N, C) * 3).requires_grad_()),
        ({"label_smoothing": 0.1}, lambda: torch.randint(0, 2, (N, C)).float(),
         lambda: torch.tensor([[0.0, 1.0, 0.5, 1e-9, 1.0]] * N).requires_grad_()),  # clipped at 1e-7
    ],
    "categorical_crossentropy": [
        ({}, one_hot, lambda: (torch.rand(N, C) + 0.01).requires_grad_()),  # not normalised: Keras renormalises
        ({"from_logits": True, "label_smoothing": 0.1}, one_hot, lambda: torch.randn(N, C).requires_grad_()),
        ({"axis": 1}, lambda: one_hot((2, 3, C)).movedim(-1, 1), lambda: probs((2, 3, C)).movedim(-1, 1)),
    ],
    "sparse_categorical_crossentropy": [
        ({}, lambda: torch.randint(0, C, (N,)), probs),
        ({"from_logits": True}, lambda: torch.randint(0, C, (N, 1)), lambda: torch.randn(N, C).requires_grad_()),
        ({"from_logits": True, "ignore_class": 2}, lambda: torch.tensor([0, 2, 1, 2, 4, 3]),
         lambda: torch.randn(N, C).requires_grad_()),
        ({"ignore_class": -1}, lambda: torch.tensor([0, -1, 1, -1, 4, 3]), probs),
    ],
    "kl_divergence": [({}, lambda: probs().detach(), probs)],
    "poisson": [({}, lambda: torch.poisson(torch.full((N, C), 2.0)), lambda: (torch.rand(N, C) * 3).requires_grad_())],
    "mean_squared_error": [({}, lambda: torch.randn(N, C), lambda: torch.randn(N, C).requires_grad_()),
                           ({}, lambda: torch.randn(N, 1), lambda: torch.randn(N).requires_grad_())],
    "mean_absolute_error": [({}, lambda: torch.randn(N, C), lambda: torch.randn(N, C).requires_grad_())],
    "mean_absolute_percentage_error": [({}, lambda: torch.randn(N, C), lambda: torch.randn(N, C).requires_grad_())],
    "mean_squared_logarithmic_error": [({}, lambda: torch.rand(N, C) * 5,
                                        lambda: (torch.randn(N, C) * 3).requires_grad_())],
    "huber": [({"delta": 0.7}, lambda: torch.randn(N, C), lambda: (torch.randn(N, C) * 2).requires_grad_())],
    "log_cosh": [({}, lambda: torch.randn(N, C), lambda: (torch.randn(N, C) * 30).requires_grad_())],
    "hinge": [({}, lambda: torch.randint(0, 2, (N, C)).float(), lambda: torch.randn(N, C).requires_grad_()),
              ({}, lambda: torch.randint(0, 2, (N, C)).float() * 2 - 1, lambda: torch.randn(N, C).requires_grad_())],
    "squared_hinge": [({}, lambda: torch.randint(0, 2, (N, C)).float(), lambda: torch.randn(N, C).requires_grad_())],
    "categorical_hinge": [({}, one_hot, lambda: torch.randn(N, C).requires_grad_())],
    "binary_focal_crossentropy": [
        ({}, lambda: torch.randint(0, 2, (N, C)).float(), lambda: torch.rand(N, C).requires_grad_()),
        ({"apply_class_balancing": True, "alpha": 0.4, "gamma": 1.5, "from_logits": True, "label_smoothing": 0.1},
         lambda: torch.randint(0, 2, (N, C)).float(), lambda: (torch.randn(N, C) * 2).requires_grad_()),
    ],
    "categorical_focal_crossentropy": [
        ({}, one_hot, lambda: (torch.rand(N, C) + 0.01).requires_grad_()),
        ({"from_logits": True, "label_smoothing": 0.1, "alpha": 0.5, "gamma": 1.0}, one_hot,
         lambda: torch.randn(N, C).requires_grad_()),
    ],
    "categorical_generalized_cross_entropy": [
        ({"q": 0.5}, lambda: torch.randint(0, C, (N,)), probs),
        ({"q": 1.0}, lambda: torch.randint(0, C, (N,)), probs),
    ],
    "dice": [
        ({}, lambda: torch.randint(0, 2, (N, C)).float(), lambda: torch.rand(N, C).requires_grad_()),
        ({"axis": 1}, lambda: torch.randint(0, 2, (N, C)).float(), lambda: torch.rand(N, C).requires_grad_()),
    ],
    "tversky": [
        ({"alpha": 0.3, "beta": 0.7}, lambda: torch.randint(0, 2, (N, C)).float(), lambda: torch.rand(N, C).requires_grad_()),
        ({"axis": 1}, lambda: torch.randint(0, 2, (N, C)).float(), lambda: torch.rand(N, C).requires_grad_()),
    ],
    "cosine_similarity": [({}, lambda: torch.randn(N, C), lambda: torch.randn(N, C).requires_grad_()),
                          ({"axis": 0}, lambda: torch.randn(N, C), lambda: torch.randn(N, C).requires_grad_())],
}
FUNCTION_CASES = [(name, i) for name, cases in CASES.items() for i in range(len(cases))]


@pytest.mark.parametrize("name, index", FUNCTION_CASES, ids=[f"{n}-{i}" for n, i in FUNCTION_CASES])
def test_function_matches_keras(name, index):
    kwargs, make_true, make_pred = CASES[name][index]
    check_against_torch(
        lambda t, p: getattr(LK, name)(t, p, **kwargs),
        lambda t, p: getattr(keras.losses, name)(t, p, **kwargs),
        make_true(), make_pred(), atol=1e-5, rtol=1e-5,
    )


CLASSES = [
    ("BinaryCrossentropy", {"from_logits": True, "label_smoothing": 0.1}, "binary_crossentropy", 1),
    ("CategoricalCrossentropy", {"label_smoothing": 0.2}, "categorical_crossentropy", 0),
    ("SparseCategoricalCrossentropy", {"from_logits": True}, "sparse_categorical_crossentropy", 1),
    ("SparseCategoricalCrossentropy", {"from_logits": True, "ignore_class": 2}, "sparse_categorical_crossentropy", 2),
    ("KLDivergence", {}, "kl_divergence", 0),
    ("Poisson", {}, "poisson", 0),
    ("MeanSquaredError", {}, "mean_squared_error", 0),
    ("MeanAbsoluteError", {}, "mean_absolute_error", 0),
    ("MeanAbsolutePercentageError", {}, "mean_absolute_percentage_error", 0),
    ("MeanSquaredLogarithmicError", {}, "mean_squared_logarithmic_error", 0),
    ("Huber", {"delta": 0.5}, "huber", 0),
    ("LogCosh", {}, "log_cosh", 0),
    ("Hinge", {}, "hinge", 0),
    ("SquaredHinge", {}, "squared_hinge", 0),
    ("CategoricalHinge", {}, "categorical_hinge", 0),
    ("CosineSimilarity", {"axis": -1}, "cosine_similarity", 0),
    ("BinaryFocalCrossentropy", {"apply_class_balancing": True, "alpha": 0.4, "gamma": 1.5, "from_logits": True,
                                 "label_smoothing": 0.1}, "binary_focal_crossentropy", 1),
    ("CategoricalFocalCrossentropy", {"from_logits": True, "gamma": 1.0}, "categorical_focal_crossentropy", 1),
    ("CategoricalGeneralizedCrossEntropy", {"q": 0.7}, "categorical_generalized_cross_entropy", 0),
    ("Dice", {"axis": 1}, "dice", 1),
    ("Tversky", {"alpha": 0.2, "beta": 0.8, "axis": 1}, "tversky", 1),
]
REDUCTIONS = ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"]


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name, kwargs, function, index", CLASSES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CLASSES)])
def test_class_matches_keras(name, kwargs, function, index, reduction, weighted):
    _, make_true, make_pred = CASES[function][index]
    sample_weight = torch.rand(N) + 0.1 if weighted else None
    ours = getattr(LK, name)(reduction=reduction, **kwargs)
    theirs = getattr(keras.losses, name)(reduction=reduction, **kwargs)
    check_against_torch(
        lambda t, p: ours(t, p, sample_weight=sample_weight),
        # Keras multiplies the mask into sample_weight in place: give it its own copy.
        lambda t, p: theirs(t, p, sample_weight=None if sample_weight is None else sample_weight.clone()),
        make_true(), make_pred(), atol=1e-5, rtol=1e-5,
    )


def test_all_ignored_gives_zero_like_keras():
    y_true, y_pred = torch.full((4,), 3), torch.randn(4, 5)
    for reduction in REDUCTIONS:
        ours = LK.SparseCategoricalCrossentropy(from_logits=True, ignore_class=3, reduction=reduction)(y_true, y_pred)
        theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=3, reduction=reduction)(
            y_true, y_pred)
        torch.testing.assert_close(ours, theirs)
    assert float(LK.SparseCategoricalCrossentropy(from_logits=True, ignore_class=3)(y_true, y_pred)) == 0.0


def test_integer_labels_equal_one_hot_labels():
    labels = torch.randint(0, C, (N,))
    logits = torch.randn(N, C)
    torch.testing.assert_close(
        LK.sparse_categorical_crossentropy(labels, logits, from_logits=True),
        LK.categorical_crossentropy(torch.nn.functional.one_hot(labels, C).float(), logits, from_logits=True),
    )


def test_works_as_the_loss_of_a_keras_model():
    keras.utils.set_random_seed(0)
    x = torch.randn(256, 8)
    labels = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()  # three learnable classes
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=LK.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x.numpy(), labels.numpy(), epochs=8, batch_size=32, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.6 * losses[0]


def test_keras_bad_input():
    check_raises(LK.binary_crossentropy, torch.ones(3, 2), torch.rand(3, 1),
                 match="binary_crossentropy: y_true shape (3, 2) must match y_pred shape (3, 1)")
    check_raises(LK.sparse_categorical_crossentropy, torch.ones(4), torch.rand(3, 2),
                 match="y_true shape (4,) must be y_pred's without its class axis, (3,)")
    check_raises(LK.MeanSquaredError, reduction="avg", match="reduction must be one of")
    with pytest.raises(TypeError, match="unexpected argument"):
        LK.Huber(beta=1.0)


def test_positional_arguments_follow_keras_order():
    y_true, y_pred = torch.randint(0, 2, (N, C)).float(), torch.rand(N, C)
    torch.testing.assert_close(LK.Dice("sum", "d", 1)(y_true, y_pred), keras.losses.Dice("sum", "d", 1)(y_true, y_pred))
    torch.testing.assert_close(LK.Tversky(0.3, 0.7, "sum")(y_true, y_pred),
                               keras.losses.Tversky(0.3, 0.7, "sum")(y_true, y_pred))
    torch.testing.assert_close(LK.BinaryFocalCrossentropy(True, 0.4)(y_true, y_pred),
                               keras.losses.BinaryFocalCrossentropy(True, 0.4)(y_true, y_pred))
    check_raises(LK.categorical_generalized_cross_entropy, torch.tensor([0]), torch.rand(1, 3), q=0.0,
                 match="q must be in (0, 1]; got 0.0")
