"""The layout of data/raw: what ingest writes there and prepare reads back.

``data/raw`` is an ImageFolder (``<class>/<image>``, subfolders kept). Besides the images, ingest
writes two files at its root: ``attributes.csv`` (per-image slice attributes such as ELPV's cell
type) and ``ingest_report.json`` (the source files it did not copy, which prepare folds into its
validation report).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

ATTRIBUTES_FILE = "attributes.csv"
# Files ingest could not copy (broken or looping symlinks): prepare folds them into its report.
INGEST_REPORT_FILE = "ingest_report.json"
FOLDER_NOT_FOLLOWED = "symlinked folder (not followed)"


def is_hidden(path: Path) -> bool:
    """Hidden and system files, which neither ingest nor prepare takes for images."""
    return path.name.startswith(".") or path.name.lower() in {"thumbs.db", "desktop.ini"}


def portable_name(relative: str) -> str:
    """``relative`` with every byte that is not valid UTF-8 written as ``%XX``.

    On POSIX, Python gives such bytes as lone surrogates (U+DC80..U+DCFF), which cannot be
    written to a UTF-8 file; valid names come back unchanged.
    """
    return "".join(
        f"%{ord(char) - 0xDC00:02X}" if 0xDC80 <= ord(char) <= 0xDCFF else char for char in relative
    )


def unreadable_reason(path: Path) -> str | None:
    """Why ``path`` (maybe a symlink) is not a regular file that can be read, or None."""
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
