"""Re-scoring a registered version on the workspace's test split, with ONNX Runtime.

The gate never trusts stored numbers: both versions are downloaded from the registry and scored
on the manifest's ``test`` rows, decoded as the features stage decodes them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headswap import paths
from headswap.errors import PromotionError
from headswap.evaluate import core_metrics
from headswap.lineage import test_fingerprint
from headswap.manifest import read_manifest
from headswap.predict import OnnxClassifier, download_model
from headswap.promotion.statistics import Scores


@dataclass(frozen=True)
class PromotionFiles:
    """The workspace files whose test split both models are re-scored on."""

    manifest: Path = paths.MANIFEST
    raw_dir: Path = paths.RAW_DIR


@dataclass(frozen=True)
class TestSet:
    """The workspace's test images, and every manifest row (to check the split against)."""

    files: list[Path]
    labels: list[str]
    fingerprint: str
    rows: list[dict] = field(default_factory=list)


def load_test_set(files: PromotionFiles) -> TestSet:
    """The manifest's test rows, their fingerprint, and all rows of the manifest."""
    if not files.manifest.is_file():
        raise PromotionError(
            f"{files.manifest} not found: promotion re-scores both models on the "
            "workspace's test split; run `dvc repro prepare` first"
        )
    rows = read_manifest(files.manifest)
    test = [row for row in rows if row["split"] == "test"]
    if not test:
        raise PromotionError(f"{files.manifest} has no test rows to compare the models on")
    return TestSet(
        [files.raw_dir / r["path"] for r in test],
        [r["label"] for r in test],
        test_fingerprint(rows),
        rows,
    )


def score_model(model_path: Path, version: str, test_set: TestSet, batch_size: int = 32) -> Scores:
    """Run the ONNX model over the test images (decoded as the features stage decodes them)."""
    model = OnnxClassifier.load(model_path)
    unknown = sorted(set(test_set.labels) - set(model.classes))
    if unknown:
        raise PromotionError(
            f"version {version} does not know the test labels {unknown} "
            f"(its classes: {model.classes})"
        )
    labels = np.array([model.classes.index(label) for label in test_set.labels])
    outputs = [
        model.run(np.stack([model.load_pixels(p) for p in test_set.files[i : i + batch_size]]))
        for i in range(0, len(test_set.files), batch_size)
    ]
    probabilities = np.concatenate([o[0] for o in outputs])
    predictions = np.concatenate([o[1] for o in outputs])
    metrics = core_metrics(probabilities, labels, predictions, model.classes)
    return Scores(version, model.classes, labels, probabilities, predictions, metrics)


def score_version(name: str, version: str, test_set: TestSet) -> Scores:
    """Download ``models:/<name>/<version>`` from the registry and score it."""
    with tempfile.TemporaryDirectory(prefix="headswap-promote-") as tmp:
        return score_model(
            download_model(f"models:/{name}/{version}", Path(tmp)), version, test_set
        )
