"""The evaluate stage: test-split metrics with confidence intervals, slices and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sklearn import metrics as skm

from headswap.config import EvaluateConfig
from headswap.io import atomic_write_text, csv_text
from headswap.manifest import read_manifest
from headswap.metrics import expected_calibration_error, percentile_bootstrap
from headswap.paths import METRICS, PLOTS_DIR, PREDICTIONS
from headswap.plots import write_plots

if TYPE_CHECKING:  # torch-backed; imported where used so the metric functions stay light
    from headswap.feature_set import FeatureSet
    from headswap.heads import Head, HeadMeta


@dataclass(frozen=True)
class EvaluateResult:
    metrics_path: Path
    metrics: dict


def decide(probabilities: np.ndarray, threshold: float | None) -> np.ndarray:
    """Predicted class indices: positive-class threshold for binary tasks, argmax otherwise."""
    if threshold is not None and probabilities.shape[1] == 2:
        return (probabilities[:, 1] >= threshold).astype(np.int64)
    return probabilities.argmax(axis=1)


def roc_auc(probabilities: np.ndarray, labels: np.ndarray) -> float | None:
    """Binary AUC on the positive class; one-vs-rest macro for more classes; None if undefined."""
    if len(np.unique(labels)) < 2:
        return None
    if probabilities.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probabilities[:, 1]))
    present = np.unique(labels)
    if len(present) < probabilities.shape[1]:
        return None
    return float(skm.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro"))


def pr_auc(probabilities: np.ndarray, labels: np.ndarray) -> float | None:
    if len(np.unique(labels)) < 2:
        return None
    if probabilities.shape[1] == 2:
        return float(skm.average_precision_score(labels, probabilities[:, 1]))
    onehot = np.eye(probabilities.shape[1])[labels]
    return float(skm.average_precision_score(onehot, probabilities, average="macro"))


def core_metrics(
    probabilities: np.ndarray, labels: np.ndarray, predictions: np.ndarray, classes: list[str]
) -> dict:
    """The headline numbers for one set of predictions."""
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=range(len(classes)), zero_division=0
    )
    return {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predictions)),
        "f1_macro": float(skm.f1_score(labels, predictions, average="macro", zero_division=0)),
        "roc_auc": roc_auc(probabilities, labels),
        "pr_auc": pr_auc(probabilities, labels),
        "ece": expected_calibration_error(probabilities, labels),
        "n": int(len(labels)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        },
    }


def bootstrap_ci(
    probabilities: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    rounds: int,
    seed: int = 0,
) -> dict:
    """Percentile 95% intervals for accuracy and ROC-AUC over resampled test sets."""
    if rounds == 0:
        return {}
    intervals = percentile_bootstrap(
        len(labels),
        {
            "accuracy": lambda s: float((predictions[s] == labels[s]).mean()),
            "roc_auc": lambda s: roc_auc(probabilities[s], labels[s]),
        },
        rounds,
        np.random.default_rng(seed),
    )
    return {name: interval for name, interval in intervals.items() if interval is not None}


def slice_metrics(
    rows: list[dict],
    probabilities: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    columns: list[str],
) -> dict:
    """Accuracy, balanced accuracy and AUC for each value of each requested manifest column."""
    out: dict[str, dict] = {}
    for column in columns:
        values = np.array([row.get(column, "") for row in rows])
        if not values.any():
            continue
        out[column] = {}
        for value in sorted(set(values)):
            mask = values == value
            out[column][value] = {
                "n": int(mask.sum()),
                "accuracy": float((predictions[mask] == labels[mask]).mean()),
                "balanced_accuracy": float(
                    skm.balanced_accuracy_score(labels[mask], predictions[mask])
                )
                if len(np.unique(labels[mask])) > 1
                else None,
                "roc_auc": roc_auc(probabilities[mask], labels[mask]),
            }
    return out


def evaluate_head(
    head: Head,
    meta: HeadMeta,
    features: FeatureSet,
    manifest_path: Path,
    config: EvaluateConfig,
    reports_dir: Path,
) -> EvaluateResult:
    """Score the test split; write metrics.json, predictions.csv and the plots."""
    from headswap.heads import predict_proba

    index = {name: i for i, name in enumerate(meta.classes)}
    embeddings, label_names = features.select("test")
    labels = np.array([index[name] for name in label_names])
    probabilities = predict_proba(head, embeddings)
    predictions = decide(probabilities, meta.threshold)

    uncalibrated = _probabilities_at_temperature(head, embeddings, 1.0)
    by_path = {row["path"]: row for row in read_manifest(manifest_path)}
    test_rows = [by_path[str(path)] for path in features.path[features.split == "test"]]

    result = core_metrics(probabilities, labels, predictions, meta.classes)
    result.update(
        ece_uncalibrated=expected_calibration_error(uncalibrated, labels),
        temperature=meta.temperature,
        threshold=meta.threshold,
        classes=meta.classes,
        confusion_matrix=skm.confusion_matrix(
            labels, predictions, labels=range(len(meta.classes))
        ).tolist(),
        ci95=bootstrap_ci(probabilities, labels, predictions, config.bootstrap),
        slices=slice_metrics(test_rows, probabilities, labels, predictions, config.slices),
    )
    reports_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = reports_dir / METRICS.name
    atomic_write_text(metrics_path, json.dumps(result, indent=2))
    _write_predictions(
        reports_dir / PREDICTIONS.name, test_rows, probabilities, predictions, meta.classes
    )
    write_plots(reports_dir / PLOTS_DIR.name, probabilities, labels, predictions, meta.classes)
    return EvaluateResult(metrics_path, result)


def _probabilities_at_temperature(
    head: Head, embeddings: np.ndarray, temperature: float
) -> np.ndarray:
    from headswap.heads import predict_proba

    saved = float(head.temperature)
    head.temperature.fill_(temperature)
    try:
        return predict_proba(head, embeddings)
    finally:
        head.temperature.fill_(saved)


def _write_predictions(
    path: Path,
    rows: list[dict],
    probabilities: np.ndarray,
    predictions: np.ndarray,
    classes: list[str],
) -> None:
    header = ["path", "sha256", "label", "predicted", *[f"p_{name}" for name in classes]]
    lines = [
        [row["path"], row["sha256"], row["label"], classes[predicted], *[f"{p:.8f}" for p in probs]]
        for row, probs, predicted in zip(rows, probabilities, predictions, strict=True)
    ]
    # Paths and class names come from folder names: defused so a spreadsheet shows them as text.
    atomic_write_text(path, csv_text(header, lines))
