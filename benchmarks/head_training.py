"""Head training time on cached ELPV features, side by side with scikit-learn.

Usage (after `make run` or `dvc repro features`, from the repository root)::

    python benchmarks/head_training.py data/features/features.npz data/prepared/validation.json

Each row trains one head with ``headswap.train.train_head`` on the features' train split (fit,
temperature and threshold included) and reports wall seconds; the reference row fits
scikit-learn's LogisticRegression (lbfgs, same C) on the same standardised train matrix in the
same process, so the ratio holds on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from headswap.config import HeadConfig
from headswap.feature_set import load_features
from headswap.manifest import read_classes
from headswap.train import train_head

HEADS = {
    "logistic C=1": HeadConfig(C=1.0, device="cpu"),
    "logistic C=0.01 (the default)": HeadConfig(C=0.01, device="cpu"),
    "logistic C=auto (5-fold CV over 9 C)": HeadConfig(C="auto", device="cpu"),
    "mlp 512, dropout 0.5": HeadConfig(
        type="mlp", hidden=512, dropout=0.5, max_iter=300, device="cpu"
    ),
}


def sklearn_seconds(features, classes: list[str]) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, names = features.select("train")
    n, v, d = x.shape
    y = np.repeat(names == classes[-1], v)
    started = time.perf_counter()
    scaled = StandardScaler().fit_transform(x.reshape(n * v, d).astype(np.float64))
    LogisticRegression(C=1.0, max_iter=500).fit(scaled, y)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features", help="features.npz")
    parser.add_argument("validation", help="validation.json (class order)")
    parser.add_argument("--only", nargs="*", help="head names (substring) to time")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    features = load_features(args.features)
    classes = read_classes(args.validation)
    n, v, d = features.select("train")[0].shape
    print(
        f"train split: {n} images x {v} views x {d} dims; torch threads {torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    reference = sklearn_seconds(features, classes)
    print("| head | seconds | vs sklearn LogisticRegression(C=1) |\n|---|---|---|")
    print(f"| sklearn LogisticRegression C=1 (reference) | {reference:.2f} | 1.00 |")
    for name, config in HEADS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        started = time.perf_counter()
        _, meta = train_head(features, classes, config, "auto")
        seconds = time.perf_counter() - started
        print(
            f"| {name} (C={meta.C:g}, {meta.epochs} steps) | {seconds:.2f} "
            f"| {seconds / reference:.2f} |"
        )


if __name__ == "__main__":
    main()
