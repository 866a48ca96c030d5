"""The demo's data: scikit-learn's 8×8 handwritten digits, shipped with scikit-learn (offline).

The UCI "Optical Recognition of Handwritten Digits" test set (E. Alpaydin, C. Kaynak, 1998;
1,797 images of 8×8 pixels with 17 grey levels, 10 classes), as ``sklearn.datasets.load_digits``
ships it inside the scikit-learn wheel — nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SOURCE = ("UCI Optical Recognition of Handwritten Digits (Alpaydin & Kaynak, 1998), "
          "as shipped by scikit-learn (sklearn.datasets.load_digits; CC BY 4.0)")


@dataclass(frozen=True)
class Split:
    """Standardised float inputs and integer labels, train and held-out."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


def digits(seed: int = 0, n_test: int = 500, limit: int | None = None) -> Split:
    """Shuffle, split off ``n_test`` held-out images, standardise (training statistics only).

    ``limit`` keeps the first ``limit`` images after shuffling (for quick runs).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the demo's data set ships with scikit-learn: "
                          "pip install 'fisherlib[demo]'") from e
    data = load_digits()
    x, y = data.data.astype(np.float64), data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))[:limit]
    x, y = x[order], y[order]
    if not 0 < n_test < len(y):
        raise ValueError(f"n_test: expected 1..{len(y) - 1} held-out images, got {n_test}")
    x_train, x_test = x[n_test:], x[:n_test]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # pixels that are always blank stay 0
    return Split((x_train - mean) / std, y[n_test:], (x_test - mean) / std, y[:n_test])
