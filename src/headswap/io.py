"""Atomic file output, CSV cells a spreadsheet cannot run, file hashes, markdown tables,
flattened mappings, and progress display.

Every artifact is written to a temporary file in the same folder and renamed into place, so an
interrupted run leaves either the old file or the new one, never half of one. Temp files are
hidden and end in ``.tmp`` (``is_temp_file``), so a leftover one is never taken for an output.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

TEMP_SUFFIX = ".tmp"
# Every temp file in src/ is hidden and ends like this: ".tmp" here and in the feature cache,
# ".ingest-tmp" in ingest.
TEMP_ENDINGS = (TEMP_SUFFIX, "-tmp")
# Cells starting with these run as formulas when a spreadsheet opens the CSV (OWASP, "CSV
# injection"); leading whitespace is skipped by spreadsheets, so it does not hide them.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# A plain number ("-0.5", "+1e-3") is data a spreadsheet reads as a number, never a formula.
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def is_temp_file(path: Path | str) -> bool:
    """Whether ``path`` names a temp file of an atomic write (an interrupted run leaves these)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_ENDINGS)


def output_files(folder: Path) -> list[Path]:
    """The finished files directly in ``folder``: no temp files, hidden files or subfolders.

    Upload these rather than the whole folder, so a killed run's leftovers never become
    artifacts.
    """
    return sorted(
        path
        for path in Path(folder).iterdir()
        if path.is_file() and not path.name.startswith(".") and not is_temp_file(path)
    )


def create_temp_beside(target: Path, suffix: str = TEMP_SUFFIX) -> Path:
    """Create an empty hidden temp file beside ``target`` and return its path.

    Its permissions are those of ``target`` when it exists (so a rename keeps the owner's
    choice), else the usual ``0o666`` less the umask: ``tempfile.mkstemp`` would give 0600.
    """
    target = Path(target)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{suffix}")
        try:
            descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with contextlib.suppress(FileNotFoundError):
            _keep_owner_and_mode(target, descriptor)
    finally:
        os.close(descriptor)
    return tmp


def _keep_owner_and_mode(target: Path, descriptor: int) -> None:
    """Give the temp file (open as ``descriptor``) the mode and, where allowed, owner of target."""
    existing = os.stat(target)
    if (existing.st_uid, existing.st_gid) != (os.getuid(), os.getgid()):
        with contextlib.suppress(PermissionError):  # only root may give a file to someone else
            os.fchown(descriptor, existing.st_uid, existing.st_gid)
    os.fchmod(descriptor, existing.st_mode & 0o777)  # after chown, which may clear mode bits


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` if the block succeeds.

    The file keeps ``target``'s permissions, or gets the umask's for a new file.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_beside(target)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode())


def defuse_cell(value: object) -> object:
    """A CSV cell that a spreadsheet shows as text instead of running it as a formula.

    Text starting with ``= + - @``, a tab or a CR (after any leading spaces) gets a leading
    ``'``; so does text already starting with ``'``, which makes ``restore_cell`` exact. Plain
    numbers and non-text values pass unchanged.
    """
    if not isinstance(value, str):
        return value
    if value.startswith("'") or (
        value.lstrip(" \u00a0").startswith(FORMULA_PREFIXES) and not _PLAIN_NUMBER.fullmatch(value)
    ):
        return "'" + value
    return value


def restore_cell(text: str) -> str:
    """The value ``defuse_cell`` was given, from the cell it returned."""
    return text[1:] if text.startswith("'") else text


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]], line_end: str = "\n") -> str:
    """CSV text, one line per row, every cell (the header's too) passed through ``defuse_cell``."""
    buffer = io.StringIO()
    plain = csv.writer(buffer, lineterminator=line_end)
    # Python 3.11 quotes only the line end's own characters: a lone CR in a name would end the
    # row for a reader. A row holding one is written fully quoted; the others keep their bytes.
    quoted = csv.writer(buffer, lineterminator=line_end, quoting=csv.QUOTE_ALL)
    for row in [header, *rows]:
        cells = [defuse_cell(cell) for cell in row]
        breaks = any(isinstance(cell, str) and ("\r" in cell or "\n" in cell) for cell in cells)
        (quoted if breaks else plain).writerow(cells)
    return buffer.getvalue()


def parse_csv(text: str) -> list[dict[str, str]]:
    """Rows of CSV text written by ``csv_text``, as dicts, with every cell restored."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [restore_cell(cell) for cell in next(reader, [])]
    return [dict(zip(header, map(restore_cell, row), strict=False)) for row in reader if row]


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file written by ``csv_text`` (see ``parse_csv``)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return parse_csv(handle.read())


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (the one file hash in headswap)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` and newlines inside cells are escaped."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(mapping: Mapping, prefix: str = "") -> dict[str, object]:
    """Nested mappings as one level of dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def progress(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    size: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """Iterate with a rich progress bar (rate and ETA) on stderr; silent when not a terminal.

    With ``size``, each item counts as that many units (a batch as its images), so ``total``
    and the rate are in those units rather than in items.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    if total is None and isinstance(items, Sized):
        total = len(items)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")
        for item in items:
            yield item
            bar.advance(task, size(item) if size else 1)
            speed = bar.tasks[0].speed
            if speed:
                bar.update(task, rate=f"{speed:.1f}/s")
