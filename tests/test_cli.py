"""The `losskit` command end to end, and the IDX reader on small files the tests write."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from losskit.cli.datasets import load_digits, load_mnist, read_idx
from losskit.cli.main import main
from losskit.cli.training import fit_height_weight, train_softmax_classifier


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, compress: bool = False) -> None:
    """Write ``array`` in the IDX format: 0, 0, type code, ndim, big-endian dims, data."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_mnist(directory: Path, n_train: int = 300, n_test: int = 100, compress: bool = False) -> None:
    """A tiny learnable MNIST look-alike: class k lights up row 2k of a 28x28 image."""
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k, :] = 255
        write_idx(directory / f"{part}-images-idx3-ubyte{suffix}", images, compress=compress)
        write_idx(directory / f"{part}-labels-idx1-ubyte{suffix}", labels, compress=compress)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("type_code, array", [
    (0x08, np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
    (0x0B, np.array([-3, 0, 1000], dtype=np.int16)),
    (0x0D, np.array([[1.5, -2.25]], dtype=np.float32)),
])
def test_read_idx_round_trip(tmp_path, type_code, array, compress):
    path = tmp_path / "data.idx"
    write_idx(path, array, type_code, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "text")
    write_idx(tmp_path / "short", np.zeros((4, 4), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"IDX shape \(4, 4\) needs 28 bytes, the file has 25"):
        read_idx(tmp_path / "short")


def test_load_mnist(tmp_path):
    write_mnist(tmp_path, compress=True)
    data = load_mnist(tmp_path)
    assert data.train_x.shape == (300, 784) and data.test_x.shape == (100, 784)
    assert data.train_y.dtype == torch.int64 and int(data.train_y.max()) <= 9
    assert abs(float(data.train_x.mean())) < 1e-5  # standardised with the training statistics
    with pytest.raises(FileNotFoundError, match="no t10k-labels-idx1-ubyte"):
        (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
        load_mnist(tmp_path)


def test_linear_regression_reaches_the_least_squares_optimum():
    # The tutorial: MSE + Adam (lr 0.1, 10000 steps) converges to 1.8617, the LS optimum.
    result = fit_height_weight(progress=False)
    assert result.optimum_mse == pytest.approx(1.8617, abs=1e-4)
    assert result.final_mse == pytest.approx(result.optimum_mse, abs=1e-4)


def test_classifier_learns_digits():
    data = load_digits()
    result = train_softmax_classifier(data, progress=False)
    assert len(result.epoch_losses) == 10
    assert result.epoch_losses[-1] < result.epoch_losses[0] * 0.6
    assert result.test_accuracy > 0.8  # chance is 0.1


def test_tour_end_to_end(tmp_path, capsys):
    assert main(["tour", "--out", str(tmp_path / "plots"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for expected in ("0.6931", "1.7918", "1.2040", "1.8617", "test accuracy", "22 of 22 worked examples match"):
        assert expected in out
    assert "MISMATCH" not in out
    for name in ("regression.png", "classifier_loss.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tour_on_mnist_files(tmp_path):
    # Through the real entry point (python -m losskit) on IDX files written here.
    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist")
    run = subprocess.run(
        [sys.executable, "-m", "losskit", "tour", "--mnist", str(tmp_path / "mnist"), "--out", str(tmp_path / "plots"),
         "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "softmax classifier on MNIST" in run.stdout
    assert "300 training / 100 test images, 784 pixels" in run.stdout
    assert "the tutorial reports 91.80%" in run.stdout
