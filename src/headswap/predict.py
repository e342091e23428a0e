"""Batch prediction with a registered ONNX model in ONNX Runtime.

``headswap predict --model models:/<name>@champion <folder or files> --out preds.csv`` writes one
row per image: path, predicted class, one probability per class and an error column. A file that
cannot be decoded gets a row with the reason and the run goes on. Images are decoded by
``headswap.imaging.load_model_input`` with the size and interpolation stored in the model's
metadata, so the predictions equal the evaluate stage's.

Trust. A registered model is checked against its version's ``onnx_sha256`` tag after download
(a mismatch is refused), a ``@champion`` that no audited move explains is warned about, and a
model whose metadata claims an input size outside 16..4096 px is refused. The served flow reads
and writes only under ``params.yaml``'s ``predict`` roots (``served_paths``).

What the CSV can and cannot carry: paths are written by the csv module (quoted, so a newline or a
comma in a file name cannot forge rows or columns), bytes of a file name that are not UTF-8 are
written as ``\\xNN`` escapes, and a leading ``= + - @`` gets a ``'`` prefix so a spreadsheet
does not run it as a formula. Rows are written as they are scored to ``<out>.partial`` beside
``--out``, flushed after every batch and renamed onto ``--out`` at the end: a reader never sees
a half file, and a run that stops part-way leaves every row scored so far in the partial file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import stat
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from headswap.config import PredictConfig
from headswap.errors import HeadswapError, RegistryError
from headswap.imaging import IMAGE_SUFFIXES, UnreadableImageError, load_model_input
from headswap.io import FORMULA_PREFIXES, file_sha256, progress
from headswap.onnx_session import open_session
from headswap.promotion.audit import champion_provenance
from headswap.tracking import CHAMPION, alias_version, client, tracking_call, tracking_uri

# What a headswap model's input side may be; a file claiming more would make every batch
# allocate gigabytes before a single image is scored.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 4096
BATCH_BYTES = 256 * 2**20  # the decoded pixels of one batch stay under this at any image size
DEFAULT_OUT_NAME = "predictions.csv"


class PredictError(HeadswapError):
    """Batch prediction cannot start or finish: no model or images, a path outside the
    ``predict`` roots, an unusable output path, or a failure part-way (rows kept)."""


class ModelIntegrityError(RegistryError):
    """A downloaded registered model is not the file that was registered (sha256 mismatch)."""


def warn(message: str) -> None:
    """One warning line on stderr (a Prefect flow with log_prints logs it)."""
    print(f"warning: {message}", file=sys.stderr)


@dataclass
class OnnxClassifier:
    """A deployable headswap ONNX model and what its metadata says about its input."""

    session: object
    classes: list[str]
    size: int
    interpolation: str

    @classmethod
    def load(cls, path: Path, lean: bool = False) -> OnnxClassifier:
        """Open ``path`` with the CPU provider and read classes, size and interpolation.

        ``lean`` opens the session without ONNX Runtime's memory pattern (``open_session``),
        for long batched runs whose peak memory must stay bounded (promotion).
        """
        session = open_session(path, lean=lean)
        return cls(session, *model_input(session.get_modelmeta().custom_metadata_map, path))

    def load_pixels(self, path: Path) -> np.ndarray:
        """Decode and resize one file exactly as the features stage does."""
        return load_model_input(path, self.size, self.interpolation)

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [N, K] and predicted class indices [N] for a float32 NCHW batch."""
        probabilities, labels = self.session.run(["probabilities", "label"], {"pixels": pixels})
        return probabilities, labels.astype(np.int64)


def model_input(meta: dict[str, str], path: Path) -> tuple[list[str], int, str]:
    """(classes, input size, interpolation) from a headswap model's metadata properties.

    Raises:
        PredictError: ``path`` is not a headswap model, or its input size is out of range.
    """
    missing = {"headswap.classes", "headswap.image_size"} - set(meta)
    if missing:
        raise PredictError(f"{path} is not a headswap model: metadata lacks {sorted(missing)}")
    return (
        json.loads(meta["headswap.classes"]),
        model_image_size(meta["headswap.image_size"], path),
        meta.get("headswap.interpolation", "bilinear"),
    )


def model_image_size(value: str, path: Path) -> int:
    """The model's input side from its metadata, refused unless it is 16..4096 px.

    Raises:
        PredictError: the value is not an integer in range.
    """
    try:
        size = int(value)
    except ValueError:
        size = None
    if size is None or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise PredictError(
            f"{path}: its metadata headswap.image_size is {printable(value)[:40]!r}, outside "
            f"{MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px; refusing the model (export it again with "
            "backbone.image_size in range)"
        )
    return size


def champion_uri(registry) -> str:
    """``models:/<registry.model_name>@champion``."""
    return f"models:/{registry.model_name}@{CHAMPION}"


def pin_alias(model: str) -> tuple[str, str]:
    """(URI to load, how to show it): ``models:/<name>@<alias>`` becomes the version the alias
    names now, so the model scored is the one reported even if the alias moves meanwhile."""
    if not model.startswith("models:/") or "@" not in model:
        return model, model
    name, alias = model.removeprefix("models:/").rsplit("@", 1)
    mlflow_client = client()
    version = alias_version(mlflow_client, name, alias)
    if version is None:
        return model, model  # download_model then says the alias is not set
    if alias == CHAMPION:
        ungated = champion_provenance(mlflow_client, name)
        if ungated:
            warn(ungated)
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
    verify_model_file(model, found[0])
    return found[0]


def registered_version(model: str) -> tuple[str, str] | None:
    """(name, version) for ``models:/<name>/<n>`` or ``models:/<name>@<alias>``, else None."""
    if not model.startswith("models:/"):
        return None
    rest = model.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        version = alias_version(client(), name, alias)
        return None if version is None else (name, version)
    name, _, version = rest.rpartition("/")
    return (name, version) if name and version.isdigit() else None


def verify_model_file(model: str, path: Path) -> None:
    """Refuse a downloaded registered model whose sha256 differs from its ``onnx_sha256`` tag.

    A version without the tag (registered before versions recorded it), or a URI that names no
    registered version, gets one warning line and is used as it is.

    Raises:
        ModelIntegrityError: the file is not the one that was registered (and gated).
    """
    found = registered_version(model)
    if found is None:
        warn(f"{model} is not a registered model version: its file cannot be verified")
        return
    name, version = found
    mlflow_client = client()
    tags = tracking_call(
        lambda: mlflow_client.get_model_version(name, version).tags, "reading its tags"
    )
    expected = tags.get("onnx_sha256")
    if not expected:
        warn(
            f"{name} v{version} has no onnx_sha256 tag (registered before versions recorded "
            "it): its file cannot be verified"
        )
        return
    actual = file_sha256(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{name} v{version}: the downloaded ONNX file has sha256 {actual[:16]}..., but the "
            f"version's onnx_sha256 tag says {expected[:16]}...: the stored file is not the "
            "model that was registered; refusing to use it (check the artifact store, or "
            "register the model again)"
        )


def load_classifier(model: str) -> OnnxClassifier:
    """Resolve, download (to a folder removed afterwards) and open ``model``."""
    with tempfile.TemporaryDirectory(prefix="headswap-model-") as tmp:
        # ONNX Runtime reads the whole file into the session, so the download can go away.
        return OnnxClassifier.load(download_model(model, Path(tmp)))


# --- where the served flow may read and write ------------------------------------------------


def _resolve(path: Path, what: str) -> Path:
    """``path`` with ``..`` and every symlink resolved; a malformed path is one line."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as error:  # symlink loop, NUL byte, ...
        raise PredictError(f"{what} {printable(str(path))!r} cannot be resolved: {error}") from None


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def served_output(out: str, config: PredictConfig, workspace: Path = Path(".")) -> Path:
    """The CSV file ``out`` names under ``predict.out_dir``, resolved; refused outside it.

    A relative ``out`` is taken inside the folder (``batch-1.csv`` -> predictions/batch-1.csv);
    ``..`` and symlinks are resolved before the check, so neither can lead out.

    Raises:
        PredictError: ``out`` resolves outside ``predict.out_dir`` or is the folder itself.
    """
    base = _resolve(workspace / config.out_dir, "predict.out_dir")
    target = _resolve(base / out, "out")
    if target == base or not target.is_relative_to(base):
        raise PredictError(
            f"out {printable(str(out))!r} resolves to {printable(str(target))}, outside "
            f"predict.out_dir ({base}) in params.yaml: name a CSV file under it, e.g. "
            f"{DEFAULT_OUT_NAME!r}"
        )
    return target


def served_input(folder: str, config: PredictConfig, workspace: Path = Path(".")) -> Path:
    """The image folder (or file) ``folder`` names, resolved; refused outside ``input_roots``.

    A relative ``folder`` is taken from the workspace (``data/raw``).

    Raises:
        PredictError: it does not exist, or resolves outside every ``predict.input_roots``.
    """
    roots = [_resolve(workspace / root, "predict.input_roots") for root in config.input_roots]
    source = _resolve(workspace / folder, "folder")
    # Roots first: a caller learns nothing about what exists outside them.
    if not _inside(source, roots):
        allowed = ", ".join(map(str, roots)) or "none configured"
        raise PredictError(
            f"folder {printable(str(folder))!r} resolves to {printable(str(source))}, outside "
            f"predict.input_roots ({allowed}) in params.yaml: put the images under one of "
            "them, or add their folder to predict.input_roots"
        )
    if not source.exists():
        raise PredictError(f"folder {printable(str(folder))!r}: no such file or folder")
    return source


def served_paths(
    folder: str, out: str, config: PredictConfig, workspace: Path = Path(".")
) -> tuple[Path, Path]:
    """(input, output) for the served ``predict`` flow, both checked against params.yaml's
    ``predict`` roots before anything is read, downloaded or written."""
    return served_input(folder, config, workspace), served_output(out, config, workspace)


# --- collecting images -----------------------------------------------------------------------


def _escapes(path: Path, roots: list[Path]) -> bool:
    """True for a symlink found in an input folder that resolves outside that folder."""
    if not path.is_symlink():
        return False
    holders = [root for root in roots if path.is_relative_to(root)]
    return bool(holders) and not any(path.resolve().is_relative_to(r.resolve()) for r in holders)


def printable(text: str) -> str:
    r"""``text`` as valid UTF-8: file-name bytes that are not UTF-8 become ``\xNN`` escapes.

    Python hands such names over with lone surrogates (PEP 383), which no UTF-8 file can hold.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
            raise PredictError(f"{printable(str(item))}: no such file or folder")
    return found


# --- scoring and writing ---------------------------------------------------------------------


@dataclass
class PredictResult:
    out: Path
    model_uri: str
    rows: int = 0
    errors: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)


def _safe_cell(text: str) -> str:
    """A CSV cell that is valid UTF-8 and that a spreadsheet will not run as a formula."""
    text = printable(text)
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
    except Exception as error:  # noqa: BLE001 - one odd file must not cost the batch its rows
        return f"cannot decode: {type(error).__name__}: {error}"


def _check_output(out: Path, images: list[tuple[Path, str]]) -> None:
    if out.is_dir():
        raise PredictError(f"--out {out} is a folder; name the CSV file to write")
    if any(out.resolve() == path.resolve() for path, _ in images):
        raise PredictError(f"--out {out} is one of the input images; choose another file")


def partial_path(out: Path) -> Path:
    """Where rows go while they are scored: ``<out>.partial``, beside ``out``."""
    return out.with_name(out.name + ".partial")


@contextlib.contextmanager
def _row_file(out: Path) -> Iterator[tuple[Any, TextIO]]:
    """A CSV writer on ``<out>.partial``, renamed onto ``out`` if the block ends normally.

    If the block fails, the partial file stays with every row written so far. It is created
    afresh (never opened through a link left in its place), and takes the mode ``out`` had.
    """
    partial = partial_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    # backslashreplace: a cell that somehow escaped printable() still cannot stop the write.
    with open(descriptor, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        yield csv.writer(handle, lineterminator="\n"), handle
        handle.flush()
        os.fsync(handle.fileno())
    if out.is_file():
        os.chmod(partial, stat.S_IMODE(out.stat().st_mode))
    os.replace(partial, out)


def _batch_limit(size: int, batch_size: int) -> int:
    """``batch_size``, lowered so one batch of float32 pixels stays under ``BATCH_BYTES``."""
    return max(1, min(batch_size, BATCH_BYTES // (3 * size * size * 4)))


def predict_images(
    model_uri: str, inputs: list[Path], out: Path, batch_size: int = 32
) -> PredictResult:
    """Score every image with the ONNX model at ``model_uri``; write rows to ``out`` as it goes.

    Raises:
        PredictError: no images, an unusable ``out``, or an unexpected failure part-way (the
            message says how many rows were kept and in which partial file).
    """
    images = collect_images(inputs)
    if not images:
        shown = ", ".join(printable(str(item)) for item in inputs)
        raise PredictError(
            f"no images found in {shown} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    _check_output(out, images)
    model = load_classifier(model_uri)
    result = PredictResult(out, model_uri)
    try:
        counts = _write_rows(model, images, [i for i in inputs if i.is_dir()], out, batch_size)
    except Exception as error:  # noqa: BLE001 - say where the rows scored so far are kept
        raise PredictError(
            f"prediction stopped part-way ({type(error).__name__}: {printable(str(error))}); "
            f"the rows scored so far are in {partial_path(out)}"
        ) from error
    result.rows, result.errors = len(images), counts.pop(None, 0)
    result.class_counts = {name: counts.get(name, 0) for name in model.classes}
    return result


def _write_rows(
    model: OnnxClassifier,
    images: list[tuple[Path, str]],
    roots: list[Path],
    out: Path,
    batch_size: int,
) -> Counter:
    """Score and write every image, flushing after each batch; counts per class (None: errors)."""
    counts: Counter = Counter()
    step = _batch_limit(model.size, batch_size)
    starts = range(0, len(images), step)
    with _row_file(out) as (writer, handle):
        header = ["path", "predicted", *[f"p_{name}" for name in model.classes], "error"]
        writer.writerow([_safe_cell(cell) for cell in header])
        counted = progress(
            starts, "predict images", len(images), lambda at: min(step, len(images) - at)
        )
        for start in counted:
            for row in _score_batch(model, images[start : start + step], roots):
                writer.writerow([_safe_cell(cell) for cell in row])
                counts.update([row[1] if not row[-1] else None])
            handle.flush()  # a killed run still leaves every finished batch on disk
    return counts


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
