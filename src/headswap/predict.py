"""Batch prediction with a registered ONNX model in ONNX Runtime.

``headswap predict --model models:/<name>@champion <folder or files> --out preds.csv`` writes one
row per image: path, predicted class, one probability per class and an error column. A file that
cannot be decoded gets a row with the reason and the run goes on. Images are decoded by
``headswap.imaging.load_model_input`` with the size and interpolation stored in the model's
metadata, so the predictions equal the evaluate stage's.

What the CSV can and cannot carry: paths are written by the csv module (quoted, so a newline or a
comma in a file name cannot forge rows or columns), a leading ``= + - @`` gets a ``'`` prefix so a
spreadsheet does not run it as a formula, and the file is written to a temporary file beside
``--out`` and renamed, so nothing is written anywhere else and a failed run leaves no half file.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headswap.errors import HeadswapError, RegistryError
from headswap.imaging import IMAGE_SUFFIXES, UnreadableImageError, load_model_input
from headswap.io import atomic_write_text, progress

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


class PredictError(HeadswapError):
    """Batch prediction cannot start: no model, no images, or an unusable output path."""


@dataclass
class OnnxClassifier:
    """A deployable headswap ONNX model and what its metadata says about its input."""

    session: object
    classes: list[str]
    size: int
    interpolation: str

    @classmethod
    def load(cls, path: Path) -> OnnxClassifier:
        """Open ``path`` with the CPU provider and read classes, size and interpolation."""
        import json

        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        missing = {"headswap.classes", "headswap.image_size"} - set(meta)
        if missing:
            raise PredictError(f"{path} is not a headswap model: metadata lacks {sorted(missing)}")
        return cls(
            session,
            json.loads(meta["headswap.classes"]),
            int(meta["headswap.image_size"]),
            meta.get("headswap.interpolation", "bilinear"),
        )

    def load_pixels(self, path: Path) -> np.ndarray:
        """Decode and resize one file exactly as the features stage does."""
        return load_model_input(path, self.size, self.interpolation)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [N, K] and predicted class indices [N] for a float32 NCHW batch."""
        probabilities, labels = self.session.run(["probabilities", "label"], {"pixels": pixels})
        return probabilities, labels.astype(np.int64)


def champion_uri(registry) -> str:
    """``models:/<registry.model_name>@champion``."""
    return f"models:/{registry.model_name}@champion"


def pin_alias(model: str) -> tuple[str, str]:
    """(URI to load, how to show it): ``models:/<name>@<alias>`` becomes the version the alias
    names now, so the model scored is the one reported even if the alias moves meanwhile."""
    if not model.startswith("models:/") or "@" not in model:
        return model, model
    from mlflow import MlflowClient

    from headswap.registry import alias_version, tracking_uri

    name, alias = model.removeprefix("models:/").rsplit("@", 1)
    version = alias_version(MlflowClient(tracking_uri()), name, alias)
    if version is None:
        return model, model  # download_model then says the alias is not set
    return f"models:/{name}/{version}", f"{model} (version {version})"


def download_model(model: str, dst: Path) -> Path:
    """The .onnx file behind ``model``: a local path, or an MLflow URI downloaded into ``dst``."""
    local = Path(model)
    if local.is_file():
        return local
    if ":/" not in model:
        raise PredictError(
            f"model {model!r}: no such file, and not an MLflow URI like models:/<name>@champion"
        )
    import mlflow

    from headswap.registry import tracking_uri

    # MLflow draws a tqdm bar per download; ours is the only progress a person needs to see.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model, dst_path=str(dst), tracking_uri=tracking_uri()
            )
        )
    except Exception as error:  # noqa: BLE001 - MLflow raises many types for a missing model
        raise RegistryError(
            f"cannot download {model} from {tracking_uri()}: {error}. Check the "
            "name and alias (`headswap history` lists champions)."
        ) from None
    found = [folder] if folder.is_file() else sorted(folder.rglob("*.onnx"))
    if not found:
        raise PredictError(f"{model} holds no .onnx file (downloaded to {folder})")
    return found[0]


def load_classifier(model: str) -> OnnxClassifier:
    """Resolve, download (to a folder removed afterwards) and open ``model``."""
    with tempfile.TemporaryDirectory(prefix="headswap-model-") as tmp:
        # ONNX Runtime reads the whole file into the session, so the download can go away.
        return OnnxClassifier.load(download_model(model, Path(tmp)))


def _escapes(path: Path, roots: list[Path]) -> bool:
    """True for a symlink found in an input folder that resolves outside that folder."""
    if not path.is_symlink():
        return False
    holders = [root for root in roots if path.is_relative_to(root)]
    return bool(holders) and not any(path.resolve().is_relative_to(r.resolve()) for r in holders)


def collect_images(inputs: list[Path]) -> list[tuple[Path, str]]:
    """(file, path to report) for every input: files as given, folders searched recursively.

    Folder entries are reported relative to the folder (as the manifest does for data/raw).
    Hidden files are skipped; symlinked folders are not followed, and a symlinked file that
    points outside its folder is listed so that its row says it was not read.
    """
    found: list[tuple[Path, str]] = []
    for item in inputs:
        if item.is_dir():
            for top, dirs, files in os.walk(item):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    path = Path(top) / name
                    if not name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
                        found.append((path, path.relative_to(item).as_posix()))
        elif item.exists() or item.is_symlink():
            found.append((item, str(item)))
        else:
            raise PredictError(f"{item}: no such file or folder")
    return found


@dataclass
class PredictResult:
    out: Path
    model_uri: str
    rows: int = 0
    errors: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)


def _safe_cell(text: str) -> str:
    return f"'{text}" if text.startswith(FORMULA_PREFIXES) else text


def _decode(path: Path, model: OnnxClassifier, roots: list[Path]) -> np.ndarray | str:
    """Pixels, or the reason the file cannot be used."""
    if _escapes(path, roots):
        return "symlink pointing outside the input folder: not followed"
    try:
        return model.load_pixels(path)
    except UnreadableImageError as error:
        return str(error)
    except OSError as error:
        return f"cannot read: {error.strerror or error}"


def _check_output(out: Path, images: list[tuple[Path, str]]) -> None:
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; name the CSV file to write")
    if any(out.resolve() == path.resolve() for path, _ in images):
        raise PredictError(f"--out {out} is one of the input images; choose another file")


def predict_images(
    model_uri: str, inputs: list[Path], out: Path, batch_size: int = 32
) -> PredictResult:
    """Score every image with the ONNX model at ``model_uri`` and write ``out`` atomically."""
    images = collect_images(inputs)
    if not images:
        raise PredictError(
            f"no images found in {', '.join(map(str, inputs))} "
            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    _check_output(out, images)
    model = load_classifier(model_uri)
    roots = [item for item in inputs if item.is_dir()]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "predicted", *[f"p_{name}" for name in model.classes], "error"])
    result = PredictResult(out, model_uri)
    counts: Counter[str] = Counter()
    starts = range(0, len(images), batch_size)
    for start in progress(starts, f"predict {len(images)} images", total=len(starts)):
        for row in _score_batch(model, images[start : start + batch_size], roots):
            writer.writerow([_safe_cell(cell) for cell in row])
            result.errors += bool(row[-1])
            counts.update([row[1]] if row[1] else [])
    atomic_write_text(out, buffer.getvalue())
    result.rows = len(images)
    result.class_counts = {name: counts.get(name, 0) for name in model.classes}
    return result


def _score_batch(
    model: OnnxClassifier, batch: list[tuple[Path, str]], roots: list[Path]
) -> list[list[str]]:
    """CSV rows for one batch, in input order; unreadable files get a row with the reason."""
    decoded = [_decode(path, model, roots) for path, _ in batch]
    good = [i for i, item in enumerate(decoded) if isinstance(item, np.ndarray)]
    rows = [[shown, "", *([""] * len(model.classes)), ""] for _, shown in batch]
    if good:
        probabilities, labels = model.run(np.stack([decoded[i] for i in good]))
        for i, probs, label in zip(good, probabilities, labels, strict=True):
            rows[i][1:-1] = [model.classes[label], *[f"{p:.8f}" for p in probs]]
    for i, item in enumerate(decoded):
        if isinstance(item, str):
            rows[i][-1] = " ".join(item.split())  # one line, whatever the decoder said
    return rows
