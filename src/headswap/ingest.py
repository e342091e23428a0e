"""The ingest stage: sync data/raw with ``data.source`` (the bundled ELPV set or an ImageFolder).

``data/raw`` is the persistent output of the DVC ``ingest`` stage, which syncs it with
``data.source`` on every run (its layout: ``headswap.raw_layout``). Ingest copies images only:
what it copies ends up in the DVC cache and on the remote, so a stray credentials file or a link
to one must never get in.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from headswap.config import DataConfig
from headswap.errors import DataError
from headswap.imaging import IMAGE_SUFFIXES
from headswap.io import create_temp_beside, csv_text, file_sha256, progress
from headswap.raw_layout import (
    ATTRIBUTES_FILE,
    FOLDER_NOT_FOLLOWED,
    INGEST_REPORT_FILE,
    is_hidden,
    portable_name,
    unreadable_reason,
)

# Files ingest itself writes at the root of data/raw; everything else there mirrors the source.
ROOT_FILES = frozenset({ATTRIBUTES_FILE, INGEST_REPORT_FILE})
ELPV_DEFECT_THRESHOLD = 0.5  # Deitsch et al.: defective means defect probability >= 0.5
# Suffix of ingest's temp files (hidden names): a leftover one is from an interrupted sync.
INGEST_TMP_SUFFIX = ".ingest-tmp"
# How the formats of IMAGE_SUFFIXES start: ingest reads a file's first bytes and copies it only
# if they match, so a text file named or linked as ``x.png`` never reaches data/raw (prepare
# still decodes every file fully). BMP's "BM" alone is too weak against text, so the size of
# its DIB header (12..124 bytes, one of the known versions) must follow at offset 14.
IMAGE_SIGNATURE = re.compile(
    rb"\x89PNG\r\n\x1a\n"  # PNG
    rb"|\xff\xd8\xff"  # JPEG
    rb"|GIF8[79]a"
    rb"|II[*+]\x00|MM\x00[*+]"  # TIFF and BigTIFF, both byte orders
    rb"|RIFF.{4}WEBP"
    rb"|BM.{12}[\x0c\x10\x28\x34\x38\x40\x6c\x7c]\x00\x00\x00",
    re.DOTALL,
)
IMAGE_HEAD_BYTES = 18  # enough for every IMAGE_SIGNATURE
RENAMED = "file name is not valid UTF-8: copied with each undecodable byte written as %XX"
NAME_TAKEN = (
    "file name is not valid UTF-8, and its %XX-escaped name is taken by another file: rename it"
)


@dataclass(frozen=True)
class ClassChanges:
    """What one ingest sync did to one class folder of data/raw, in files."""

    added: int = 0
    removed: int = 0
    replaced: int = 0
    unchanged: int = 0


@dataclass(frozen=True)
class IngestResult:
    """The synced folder, its files per class, and what the sync changed.

    Attributes:
        root: the data/raw folder.
        class_counts: files per class in ``root`` after the sync.
        changes: per class (every class that had files before or after), what the sync did.
        rewritten: root files (``attributes.csv``, ``ingest_report.json``) written or removed
            because their content changed.
        renamed: data/raw paths of files whose source name was not valid UTF-8 (``portable_name``).
    """

    root: Path
    class_counts: dict[str, int]
    changes: dict[str, ClassChanges] = field(default_factory=dict)
    rewritten: tuple[str, ...] = ()
    renamed: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        """Whether the sync changed anything under ``root``."""
        return bool(self.rewritten) or any(
            c.added or c.removed or c.replaced for c in self.changes.values()
        )


@dataclass(frozen=True)
class _Record:
    """One file of data.source: where it is, its class, its path under the class folder."""

    source: Path
    label: str
    name: str  # posix path below the class folder ("a/x.png" for <class>/a/x.png)
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def relative(self) -> str:
        """Its path under data/raw (``<class>/<name>``), as the source spells it."""
        return f"{self.label}/{self.name}"


def _elpv_records(max_per_class: int | None) -> list[_Record]:
    """Every ELPV cell with its class and attributes, in the package's own order."""
    import elpv_dataset

    labels_csv = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    records = []
    for line in labels_csv.read_text().splitlines():
        if not line.strip():
            continue
        rel_path, probability, cell_type = line.split()
        label = "defective" if float(probability) >= ELPV_DEFECT_THRESHOLD else "functional"
        attributes = {"cell_type": cell_type, "defect_probability": probability}
        path = labels_csv.parent / rel_path
        records.append(_Record(path, label, path.name, attributes))
    return _first_per_class(records, max_per_class)


def _folder_records(
    root: Path, max_per_class: int | None
) -> tuple[list[_Record], list[dict[str, str]]]:
    """Every non-hidden file below each class folder of ``root``, and the folders not followed.

    A class folder that is a symlink is followed (a real way to assemble a dataset); symlinked
    folders inside a class are not, so a link cannot pull in a tree from anywhere (or loop).
    """
    if not root.is_dir():
        # A clone may hold data/raw (dvc pull) without the folder it came from.
        raise DataError(
            f"data.source: '{root}' is not a directory (allowed: 'elpv', or the path of an "
            "ImageFolder directory laid out as <class>/<image files>). To re-run on the data/raw "
            "that DVC holds instead (`dvc pull`), run `dvc repro --downstream prepare`"
        )
    records, ignored = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p)):
        files, links = _class_files(class_dir)
        records.extend(_Record(path, class_dir.name, name) for name, path in files)
        ignored.extend(
            {"path": portable_name(f"{class_dir.name}/{name}"), "reason": FOLDER_NOT_FOLLOWED}
            for name in links
        )
    return _first_per_class(records, max_per_class), ignored


def _class_files(class_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(name below the class, path) of every non-hidden file, sorted; and symlinked folders.

    Hidden folders are pruned at every depth, so nothing under ``.git/`` or ``.cache/`` is seen.
    """
    files, links = [], []
    for folder, subfolders, names in os.walk(class_dir):
        base = Path(folder).relative_to(class_dir)
        subfolders[:] = [name for name in subfolders if not is_hidden(Path(name))]
        for name in subfolders:
            if os.path.islink(os.path.join(folder, name)):  # os.walk does not descend these
                links.append((base / name).as_posix())
        files.extend(base / name for name in names if not is_hidden(Path(name)))
    return [(name.as_posix(), class_dir / name) for name in sorted(files)], sorted(links)


def _first_per_class(records: list[_Record], max_per_class: int | None) -> list[_Record]:
    if max_per_class is None:
        return records
    taken: Counter[str] = Counter()
    subset = []
    for record in records:
        if taken[record.label] < max_per_class:
            taken[record.label] += 1
            subset.append(record)
    return subset


@dataclass
class _Plan:
    """What data/raw should hold after a sync, and what of the source it leaves out.

    Attributes:
        wanted: ``{"<class>/<path>": source file}``, paths as data/raw spells them.
        attributes: attributes.csv rows.
        uncopied: ``{"path", "reason"}`` per source file not copied.
        renamed: ``{"path", "reason"}`` per file copied under another name (not valid UTF-8).
        ignored: ``{"path", "reason"}`` per symlinked folder inside a class (not followed).
    """

    wanted: dict[str, Path] = field(default_factory=dict)
    attributes: list[dict] = field(default_factory=list)
    uncopied: list[dict] = field(default_factory=list)
    renamed: list[dict] = field(default_factory=list)
    ignored: list[dict] = field(default_factory=list)

    def notes(self) -> dict[str, list[dict]]:
        """The report entries besides ``skipped`` and ``empty_classes``."""
        return {"renamed": self.renamed, "ignored": self.ignored}


def ingest(config: DataConfig, raw_dir: Path, workspace: Path | None = None) -> IngestResult:
    """Sync ``raw_dir`` with ``data.source``: copy new images, replace changed ones, drop gone ones.

    Only images are copied: files with an image extension that are regular files once symlinks
    are resolved and that start like an image (``IMAGE_SIGNATURE``). Everything else is listed
    in ``ingest_report.json``, which prepare folds into its validation report. Subfolders of a
    class keep their place (``cls/a/x.png`` -> ``data/raw/cls/a/x.png``).

    Unchanged files are left alone (same inode and mtime), so DVC's hash cache stays warm and
    ``data/raw`` keeps its md5 when the source did not change. Each file is copied to a hidden
    temp file beside its target and renamed into place, so an interrupted sync never leaves a
    half-written file under a final name; the next sync removes its temp files and finishes.

    Args:
        config: the data section (``data.source``, ``data.max_per_class``).
        raw_dir: the data/raw folder to sync.
        workspace: the project folder (default: the current one), which data.source must not be
            nor contain.

    Raises:
        DataError: ``data.source`` is not ``elpv`` nor a folder, overlaps the workspace or
            data/raw, or holds no images; data/raw is left as it was.
    """
    plan = _plan(config, raw_dir, Path.cwd() if workspace is None else workspace)
    raw_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(raw_dir)
    tally: dict[str, Counter[str]] = {}
    for relative, source in progress(list(plan.wanted.items()), "ingest"):
        outcome = _sync_file(source, raw_dir / relative)
        tally.setdefault(relative.split("/")[0], Counter())[outcome] += 1
    _remove_unwanted(raw_dir, set(plan.wanted), tally)
    empty = _empty_classes(config.source, {relative.split("/")[0] for relative in plan.wanted})
    rewritten = _write_root_files(raw_dir, plan, empty)
    changes = {label: ClassChanges(**counts) for label, counts in sorted(tally.items())}
    counts = {label: c.added + c.replaced + c.unchanged for label, c in changes.items()}
    return IngestResult(
        raw_dir,
        {k: n for k, n in counts.items() if n},
        changes,
        rewritten,
        tuple(item["path"] for item in plan.renamed),
    )


def _plan(config: DataConfig, raw_dir: Path, workspace: Path) -> _Plan:
    """Read data.source and decide what data/raw should hold, before anything is written."""
    ignored: list[dict] = []
    if config.source == "elpv":
        records = _elpv_records(config.max_per_class)
    else:
        root = Path(config.source).expanduser()
        _check_source_location(config.source, root, raw_dir, workspace)
        records, ignored = _folder_records(root, config.max_per_class)
    if not records:
        raise DataError(f"data.source '{config.source}' holds no files under <class>/ folders")
    plan = _wanted_files(records)
    plan.ignored = ignored
    if not plan.wanted:
        reasons = "; ".join(f"{item['path']}: {item['reason']}" for item in plan.uncopied[:3])
        raise DataError(
            f"data.source '{config.source}' holds no images under <class>/ folders "
            f"({len(plan.uncopied)} other file(s), e.g. {reasons}). Put image files there."
        )
    return plan


def _check_source_location(source: str, root: Path, raw_dir: Path, workspace: Path) -> None:
    """Refuse a data.source, or a class folder linked elsewhere, that would make the project
    ingest its own folders (or data/raw into itself, growing on every run).

    Raises:
        DataError: it is the workspace, holds it, or overlaps ``raw_dir``.
    """
    linked = [p for p in root.iterdir() if p.is_symlink() and p.is_dir()] if root.is_dir() else []
    for folder in [root, *linked]:
        what = _overlap(folder.resolve(), raw_dir, workspace.resolve())
        if what is None:
            continue
        where = f"'{source}'" if folder == root else f"'{source}': class folder {folder.name}"
        raise DataError(
            f"data.source: {where} is {what}, so the project's own files would be ingested. "
            "Set data.source in params.yaml to a folder of <class>/<image files> outside the "
            "project."
        )


def _overlap(folder: Path, raw_dir: Path, work: Path) -> str | None:
    """How resolved ``folder`` overlaps the workspace or data/raw, in words; None if it does not."""
    raw = raw_dir.resolve()
    if work.is_relative_to(folder):
        return "the workspace" if folder == work else f"a folder holding the workspace {work}"
    if folder.is_relative_to(raw):
        return f"inside {raw_dir}, which ingest writes"
    if raw.is_relative_to(folder):
        return f"a folder holding {raw_dir}, which ingest writes"
    return None


def _wanted_files(records: list[_Record]) -> _Plan:
    """The files data/raw should hold, with their attribute rows, and what is not copied.

    A name that is not valid UTF-8 is copied with each undecodable byte as ``%XX``
    (``portable_name``): every later stage, the manifest and the reports then carry plain text.
    """
    plan = _Plan()
    attributes: dict[str, dict] = {}
    spelled = {record.relative for record in records}
    for record in records:
        relative = portable_name(record.relative)
        if reason := _uncopyable(record.source):
            plan.uncopied.append({"path": relative, "reason": reason})
            continue
        if relative != record.relative:
            if relative in spelled:
                plan.uncopied.append({"path": relative, "reason": NAME_TAKEN})
                continue
            plan.renamed.append({"path": relative, "reason": RENAMED})
        plan.wanted[relative] = record.source
        if record.attributes:
            attributes[relative] = {"path": relative, **record.attributes}
    plan.attributes = list(attributes.values())
    return plan


def _sync_file(source: Path, target: Path) -> str:
    """Make ``target`` a copy of ``source``: returns 'added', 'replaced' or 'unchanged'."""
    if not os.path.lexists(target):
        _atomic_copy(source, target)
        return "added"
    if target.is_symlink() or not target.is_file():  # data/raw holds plain files only
        _remove_path(target)
    elif _same_content(source, target):
        return "unchanged"
    _atomic_copy(source, target)
    return "replaced"


def _same_content(source: Path, target: Path) -> bool:
    """Size and mtime first; file hashes only when the sizes match but the mtimes differ."""
    source_stat, target_stat = source.stat(), target.stat()
    if source_stat.st_size != target_stat.st_size:
        return False
    if source_stat.st_mtime_ns == target_stat.st_mtime_ns:
        return True
    if file_sha256(source) != file_sha256(target):
        return False
    # Same bytes, other mtime (the source was touched, or data/raw came from an older ingest that
    # did not keep mtimes): take the source's mtime so the next sync needs no hashing.
    os.utime(target, ns=(target_stat.st_atime_ns, source_stat.st_mtime_ns))
    return True


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy bytes, mode and mtime via a hidden temp file and a rename.

    The bytes come from one open of ``source`` (following symlinks: data/raw holds plain files
    only), and their start is checked again: a file swapped after the sync planned it, such as a
    link re-pointed at a secret, is refused rather than copied.

    Raises:
        DataError: the bytes read are not an image's.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as reader, _temp_beside(target) as tmp:
        head = reader.read(IMAGE_HEAD_BYTES)
        if not IMAGE_SIGNATURE.match(head):
            raise DataError(
                f"{source} changed while ingest copied it and is not an image now: "
                "run `headswap ingest` again"
            )
        with open(tmp, "wb") as writer:
            writer.write(head)
            shutil.copyfileobj(reader, writer)
        shutil.copystat(source, tmp)


@contextlib.contextmanager
def _temp_beside(target: Path) -> Iterator[Path]:
    """A hidden temp file beside ``target``, renamed onto it if the block succeeds."""
    tmp = create_temp_beside(target, INGEST_TMP_SUFFIX)
    try:
        yield tmp
        descriptor = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the bytes are on disk before the name points at them
        finally:
            os.close(descriptor)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _files_under(root: Path) -> set[str]:
    """Every non-folder entry under ``root`` (symlinks to folders included), relative, posix."""
    found = set()
    for folder, subfolders, files in os.walk(root):
        base = Path(folder).relative_to(root)
        links = [name for name in subfolders if os.path.islink(os.path.join(folder, name))]
        found.update((base / name).as_posix() for name in [*files, *links])
    return found


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _remove_unwanted(raw_dir: Path, wanted: set[str], tally: dict[str, Counter[str]]) -> None:
    """Delete what the source no longer holds (and the folders that leaves empty)."""
    for relative in sorted(_files_under(raw_dir) - wanted - ROOT_FILES):
        _remove_path(raw_dir / relative)
        if "/" in relative:  # a stray file at the root belongs to no class
            tally.setdefault(relative.split("/")[0], Counter())["removed"] += 1
    _remove_empty_folders(raw_dir)


def _remove_leftovers(raw_dir: Path) -> None:
    """Delete what an interrupted ingest left: temp files, and old ingests' staging folders."""
    for relative in _files_under(raw_dir):
        if Path(relative).name.endswith(INGEST_TMP_SUFFIX):
            (raw_dir / relative).unlink(missing_ok=True)
    for suffix in (".ingest-tmp", ".old-tmp"):  # ingest before the sync built a whole copy
        shutil.rmtree(raw_dir.with_name(raw_dir.name + suffix), ignore_errors=True)


def _remove_empty_folders(raw_dir: Path) -> None:
    """Folders emptied by deletions go too: DVC cannot version an empty folder anyway."""
    for folder, _, _ in os.walk(raw_dir, topdown=False):
        if Path(folder) == raw_dir:
            continue
        with os.scandir(folder) as entries:
            empty = not any(entries)
        if empty:
            os.rmdir(folder)


def _write_root_files(raw_dir: Path, plan: _Plan, empty: list[str]) -> tuple[str, ...]:
    """Write attributes.csv and ingest_report.json (or remove them), only where content changed."""
    attributes = None
    if plan.attributes:
        columns = list(plan.attributes[0])
        rows = ([row[column] for column in columns] for row in plan.attributes)
        attributes = csv_text(columns, rows, line_end="\r\n")  # the bytes it always had
    report = None
    if plan.uncopied or empty or plan.renamed or plan.ignored:
        found = {"skipped": plan.uncopied, "empty_classes": empty}
        # The newer keys only when they hold something, so reports keep the bytes they had.
        found.update((key, items) for key, items in plan.notes().items() if items)
        report = json.dumps(found, indent=2)
    contents = {ATTRIBUTES_FILE: attributes, INGEST_REPORT_FILE: report}
    return tuple(name for name, text in contents.items() if _write_if_changed(raw_dir / name, text))


def _write_if_changed(path: Path, text: str | None) -> bool:
    """Make ``path`` hold ``text`` (absent for None), touching it only if it differs."""
    if text is None:
        if not path.exists():
            return False
        path.unlink()
        return True
    if path.is_file() and path.read_bytes() == text.encode():
        return False
    with _temp_beside(path) as tmp:
        tmp.write_bytes(text.encode())
    return True


def _empty_classes(source: str, filled: set[str]) -> list[str]:
    """Class folders of an ImageFolder source with no files (DVC cannot version empty folders)."""
    if source == "elpv":
        return []
    root = Path(source).expanduser()
    names = (portable_name(p.name) for p in root.iterdir() if p.is_dir() and not is_hidden(p))
    return sorted(name for name in names if name not in filled)


def _uncopyable(path: Path) -> str | None:
    """Why ingest cannot or will not copy ``path`` (maybe a symlink), or None.

    Only a file with an image extension and an image's first bytes is copied.
    """
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image extension ({path.suffix or 'none'})"
    if path.is_file():
        return _not_an_image(path)
    return unreadable_reason(path)


def _not_an_image(path: Path) -> str | None:
    """Why a regular file's first bytes are not an image's (``IMAGE_SIGNATURE``), or None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(IMAGE_HEAD_BYTES)
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    if not head:
        return "empty file (0 bytes)"
    if IMAGE_SIGNATURE.match(head):
        return None
    return "not an image file (its first bytes match no image format)"
