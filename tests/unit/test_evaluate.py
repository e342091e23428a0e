"""Evaluate stage: metrics.json contents, reload reproducibility, metric definitions, plots."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from headswap.config import EvaluateConfig, HeadConfig
from headswap.evaluate import (
    bootstrap_ci,
    core_metrics,
    decide,
    evaluate_head,
    roc_auc,
)
from headswap.heads import load_head
from headswap.metrics import expected_calibration_error
from headswap.train import save_head, train_head
from tests.helpers.synthetic import CLASSES, make_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_manifest(path, features) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "sha256", "label", "split", "cell_type"])
        for i, (p, sha, label, split) in enumerate(
            zip(features.path, features.sha256, features.label, features.split, strict=True)
        ):
            writer.writerow([p, sha, label, split, "mono" if i % 2 else "poly"])


@pytest.fixture
def evaluated(tmp_path):
    features = make_features(views=2)
    write_manifest(tmp_path / "manifest.csv", features)
    head, meta = train_head(features, CLASSES, HeadConfig(device="cpu", C=1.0), "auto")
    config = EvaluateConfig(bootstrap=200)
    result = evaluate_head(
        head, meta, features, tmp_path / "manifest.csv", config, tmp_path / "reports"
    )
    return tmp_path, features, head, meta, config, result


def test_metrics_json_holds_every_promised_number(evaluated):
    tmp_path, features, *_ = evaluated
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())

    for key in (
        "accuracy",
        "balanced_accuracy",
        "f1_macro",
        "roc_auc",
        "pr_auc",
        "ece",
        "ece_uncalibrated",
        "temperature",
        "threshold",
        "confusion_matrix",
    ):
        assert metrics[key] is not None, key
    assert set(metrics["per_class"]) == set(CLASSES)
    assert set(metrics["per_class"]["defective"]) >= {"precision", "recall", "f1", "support"}
    low, high = metrics["ci95"]["accuracy"]
    assert low <= metrics["accuracy"] <= high
    low, high = metrics["ci95"]["roc_auc"]
    assert low <= metrics["roc_auc"] <= high
    n_test = int((features.split == "test").sum())
    assert np.array(metrics["confusion_matrix"]).sum() == n_test == metrics["n"]
    assert set(metrics["slices"]["cell_type"]) == {"mono", "poly"}
    assert sum(s["n"] for s in metrics["slices"]["cell_type"].values()) == n_test


def test_reloaded_head_reproduces_the_reported_metrics(evaluated):
    tmp_path, features, head, meta, config, result = evaluated
    save_head(head, meta, tmp_path / "head.pt", tmp_path / "head.json")
    loaded, loaded_meta = load_head(tmp_path / "head.pt", tmp_path / "head.json")
    again = evaluate_head(
        loaded, loaded_meta, features, tmp_path / "manifest.csv", config, tmp_path / "again"
    )
    assert again.metrics == result.metrics
    assert (tmp_path / "again/predictions.csv").read_text() == (
        tmp_path / "reports/predictions.csv"
    ).read_text()


def test_plots_are_written_as_png(evaluated):
    tmp_path, *_ = evaluated
    for name in ("confusion_matrix", "roc", "precision_recall", "reliability"):
        assert (tmp_path / f"reports/plots/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predictions_csv_matches_the_accuracy(evaluated):
    tmp_path, *_, result = evaluated
    with open(tmp_path / "reports/predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert np.mean([row["label"] == row["predicted"] for row in rows]) == pytest.approx(
        result.metrics["accuracy"]
    )


def test_decide_uses_the_threshold_for_binary_and_argmax_otherwise():
    probabilities = np.array([[0.7, 0.3], [0.4, 0.6]])
    np.testing.assert_array_equal(decide(probabilities, 0.25), [1, 1])
    np.testing.assert_array_equal(decide(probabilities, 0.5), [0, 1])
    np.testing.assert_array_equal(decide(np.array([[0.2, 0.5, 0.3]]), None), [1])


def test_ece_is_zero_when_confidence_equals_accuracy_and_large_when_overconfident():
    # 10 predictions at confidence 0.8, 8 of them right: perfectly calibrated.
    probabilities = np.tile([0.2, 0.8], (10, 1))
    labels = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0)
    assert expected_calibration_error(np.tile([0.01, 0.99], (10, 1)), labels) == pytest.approx(0.19)


def test_core_metrics_against_hand_computed_values():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 0])
    metrics = core_metrics(probabilities, labels, decide(probabilities, 0.5), CLASSES)
    assert metrics["accuracy"] == 0.5
    assert metrics["roc_auc"] == 0.75  # positives 0.8, 0.4 vs negatives 0.1, 0.7: 3 of 4 pairs
    assert metrics["per_class"]["defective"] == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "support": 2,
    }


def test_roc_auc_is_none_when_only_one_class_is_present():
    assert roc_auc(np.array([[0.3, 0.7], [0.4, 0.6]]), np.array([1, 1])) is None


def test_bootstrap_is_reproducible_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    probabilities = np.stack([1 - scores, scores], axis=1)
    predictions = decide(probabilities, 0.5)
    first = bootstrap_ci(probabilities, labels, predictions, 300)
    assert first == bootstrap_ci(probabilities, labels, predictions, 300)
    accuracy = (predictions == labels).mean()
    assert first["accuracy"][0] < accuracy < first["accuracy"][1]
    assert bootstrap_ci(probabilities, labels, predictions, 0) == {}
