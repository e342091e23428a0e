"""PNG plots a person would look at: confusion matrix, ROC, precision-recall, reliability."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from headswap.io import atomic_path
from headswap.metrics import calibration_bins


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(5, 4.5), dpi=110)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_confusion_matrix(matrix: np.ndarray, classes: list[str], path: Path) -> None:
    plt, fig, ax = _figure()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="white" if count > top / 2 else "black",
        )
    ax.set_title(f"Confusion matrix (test, n={int(matrix.sum())})")
    _save(plt, fig, path)


def _one_vs_rest(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]):
    """(name, scores, is_positive) per curve: the positive class only for binary tasks."""
    if len(classes) == 2:
        return [(classes[1], probabilities[:, 1], labels == 1)]
    return [(name, probabilities[:, k], labels == k) for k, name in enumerate(classes)]


def plot_roc(probabilities: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> None:
    from sklearn.metrics import auc, roc_curve

    plt, fig, ax = _figure()
    for name, scores, positive in _one_vs_rest(probabilities, labels, classes):
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)")
    ax.legend(loc="lower right")
    _save(plt, fig, path)


def plot_precision_recall(
    probabilities: np.ndarray, labels: np.ndarray, classes: list[str], path: Path
) -> None:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt, fig, ax = _figure()
    for name, scores, positive in _one_vs_rest(probabilities, labels, classes):
        if not positive.any():
            continue
        precision, recall, _ = precision_recall_curve(positive, scores)
        ap = average_precision_score(positive, scores)
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall (test)", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    _save(plt, fig, path)


def plot_reliability(
    probabilities: np.ndarray, labels: np.ndarray, path: Path, bins: int = 10
) -> None:
    plt, fig, ax = _figure()
    found = calibration_bins(probabilities, labels, bins)
    centres = [b.confidence for b in found]
    accuracy = [b.accuracy for b in found]
    counts = [b.count for b in found]
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="perfect calibration")
    ax.plot(centres, accuracy, "o-", label="model")
    for x, y, n in zip(centres, accuracy, counts, strict=True):
        ax.annotate(
            str(n), (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center"
        )
    ax.set(
        xlabel="confidence",
        ylabel="accuracy",
        title="Reliability (test; n per bin)",
        xlim=(0, 1),
        ylim=(0, 1.05),
    )
    ax.legend(loc="upper left")
    _save(plt, fig, path)


def write_plots(
    plots_dir: Path,
    probabilities: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    classes: list[str],
) -> list[Path]:
    """Write all evaluation plots; returns their paths."""
    from sklearn.metrics import confusion_matrix

    plots_dir.mkdir(parents=True, exist_ok=True)
    matrix = confusion_matrix(labels, predictions, labels=range(len(classes)))
    paths = {
        name: plots_dir / f"{name}.png"
        for name in ("confusion_matrix", "roc", "precision_recall", "reliability")
    }
    plot_confusion_matrix(matrix, classes, paths["confusion_matrix"])
    plot_roc(probabilities, labels, classes, paths["roc"])
    plot_precision_recall(probabilities, labels, classes, paths["precision_recall"])
    plot_reliability(probabilities, labels, paths["reliability"])
    return list(paths.values())
