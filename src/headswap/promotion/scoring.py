"""Re-scoring a registered version on the workspace's test split, with ONNX Runtime.

The gate never trusts stored numbers: both versions are downloaded from the registry, checked
against their ``onnx_sha256`` tag, and scored on the manifest's ``test`` rows, decoded as the
features stage decodes them. What a model's bytes scored for an image's bytes is kept in the
score cache (``score_cache``), so a later promotion scores only the images a model has not
scored before.

Memory stays bounded: one model at a time, its ONNX Runtime session opened only when an image
misses the cache, without ONNX Runtime's memory pattern (``open_session(lean=True)``), fed
``SCORE_BATCH`` images at a time, and released before the next model is downloaded.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headswap import paths
from headswap.errors import PromotionError
from headswap.evaluate import core_metrics
from headswap.io import file_sha256, progress
from headswap.lineage import test_fingerprint
from headswap.manifest import read_manifest
from headswap.predict import OnnxClassifier, download_model, model_input
from headswap.promotion.score_cache import ImageScore, ScoreCache
from headswap.promotion.statistics import Scores

# Images per ONNX Runtime call. The peak grows with the batch (the default ensemble keeps each
# block's activations for both views of every image: about 0.1 GB an image at batch 32), while
# the CPU per image fell only ~10% from 8 to 32 (benchmarks/README.md, "Promotion").
SCORE_BATCH = 8


@dataclass(frozen=True)
class PromotionFiles:
    """The workspace files whose test split both models are re-scored on, and where the scores
    are cached (``features.cache_dir``; None: ``$HEADSWAP_CACHE_DIR`` or ``~/.cache/headswap``)."""

    manifest: Path = paths.MANIFEST
    raw_dir: Path = paths.RAW_DIR
    cache_dir: str | Path | None = None


@dataclass(frozen=True)
class TestSet:
    """The workspace's test images, and every manifest row (to check the split against)."""

    files: list[Path]
    labels: list[str]
    fingerprint: str
    rows: list[dict] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)  # sha256 of each file's bytes, read now
    cache_dir: str | Path | None = None  # where their scores are cached (``PromotionFiles``)


def load_test_set(files: PromotionFiles) -> TestSet:
    """The manifest's test rows (each file hashed now), their fingerprint, and all rows.

    Raises:
        PromotionError: no manifest, no test rows, or a test image missing or changed since
            the manifest was written.
    """
    if not files.manifest.is_file():
        raise PromotionError(
            f"{files.manifest} not found: promotion re-scores both models on the "
            "workspace's test split; run `dvc repro prepare` first"
        )
    rows = read_manifest(files.manifest)
    test = [row for row in rows if row["split"] == "test"]
    if not test:
        raise PromotionError(f"{files.manifest} has no test rows to compare the models on")
    images = [files.raw_dir / r["path"] for r in test]
    return TestSet(
        images,
        [r["label"] for r in test],
        test_fingerprint(rows),
        rows,
        [_image_sha256(path, row, files.manifest) for path, row in zip(images, test, strict=True)],
        files.cache_dir,
    )


def _image_sha256(path: Path, row: dict, manifest: Path) -> str:
    """The sha256 of the file's bytes now, refused unless it is the one the manifest recorded:
    the split review and the score cache both go by that hash."""
    try:
        digest = file_sha256(path)
    except OSError as error:
        raise PromotionError(
            f"{path}: cannot read a test image listed in {manifest} "
            f"({error.strerror or error}); run `dvc repro` so the images match the manifest"
        ) from None
    if row.get("sha256") and digest != row["sha256"]:
        raise PromotionError(
            f"{path} changed since {manifest} was written (sha256 {digest[:12]}..., the "
            f"manifest says {row['sha256'][:12]}...); run `dvc repro prepare` first"
        )
    return digest


@dataclass(frozen=True)
class ScoringTally:
    """How one version's test scores were obtained: run through the model now, or cached."""

    version: str
    scored: int
    cached: int
    cache_dir: Path

    def line(self, role: str) -> str:
        return (
            f"{role} v{self.version}: {self.scored} test image(s) scored, {self.cached} from the "
            f"score cache ({self.cache_dir})"
        )


def _model_metadata(path: Path) -> dict[str, str]:
    """The model's metadata properties, read without opening a session (all may be cached)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}


def score_model(
    model_path: Path, version: str, test_set: TestSet, batch_size: int = SCORE_BATCH
) -> tuple[Scores, ScoringTally]:
    """Score the ONNX model on the test images: from the score cache where it has the model's
    score for an image's bytes, else decoded as the features stage decodes them and run."""
    classes, _, _ = model_input(_model_metadata(model_path), model_path)
    unknown = sorted(set(test_set.labels) - set(classes))
    if unknown:
        raise PromotionError(
            f"version {version} does not know the test labels {unknown} (its classes: {classes})"
        )
    cache = ScoreCache(test_set.cache_dir, file_sha256(model_path), classes)
    found = [cache.get(sha) for sha in test_set.hashes]
    missing = [i for i, score in enumerate(found) if score is None]
    if missing:
        _score_missing(model_path, version, test_set, missing, cache, found, batch_size)
    labels = np.array([classes.index(label) for label in test_set.labels])
    probabilities = np.stack([score.probabilities for score in found])
    predictions = np.array([score.label for score in found], dtype=np.int64)
    metrics = core_metrics(probabilities, labels, predictions, classes)
    tally = ScoringTally(version, len(missing), len(found) - len(missing), cache.dir.parent)
    return Scores(version, classes, labels, probabilities, predictions, metrics), tally


def _score_missing(
    model_path: Path,
    version: str,
    test_set: TestSet,
    missing: list[int],
    cache: ScoreCache,
    found: list[ImageScore | None],
    batch_size: int,
) -> None:
    """Run the model over the ``missing`` images, in batches, filling ``found`` and the cache.

    The session lives only in this call: it is released when the call returns, before the
    next model loads. Each batch is cached as soon as it is scored, so an interrupted
    promotion keeps what it scored.
    """
    model = OnnxClassifier.load(model_path, lean=True)
    cache.describe()

    def images_in(start: int) -> int:
        return min(batch_size, len(missing) - start)

    starts = range(0, len(missing), batch_size)
    for start in progress(starts, f"score v{version}", len(missing), images_in):
        batch = missing[start : start + batch_size]
        pixels = np.stack([model.load_pixels(test_set.files[i]) for i in batch])
        probabilities, labels = model.run(pixels)
        for i, probs, label in zip(batch, probabilities, labels, strict=True):
            found[i] = ImageScore(probs, int(label))
            cache.put(test_set.hashes[i], found[i])


def score_version(name: str, version: str, test_set: TestSet) -> tuple[Scores, ScoringTally]:
    """Download ``models:/<name>/<version>``, verify it against its ``onnx_sha256`` tag, and
    score it (``score_model``)."""
    with tempfile.TemporaryDirectory(prefix="headswap-promote-") as tmp:
        return score_model(
            download_model(f"models:/{name}/{version}", Path(tmp)), version, test_set
        )
