"""``headswap learning-curve``: how many labelled images does a frozen body really need?

For each training-set size (images per class) and seed, the train split is subsampled per class,
a head is trained exactly as the train stage would (same config, same val split for temperature
and threshold) and scored on the full test split. It reads the cached ``features.npz``, so each
point costs one head fit, never a pass through the body.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from headswap.config import HeadConfig, Params
from headswap.errors import ConfigError
from headswap.evaluate import decide, roc_auc
from headswap.feature_set import FeatureSet
from headswap.heads import predict_proba
from headswap.io import atomic_path, atomic_write_text, csv_text, flatten, progress
from headswap.train import train_head

DEFAULT_SIZES: tuple[int | None, ...] = (10, 25, 50, 100, 200, None)  # None = all of train


@dataclass(frozen=True)
class CurvePoint:
    """One training-set size, summarised over seeds."""

    per_class: int | None  # None = the whole train split
    train_images: int
    seeds: int
    accuracy_mean: float
    accuracy_std: float
    roc_auc_mean: float | None
    roc_auc_std: float | None
    accuracy: list[float]
    roc_auc: list[float | None]


@dataclass(frozen=True)
class CurveOutputs:
    plot: Path
    table_csv: Path
    table_json: Path


def parse_sizes(text: str) -> list[int | None]:
    """``"10,25,all"`` -> ``[10, 25, None]``.

    Raises:
        ConfigError: a size that is neither a positive integer nor ``all``.
    """
    sizes: list[int | None] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item == "all":
            sizes.append(None)
        elif item.isdigit() and int(item) > 0:
            sizes.append(int(item))
        else:
            raise ConfigError(
                f"--sizes: '{item}' is not a positive integer or 'all' (e.g. 10,50,all)"
            )
    if not sizes:
        raise ConfigError("--sizes: give at least one size (e.g. 10,25,50,100,200,all)")
    return sizes


def subsample_train(features: FeatureSet, per_class: int | None, seed: int) -> FeatureSet:
    """Keep ``per_class`` random train images of each class (all if fewer); val and test untouched.

    Dropped train rows get the split name ``unused``, so no stage selects them.
    """
    if per_class is None:
        return features
    rng = np.random.default_rng(seed)
    split = features.split.astype("<U16")  # a copy wide enough for "unused" (npz has <U5)
    for label in np.unique(features.label):
        members = np.flatnonzero((features.split == "train") & (features.label == label))
        if len(members) > per_class:
            dropped = rng.permutation(members)[per_class:]
            split[dropped] = "unused"
    return replace(features, split=split)


def _score_point(
    features: FeatureSet, classes: list[str], head: HeadConfig, threshold: float | str
) -> tuple[float, float | None]:
    trained, meta = train_head(features, classes, head, threshold)
    embeddings, names = features.select("test")
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[name] for name in names])
    probabilities = predict_proba(trained, embeddings)
    accuracy = float((decide(probabilities, meta.threshold) == labels).mean())
    return accuracy, roc_auc(probabilities, labels)


def _effective_sizes(features: FeatureSet, sizes: list[int | None]) -> list[int | None]:
    """Drop sizes that would train on the whole split anyway (they duplicate ``all``)."""
    train_labels = features.label[features.split == "train"]
    largest = max(np.unique(train_labels, return_counts=True)[1], default=0)
    kept = [size for size in sizes if size is None or size < largest]
    return sorted(set(kept), key=lambda size: float("inf") if size is None else size)


def _summarise(
    per_class: int | None, n_train: int, scores: list[tuple[float, float | None]]
) -> CurvePoint:
    accuracy = [score[0] for score in scores]
    aucs = [score[1] for score in scores]
    defined = [auc for auc in aucs if auc is not None]
    return CurvePoint(
        per_class,
        n_train,
        len(scores),
        float(np.mean(accuracy)),
        float(np.std(accuracy)),
        float(np.mean(defined)) if defined else None,
        float(np.std(defined)) if defined else None,
        accuracy,
        aucs,
    )


def learning_curve(
    features: FeatureSet,
    classes: list[str],
    head: HeadConfig,
    threshold: float | str,
    sizes: list[int | None],
    seeds: int,
) -> list[CurvePoint]:
    """Test accuracy and ROC-AUC per training-set size, ``seeds`` subsamples each.

    Seed ``s`` draws the subsample and also seeds the head (``head.seed + s``), so the spread
    covers both which images were labelled and how the head was initialised.
    """
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    points = []
    for per_class in progress(_effective_sizes(features, sizes), "learning curve"):
        scores, n_train = [], 0
        for seed in range(seeds):
            subset = subsample_train(features, per_class, seed)
            n_train = int((subset.split == "train").sum())
            config = head.model_copy(update={"seed": head.seed + seed})
            scores.append(_score_point(subset, classes, config, threshold))
        points.append(_summarise(per_class, n_train, scores))
    return points


def _label(per_class: int | None) -> str:
    return "all" if per_class is None else str(per_class)


def write_table(points: list[CurvePoint], csv_path: Path, json_path: Path) -> None:
    """The curve as CSV (one row per size) and JSON (with every seed's scores)."""
    header = [
        "per_class",
        "train_images",
        "seeds",
        "accuracy_mean",
        "accuracy_std",
        "roc_auc_mean",
        "roc_auc_std",
    ]
    rows = [
        [
            _label(p.per_class),
            p.train_images,
            p.seeds,
            f"{p.accuracy_mean:.6f}",
            f"{p.accuracy_std:.6f}",
            _fmt(p.roc_auc_mean),
            _fmt(p.roc_auc_std),
        ]
        for p in points
    ]
    atomic_write_text(csv_path, csv_text(header, rows))
    atomic_write_text(json_path, json.dumps([asdict(p) for p in points], indent=2))


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def plot_learning_curve(points: list[CurvePoint], path: Path, title: str) -> None:
    """Accuracy and ROC-AUC (mean ± std over seeds) against training images, log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
    x = [p.train_images for p in points]
    for name, mean, std in (
        ("accuracy", [p.accuracy_mean for p in points], [p.accuracy_std for p in points]),
        ("ROC-AUC", [p.roc_auc_mean for p in points], [p.roc_auc_std for p in points]),
    ):
        if any(m is None for m in mean):
            continue
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=name)
    for p in points:
        ax.annotate(
            f"{_label(p.per_class)}/class",
            (p.train_images, p.accuracy_mean),
            textcoords="offset points",
            xytext=(0, -14),
            fontsize=7,
            ha="center",
        )
    ax.set_xscale("log")
    ax.set(xlabel="training images (log scale)", ylabel="test score", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_outputs(points: list[CurvePoint], reports_dir: Path, title: str) -> CurveOutputs:
    outputs = CurveOutputs(
        reports_dir / "learning_curve.png",
        reports_dir / "learning_curve.csv",
        reports_dir / "learning_curve.json",
    )
    write_table(points, outputs.table_csv, outputs.table_json)
    plot_learning_curve(points, outputs.plot, title)
    return outputs


def log_to_mlflow(
    points: list[CurvePoint], outputs: CurveOutputs, params: Params, seeds: int
) -> str:
    """One MLflow run in the configured experiment: params, per-size metrics, plot and table.

    Metrics use the training-set size as the MLflow step, so the UI draws the curve too.
    Returns the run id.
    """
    import mlflow
    from mlflow import MlflowClient

    from headswap.tracking import (
        ensure_experiment,
        fluent_tracking_uri,
        tracking_call,
        tracking_uri,
    )

    uri = tracking_uri()
    client = MlflowClient(uri)
    experiment_id = tracking_call(
        lambda: ensure_experiment(client, params.registry.experiment, Path(".")),
        "create experiment",
    )

    def log() -> str:
        with (
            fluent_tracking_uri(uri),
            mlflow.start_run(experiment_id=experiment_id, run_name="learning-curve") as run,
        ):
            mlflow.set_tag("headswap.kind", "learning-curve")
            flat = flatten(params.model_dump(mode="json"))
            mlflow.log_params({**flat, "learning_curve.seeds": seeds})
            for p in points:
                values = {"lc_accuracy_mean": p.accuracy_mean, "lc_accuracy_std": p.accuracy_std}
                if p.roc_auc_mean is not None:
                    values.update(lc_roc_auc_mean=p.roc_auc_mean, lc_roc_auc_std=p.roc_auc_std)
                mlflow.log_metrics(values, step=p.train_images)
            for path in (outputs.plot, outputs.table_csv, outputs.table_json):
                mlflow.log_artifact(str(path), "learning_curve")
            return run.info.run_id

    return tracking_call(log, "logging the learning-curve run")
