"""Synthetic feature sets for the head, evaluation and learning-curve unit tests.

Shared by several test modules, so it lives in a plain helper module (imported as
``tests.synthetic``) rather than in one test module that the others import.
"""

from __future__ import annotations

import numpy as np

from headswap.features import FeatureSet

CLASSES = ["functional", "defective"]


def make_features(
    n: int = 240, dim: int = 12, views: int = 1, seed: int = 0, positive_share: float = 0.35
) -> FeatureSet:
    """Two overlapping Gaussian classes; views are small perturbations of each image's vector."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < positive_share).astype(int)
    centre = rng.normal(size=(n, dim)) + labels[:, None] * np.linspace(1.2, 0.0, dim)
    embeddings = centre[:, None, :] + 0.1 * rng.normal(size=(n, views, dim))
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    return FeatureSet(
        embeddings=embeddings.astype(np.float32),
        sha256=np.array([f"{i:064x}" for i in range(n)]),
        path=np.array([f"{CLASSES[y]}/img{i}.png" for i, y in enumerate(labels)]),
        label=np.array([CLASSES[y] for y in labels]),
        split=split,
    )
