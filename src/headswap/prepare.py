"""The prepare stage: validate data/raw, split it, and write the manifest and validation report.

Every file under data/raw is decoded once; unreadable ones are skipped (or fail the run under
``data.on_bad_image: fail``), copies of one picture are kept once, and each image's split follows
from its decoded pixels alone (``split_of``), so growing the dataset never moves an image.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from headswap import raw_layout
from headswap.config import DataConfig, SplitConfig
from headswap.errors import DataError
from headswap.imaging import DECODE_BAND_PIXELS, IMAGE_SUFFIXES, UnreadableImageError, open_rgb
from headswap.io import atomic_write_text, csv_text, file_sha256, progress, read_csv
from headswap.manifest import MANIFEST_COLUMNS, SPLIT_RULE

UNDECODABLE_NAME = (
    "file name is not valid UTF-8: rename it, or let `headswap ingest` copy it from data.source "
    "(it writes each undecodable byte as %XX)"
)


@dataclass(frozen=True)
class PrepareResult:
    manifest: Path
    report: Path
    class_counts: dict[str, dict[str, int]]
    skipped: int
    skipped_files: tuple[dict, ...] = ()  # {"path", "reason"} per unreadable file
    warnings: tuple[str, ...] = ()  # e.g. a class with no test images (also in validation.json)


def class_order(labels: set[str], positive_class: str | None) -> list[str]:
    """Sorted class names; for two classes the positive one (if named and present) goes last."""
    classes = sorted(labels)
    if len(classes) == 2 and positive_class in classes:
        classes.remove(positive_class)
        classes.append(positive_class)
    return classes


def split_fraction(content_hash: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per image content and seed."""
    digest = hashlib.sha256(f"{seed}:{content_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(content_hash: str, config: SplitConfig) -> str:
    """The split of one image: test below ``test_size``, then val, then train (``SPLIT_RULE``).

    It depends on nothing but the image's pixels and the seed, so adding or removing other images
    never moves it, and the test set only grows as the dataset grows.
    """
    fraction = split_fraction(content_hash, config.seed)
    if fraction < config.test_size:
        return "test"
    return "val" if fraction < config.test_size + config.val_size else "train"


def assign_splits(rows: list[dict], config: SplitConfig) -> None:
    """Set each row's ``split`` in place from its ``pixels_sha256`` (see ``split_of``).

    Every class meets the same thresholds, so the split is stratified in expectation; a small
    class can miss a split altogether, which ``split_warnings`` reports.
    """
    for row in rows:
        row["split"] = split_of(row["pixels_sha256"], config)


def split_warnings(rows: list[dict], config: SplitConfig) -> list[str]:
    """Splits a class (or the whole dataset) ended up without, as messages for people.

    Raises:
        DataError: the test or train split is empty, so nothing could be trained or scored.
    """
    held = {(row["label"], row["split"]) for row in rows}
    splits = {split for _, split in held}
    if "test" not in splits:
        raise DataError(
            f"the test split is empty: none of the {len(rows)} images drew a fraction below "
            f"data.split.test_size={config.test_size}. Add images or raise data.split.test_size."
        )
    if "train" not in splits:
        raise DataError(
            f"the train split is empty: all {len(rows)} images went to test or val. Add images "
            "or lower data.split.test_size / data.split.val_size."
        )
    checked = ["test", "train"]
    warnings = []
    if config.val_size > 0 and "val" not in splits:
        warnings.append(
            "the val split is empty: the head keeps temperature 1.0 and threshold 0.5. "
            "Add images or raise data.split.val_size."
        )
    elif config.val_size > 0:
        checked.append("val")
    for label in sorted({row["label"] for row in rows}):
        warnings.extend(
            f"class '{label}' has no {split} images: add images"
            for split in checked
            if (label, split) not in held
        )
    return warnings


def _read_attributes(raw_dir: Path) -> dict[str, dict[str, str]]:
    path = raw_dir / raw_layout.ATTRIBUTES_FILE
    if not path.is_file():
        return {}
    return {row.pop("path"): row for row in read_csv(path)}


@dataclass
class _Scan:
    """What prepare found in data/raw: usable rows, skipped files, ignored files, empty classes,
    and files ingest copied under an escaped name."""

    rows: list[dict]
    skipped: list[dict]
    ignored: list[dict]
    empty_classes: list[str]
    renamed: list[dict] = field(default_factory=list)


def _scan(raw_dir: Path) -> _Scan:
    """Every candidate file, checked; plus what ingest already could not copy."""
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} does not exist: run `headswap ingest` (or `make run`) first")
    class_dirs = sorted(p for p in raw_dir.iterdir() if p.is_dir() and not raw_layout.is_hidden(p))
    ingest_report = _read_ingest_report(raw_dir)
    scan = _Scan(
        [],
        list(ingest_report.get("skipped", [])),
        list(ingest_report.get("ignored", [])),
        [],
        list(ingest_report.get("renamed", [])),
    )
    entries = {class_dir.name: sorted(class_dir.rglob("*")) for class_dir in class_dirs}
    for label, paths in entries.items():
        if not any(not raw_layout.is_hidden(path) and not path.is_dir() for path in paths):
            scan.empty_classes.append(raw_layout.portable_name(label))
    candidates = [(label, path) for label, paths in entries.items() for path in paths]
    for label, path in progress(candidates, "validate images"):
        _classify(path, raw_dir, label, scan)
    scan.empty_classes = sorted({*scan.empty_classes, *ingest_report.get("empty_classes", [])})
    return scan


def _classify(path: Path, raw_dir: Path, label: str, scan: _Scan) -> None:
    relative = path.relative_to(raw_dir).as_posix()
    portable = raw_layout.portable_name(relative)
    if raw_layout.is_hidden(path) or any(
        raw_layout.is_hidden(part) for part in path.relative_to(raw_dir).parents if part.name
    ):
        scan.ignored.append({"path": portable, "reason": "hidden or system file"})
    elif path.is_dir():
        if path.is_symlink():
            scan.ignored.append({"path": portable, "reason": raw_layout.FOLDER_NOT_FOLLOWED})
    elif portable != relative:
        # Placed in data/raw by hand (ingest renames these): the manifest could not name it.
        scan.skipped.append({"path": portable, "reason": UNDECODABLE_NAME})
    else:
        try:
            pixels = _pixels_sha256(path)
        except UnreadableImageError as error:
            scan.skipped.append({"path": relative, "reason": str(error)})
            return
        row = {"path": relative, "sha256": file_sha256(path), "pixels_sha256": pixels}
        scan.rows.append({**row, "label": label})


def _read_ingest_report(raw_dir: Path) -> dict:
    path = raw_dir / raw_layout.INGEST_REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _pixels_sha256(path: Path) -> str:
    """The hash of the decoded image (see ``pixels_sha256``), from the one decode prepare does.

    Raises:
        UnreadableImageError: why the file cannot be used (its message goes in the report).
    """
    if path.is_symlink() and (reason := raw_layout.unreadable_reason(path)):
        raise UnreadableImageError(reason)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UnreadableImageError(f"not an image extension ({path.suffix or 'none'})")
    return pixels_sha256(open_rgb(path))


def pixels_sha256(image: Image.Image) -> str:
    """sha256 over mode, size and raw bytes of a decoded image.

    The same picture saved as PNG and as BMP (or re-compressed) has other file bytes but the same
    pixels: this hash makes it one image for deduplication, label conflicts and the split.
    """
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    # Bands of rows: the same bytes as ``image.tobytes()``, without a copy of the whole image.
    rows = max(1, DECODE_BAND_PIXELS // max(image.width, 1))
    for top in range(0, image.height, rows):
        digest.update(image.crop((0, top, image.width, min(top + rows, image.height))).tobytes())
    return digest.hexdigest()


def _check_dataset(scan: _Scan, config: DataConfig) -> None:
    """Dataset-level problems stop the run before any training; messages name classes/files."""
    counts = Counter(row["label"] for row in scan.rows)
    if len(counts) < 2:
        empty = f"; empty class folders: {scan.empty_classes}" if scan.empty_classes else ""
        raise DataError(
            f"need at least 2 classes with readable images, found {sorted(counts) or 'none'} "
            f"in data/raw{empty}. Add a folder per class under data.source."
        )
    too_small = {label: n for label, n in counts.items() if n < config.min_per_class}
    if too_small:
        raise DataError(
            f"classes below data.min_per_class={config.min_per_class}: {too_small}. "
            "Add images or remove those class folders."
        )
    _check_label_conflicts(scan.rows)
    _check_positive_class(config.positive_class, set(counts))


def _check_positive_class(positive_class: str | None, classes: set[str]) -> None:
    if positive_class is not None and positive_class not in classes:
        raise DataError(
            f"data.positive_class: '{positive_class}' is not one of the classes found in "
            f"data/raw {sorted(classes)}: set data.positive_class to one of them (or null)."
        )


def _check_label_conflicts(rows: list[dict]) -> None:
    labels_by_hash: dict[str, set[str]] = {}
    for row in rows:
        labels_by_hash.setdefault(row["pixels_sha256"], set()).add(row["label"])
    conflicts = [row["path"] for row in rows if len(labels_by_hash[row["pixels_sha256"]]) > 1]
    if conflicts:
        raise DataError(
            "the same image (same decoded pixels) appears under different labels: "
            + ", ".join(sorted(conflicts)[:10])
            + ". Remove the wrong copies."
        )


def prepare(config: DataConfig, raw_dir: Path, out_dir: Path) -> PrepareResult:
    """Validate ``raw_dir``, split it, and write ``manifest.csv`` and ``validation.json``.

    Raises:
        DataError: a bad image under ``on_bad_image: fail``, or a dataset-level problem.
    """
    if not raw_dir.is_dir():
        raise DataError(_missing_raw_message(raw_dir, config.source))
    scan = _scan(raw_dir)
    if scan.skipped and config.on_bad_image == "fail":
        raise DataError(_fail_message(scan.skipped, raw_dir))
    _check_dataset(scan, config)
    rows, duplicates = _deduplicate(scan.rows)
    assign_splits(rows, config.split)
    warnings = split_warnings(rows, config.split) + _renamed_warnings(scan.renamed)
    attribute_columns = _attach_attributes(rows, raw_dir)
    classes = class_order({row["label"] for row in rows}, config.positive_class)
    counts = {
        split: {
            label: sum(1 for r in rows if r["split"] == split and r["label"] == label)
            for label in classes
        }
        for split in ("train", "val", "test")
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.csv"
    _write_manifest(manifest, rows, [*MANIFEST_COLUMNS, *attribute_columns])
    report = {
        "classes": classes,
        "counts": counts,
        "images": len(rows),
        "skipped": scan.skipped,
        "ignored": scan.ignored,
        "duplicates": duplicates,
        "empty_classes": scan.empty_classes,
        "renamed": scan.renamed,
        "split_rule": SPLIT_RULE,
        "warnings": warnings,
    }
    atomic_write_text(out_dir / "validation.json", json.dumps(report, indent=2))
    return PrepareResult(
        manifest,
        out_dir / "validation.json",
        counts,
        len(scan.skipped),
        tuple(scan.skipped),
        tuple(warnings),
    )


def _renamed_warnings(renamed: list[dict]) -> list[str]:
    """One line about files ingest copied under an escaped name (listed in the report)."""
    if not renamed:
        return []
    return [
        f"{len(renamed)} file name(s) in data.source are not valid UTF-8: ingest copied them with "
        "each undecodable byte written as %XX (listed under 'renamed' in validation.json)"
    ]


def _missing_raw_message(raw_dir: Path, source: str) -> str:
    if source != "elpv" and not Path(source).expanduser().is_dir():
        return (
            f"{raw_dir} does not exist, and data.source: '{source}' is not a directory (allowed: "
            "'elpv', or the path of an ImageFolder <class>/<image files>)"
        )
    return f"{raw_dir} does not exist: run `make repro` (or `dvc repro`) to ingest data.source"


def _fail_message(skipped: list[dict], raw_dir: Path) -> str:
    listing = "; ".join(f"{item['path']}: {item['reason']}" for item in skipped[:10])
    more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
    return (
        f"{len(skipped)} unreadable file(s) in {raw_dir} and data.on_bad_image is 'fail': "
        f"{listing}{more}. Fix or remove them, or set data.on_bad_image: skip."
    )


def _attach_attributes(rows: list[dict], raw_dir: Path) -> list[str]:
    """Add attributes.csv columns (slice attributes) to each row; returns the column names."""
    attributes = _read_attributes(raw_dir)
    columns = sorted({key for values in attributes.values() for key in values})
    for row in rows:
        row.update({column: attributes.get(row["path"], {}).get(column, "") for column in columns})
    return columns


def _deduplicate(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Keep one row per decoded image: the copy whose path sorts first.

    Copies share ``pixels_sha256`` and so a split already; dropping them keeps a re-encoded copy
    from weighing twice in training or in the test metrics.

    Returns the kept rows and the dropped copies (each naming the file it duplicates).
    """
    kept: dict[str, str] = {}
    unique, duplicates = [], []
    for row in sorted(rows, key=lambda row: row["path"]):
        if row["pixels_sha256"] in kept:
            duplicates.append({"path": row["path"], "same_as": kept[row["pixels_sha256"]]})
        else:
            kept[row["pixels_sha256"]] = row["path"]
            unique.append(row)
    return unique, duplicates


def _write_manifest(path: Path, rows: list[dict], columns: list[str]) -> None:
    """The manifest, cells defused for spreadsheets (``csv_text``); ``read_manifest`` reverts."""
    ordered = sorted(rows, key=lambda row: row["path"])
    atomic_write_text(
        path, csv_text(columns, ([row.get(c, "") for c in columns] for row in ordered))
    )
