"""Statistics over one model's predictions, shared by the evaluate stage, its plots and the gate.

Calibration is binned once (``calibration_bins``): the ECE in metrics.json and the reliability
diagram read the same bins. Confidence intervals come from one percentile bootstrap
(``percentile_bootstrap``), which the evaluate stage runs over one model and the promotion gate
over two models scored on the same resampled test sets. Pure numpy: no files, no MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

ECE_BINS = 15


@dataclass(frozen=True)
class CalibrationBin:
    """The images whose top-class confidence falls in one bin.

    Attributes:
        confidence: their mean top-class probability.
        accuracy: the share of them predicted correctly.
        count: how many there are.
        share: ``count`` as a share of all images.
    """

    confidence: float
    accuracy: float
    count: int
    share: float


def calibration_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int
) -> list[CalibrationBin]:
    """The non-empty equal-width bins of top-label confidence, lowest first."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    found = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            found.append(
                CalibrationBin(
                    confidence[in_bin].mean(),
                    correct[in_bin].mean(),
                    int(in_bin.sum()),
                    in_bin.mean(),
                )
            )
    return found


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE with equal-width confidence bins."""
    total = 0.0
    for found in calibration_bins(probabilities, labels, bins):
        total += found.share * abs(found.accuracy - found.confidence)
    return float(total)


def percentile_interval(values: list[float]) -> list[float] | None:
    """The 95% percentile interval of ``values``; None when there are none."""
    if not values:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def percentile_bootstrap(
    n: int,
    statistics: Mapping[str, Callable[[np.ndarray], float | None]],
    rounds: int,
    rng: np.random.Generator,
) -> dict[str, list[float] | None]:
    """95% percentile intervals of each statistic over ``rounds`` resamples of ``n`` items.

    Every statistic is computed on the same resample (an index array) in each round, so
    statistics of two models scored on the same items stay paired. A statistic that is
    undefined on a resample (None) leaves that resample out of its own interval.
    """
    samples: dict[str, list[float]] = {name: [] for name in statistics}
    for _ in range(rounds):
        sample = rng.integers(0, n, n)
        for name, statistic in statistics.items():
            value = statistic(sample)
            if value is not None:
                samples[name].append(value)
    return {name: percentile_interval(values) for name, values in samples.items()}
