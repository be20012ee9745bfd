"""Data for the training demos: MNIST from IDX files the user has, and scikit-learn's digits.

Nothing is downloaded: MNIST is read from a folder the user names, and the 8x8 digits ship
inside scikit-learn.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# IDX type codes (third byte of the magic number) and the big-endian dtypes they denote.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed, into an array.

    The header is two zero bytes, a type code, the number of dimensions, then each
    dimension as a big-endian int32; the data follow in row-major order.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions but the file ends at byte {len(raw)}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX shape {shape} needs {expected} bytes, the file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(directory: Path, stem: str) -> Path:
    """The file for ``stem``, accepting the .gz and the 'train-images.idx3-ubyte' spellings."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {stem} (or {stem}.gz) found; expected the four MNIST IDX files there")


@dataclass
class Split:
    """Flattened float features and int64 labels of a classification data set."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    name: str

    @property
    def num_features(self) -> int:
        return self.train_x.shape[1]


def load_mnist(directory: str | Path) -> Split:
    """MNIST from its four IDX files, pixels scaled to [0, 1] and standardised with the
    training set's mean and std (the tutorial's Normalize((0.1307,), (0.3081,)))."""
    directory = Path(directory)
    arrays = {key: read_idx(_find(directory, stem)) for key, stem in MNIST_FILES.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {part} images of shape {images.shape} do not pair with labels of shape {labels.shape}"
            )
    x = {part: torch.from_numpy(arrays[f"{part}_images"].reshape(len(arrays[f"{part}_images"]), -1)).float() / 255
         for part in ("train", "test")}
    y = {part: torch.from_numpy(arrays[f"{part}_labels"]).long() for part in ("train", "test")}
    return _standardised(x["train"], y["train"], x["test"], y["test"], "MNIST")


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images), split at random."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16  # pixel intensities 0..16
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return _standardised(x[train], y[train], x[test], y[test], "scikit-learn digits")


def _standardised(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, name: str) -> Split:
    mean, std = train_x.mean(), train_x.std()
    return Split((train_x - mean) / std, train_y, (test_x - mean) / std, test_y, name)
