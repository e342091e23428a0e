"""Dataset ingestion (source -> data/raw) and the prepare stage (data/raw -> manifest + report).

``data/raw`` is an ImageFolder (``<class>/<image>``) that DVC versions with ``dvc add``. An
optional ``attributes.csv`` at its root adds per-image slice attributes (ELPV's cell type).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from headswap.config import DataConfig, SplitConfig
from headswap.errors import DataError
from headswap.imaging import IMAGE_SUFFIXES, UnreadableImageError, open_rgb, sha256_file
from headswap.io import atomic_write_text, progress

ATTRIBUTES_FILE = "attributes.csv"
# Files ingest could not copy (broken or looping symlinks): prepare folds them into its report.
INGEST_REPORT_FILE = "ingest_report.json"
MANIFEST_COLUMNS = ("path", "sha256", "label", "split")
ELPV_DEFECT_THRESHOLD = 0.5  # Deitsch et al.: defective means defect probability >= 0.5
# How an image's split is decided, recorded on every registered version: two versions with the
# same rule, seed and fractions put every image in the same split.
SPLIT_RULE = "pixels-sha256-threshold-v1"


@dataclass(frozen=True)
class IngestResult:
    root: Path
    class_counts: dict[str, int]


@dataclass(frozen=True)
class PrepareResult:
    manifest: Path
    report: Path
    class_counts: dict[str, dict[str, int]]
    skipped: int
    skipped_files: tuple[dict, ...] = ()  # {"path", "reason"} per unreadable file


def _elpv_records(max_per_class: int | None) -> list[tuple[Path, str, dict[str, str]]]:
    """(file, class, attributes) for every ELPV cell, in the package's own order."""
    import elpv_dataset

    labels_csv = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    records = []
    for line in labels_csv.read_text().splitlines():
        if not line.strip():
            continue
        rel_path, probability, cell_type = line.split()
        label = "defective" if float(probability) >= ELPV_DEFECT_THRESHOLD else "functional"
        attributes = {"cell_type": cell_type, "defect_probability": probability}
        records.append((labels_csv.parent / rel_path, label, attributes))
    return _first_per_class(records, max_per_class)


def _folder_records(root: Path, max_per_class: int | None) -> list[tuple[Path, str, dict]]:
    if not root.is_dir():
        raise DataError(
            f"data.source: '{root}' is not a directory (allowed: 'elpv', or the path of an "
            "ImageFolder directory laid out as <class>/<image files>)"
        )
    records = [
        (path, class_dir.name, {})
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p))
        for path in sorted(class_dir.rglob("*"))
        if not _hidden(path) and not path.is_dir()
    ]
    return _first_per_class(records, max_per_class)


def _first_per_class(records: list, max_per_class: int | None) -> list:
    if max_per_class is None:
        return records
    taken: Counter[str] = Counter()
    subset = []
    for record in records:
        if taken[record[1]] < max_per_class:
            taken[record[1]] += 1
            subset.append(record)
    return subset


def _hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.lower() in {"thumbs.db", "desktop.ini"}


def ingest(config: DataConfig, raw_dir: Path) -> IngestResult:
    """Materialise ``data.source`` as an ImageFolder at ``raw_dir``, ready for ``dvc add``.

    The folder is built beside the target and swapped in with a rename, so an interrupted ingest
    never leaves a half-copied dataset for DVC to version.
    """
    if config.source == "elpv":
        records = _elpv_records(config.max_per_class)
    else:
        records = _folder_records(Path(config.source).expanduser(), config.max_per_class)
    if not records:
        raise DataError(f"data.source '{config.source}' holds no files under <class>/ folders")

    staging = raw_dir.with_name(raw_dir.name + ".ingest-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    attributes_rows, uncopied = [], []
    for source, label, attributes in progress(records, "ingest"):
        target = staging / label / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        reason = _uncopyable(source)
        if reason:
            uncopied.append({"path": f"{label}/{source.name}", "reason": reason})
            continue
        shutil.copyfile(source, target)  # follows symlinks: data/raw holds plain files only
        if attributes:
            attributes_rows.append({"path": f"{label}/{source.name}", **attributes})
    empty = _empty_classes(config.source, {label for _, label, _ in records})
    if uncopied or empty:
        report = {"skipped": uncopied, "empty_classes": empty}
        atomic_write_text(staging / INGEST_REPORT_FILE, json.dumps(report, indent=2))
    if attributes_rows:
        with open(staging / ATTRIBUTES_FILE, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(attributes_rows[0]))
            writer.writeheader()
            writer.writerows(attributes_rows)
    _swap_in(staging, raw_dir)
    return IngestResult(raw_dir, dict(Counter(label for _, label, _ in records)))


def _empty_classes(source: str, filled: set[str]) -> list[str]:
    """Class folders of an ImageFolder source with no files (DVC cannot version empty folders)."""
    if source == "elpv":
        return []
    root = Path(source).expanduser()
    return sorted(
        p.name for p in root.iterdir() if p.is_dir() and not _hidden(p) and p.name not in filled
    )


def _uncopyable(path: Path) -> str | None:
    """Why ingest cannot copy ``path`` (a dangling or looping symlink), or None."""
    if path.is_file():
        return None
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop (too many levels of symbolic links)"
        if path.is_symlink():
            return f"broken symlink (target {os.readlink(path)} does not exist)"
        return f"cannot read: {error.strerror}"
    return "not a regular file"


def _swap_in(staging: Path, target: Path) -> None:
    retired = target.with_name(target.name + ".old-tmp")
    shutil.rmtree(retired, ignore_errors=True)
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def class_order(labels: set[str], positive_class: str | None) -> list[str]:
    """Sorted class names; for two classes the positive one (if named and present) goes last."""
    classes = sorted(labels)
    if len(classes) == 2 and positive_class in classes:
        classes.remove(positive_class)
        classes.append(positive_class)
    return classes


def split_fraction(sha256: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per image and seed.

    Ranking by this (rather than shuffling a list) keeps every existing image in its split when
    new images are added, so the test set only ever grows.
    """
    digest = hashlib.sha256(f"{seed}:{sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(rows: list[dict], config: SplitConfig) -> None:
    """Stratified split in place: per class, rank by ``split_fraction`` and cut test, val, train."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    for members in by_label.values():
        members.sort(key=lambda row: (split_fraction(row["sha256"], config.seed), row["path"]))
        n_test = max(1, round(len(members) * config.test_size))
        n_val = round(len(members) * config.val_size)
        if config.val_size > 0:
            n_val = max(1, n_val)
        if n_test + n_val >= len(members):
            raise DataError(
                f"class '{members[0]['label']}' has {len(members)} images: too few to give at "
                f"least one each to test ({n_test}), val ({n_val}) and train. Add images or "
                "lower data.split.test_size / data.split.val_size."
            )
        for index, row in enumerate(members):
            row["split"] = (
                "test" if index < n_test else "val" if index < n_test + n_val else "train"
            )


def _read_attributes(raw_dir: Path) -> dict[str, dict[str, str]]:
    path = raw_dir / ATTRIBUTES_FILE
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        return {row.pop("path"): row for row in csv.DictReader(handle)}


@dataclass
class _Scan:
    """What prepare found in data/raw: usable rows, skipped files, ignored files, empty classes."""

    rows: list[dict]
    skipped: list[dict]
    ignored: list[dict]
    empty_classes: list[str]


def _scan(raw_dir: Path) -> _Scan:
    """Every candidate file, checked; plus what ingest already could not copy."""
    if not raw_dir.is_dir():
        raise DataError(f"{raw_dir} does not exist: run `headswap ingest` (or `make run`) first")
    class_dirs = sorted(p for p in raw_dir.iterdir() if p.is_dir() and not _hidden(p))
    ingest_report = _read_ingest_report(raw_dir)
    scan = _Scan([], list(ingest_report.get("skipped", [])), [], [])
    entries = {class_dir.name: sorted(class_dir.rglob("*")) for class_dir in class_dirs}
    for label, paths in entries.items():
        if not any(not _hidden(path) and not path.is_dir() for path in paths):
            scan.empty_classes.append(label)
    candidates = [(label, path) for label, paths in entries.items() for path in paths]
    for label, path in progress(candidates, "validate images"):
        _classify(path, raw_dir, label, scan)
    scan.empty_classes = sorted({*scan.empty_classes, *ingest_report.get("empty_classes", [])})
    return scan


def _classify(path: Path, raw_dir: Path, label: str, scan: _Scan) -> None:
    relative = path.relative_to(raw_dir).as_posix()
    if _hidden(path) or any(
        _hidden(part) for part in path.relative_to(raw_dir).parents if part.name
    ):
        scan.ignored.append({"path": relative, "reason": "hidden or system file"})
    elif path.is_dir():
        if path.is_symlink():
            scan.ignored.append({"path": relative, "reason": "symlinked folder (not followed)"})
    elif reason := _problem(path):
        scan.skipped.append({"path": relative, "reason": reason})
    else:
        scan.rows.append({"path": relative, "sha256": sha256_file(path), "label": label})


def _read_ingest_report(raw_dir: Path) -> dict:
    path = raw_dir / INGEST_REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _problem(path: Path) -> str | None:
    """Why a file cannot be used, or None when it decodes as an image."""
    if path.is_symlink() and (reason := _uncopyable(path)):
        return reason
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image extension ({path.suffix or 'none'})"
    try:
        open_rgb(path)
    except UnreadableImageError as error:
        return str(error)
    return None


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


def _check_label_conflicts(rows: list[dict]) -> None:
    labels_by_hash: dict[str, set[str]] = {}
    for row in rows:
        labels_by_hash.setdefault(row["sha256"], set()).add(row["label"])
    conflicts = [row["path"] for row in rows if len(labels_by_hash[row["sha256"]]) > 1]
    if conflicts:
        raise DataError(
            "the same image (same sha256) appears under different labels: "
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
    }
    atomic_write_text(out_dir / "validation.json", json.dumps(report, indent=2))
    return PrepareResult(
        manifest, out_dir / "validation.json", counts, len(scan.skipped), tuple(scan.skipped)
    )


def _missing_raw_message(raw_dir: Path, source: str) -> str:
    if source != "elpv" and not Path(source).expanduser().is_dir():
        return (
            f"{raw_dir} does not exist, and data.source: '{source}' is not a directory (allowed: "
            "'elpv', or the path of an ImageFolder <class>/<image files>)"
        )
    return f"{raw_dir} does not exist: run `headswap ingest` (or `make run`) first"


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
    """Keep one row per image content, so a copied file cannot land in both train and test.

    Returns the kept rows and the dropped copies (each naming the file it duplicates).
    """
    kept: dict[str, str] = {}
    unique, duplicates = [], []
    for row in rows:
        if row["sha256"] in kept:
            duplicates.append({"path": row["path"], "same_as": kept[row["sha256"]]})
        else:
            kept[row["sha256"]] = row["path"]
            unique.append(row)
    return unique, duplicates


def _write_manifest(path: Path, rows: list[dict], columns: list[str]) -> None:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row["path"]))
    atomic_write_text(path, buffer.getvalue())


def read_manifest(path: Path) -> list[dict[str, str]]:
    """The manifest rows, in file order."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_classes(report_path: Path) -> list[str]:
    """Class names in model output order, as recorded by prepare."""
    return json.loads(Path(report_path).read_text())["classes"]
