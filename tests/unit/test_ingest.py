"""Ingest syncs data.source into data/raw: it mirrors changes and leaves unchanged files alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from headswap.config import DataConfig
from headswap.errors import DataError
from headswap.ingest import ClassChanges, ingest
from headswap.raw_layout import ATTRIBUTES_FILE, INGEST_REPORT_FILE
from tests.helpers.workspace import noise_folder, noise_image


def snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """(inode, mtime_ns, ctime_ns, bytes) of every file: any write or touch changes it."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            info = path.stat()
            key = path.relative_to(root).as_posix()
            state[key] = (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, path.read_bytes())
    return state


@pytest.fixture
def source(tmp_path) -> Path:
    return noise_folder(tmp_path / "source", {"cat": 3, "dog": 2})


def sync(source: Path, raw: Path, **data):
    return ingest(DataConfig(source=str(source), **data), raw)


def test_first_sync_copies_every_file_with_its_mtime(source, tmp_path):
    raw = tmp_path / "raw"
    result = sync(source, raw)
    assert result.class_counts == {"cat": 3, "dog": 2}
    assert result.changes == {"cat": ClassChanges(added=3), "dog": ClassChanges(added=2)}
    assert result.changed
    for name in ("cat/0.png", "cat/2.png", "dog/1.png"):
        assert (raw / name).read_bytes() == (source / name).read_bytes()
        assert (raw / name).stat().st_mtime_ns == (source / name).stat().st_mtime_ns


def test_a_second_sync_with_no_change_touches_nothing(source, tmp_path):
    raw = tmp_path / "raw"
    sync(source, raw)
    before = snapshot(raw)
    result = sync(source, raw)
    assert snapshot(raw) == before
    assert result.changes == {"cat": ClassChanges(unchanged=3), "dog": ClassChanges(unchanged=2)}
    assert not result.changed and result.rewritten == ()


def test_added_removed_and_replaced_files_are_mirrored_and_reported_per_class(source, tmp_path):
    raw = tmp_path / "raw"
    sync(source, raw)
    before = snapshot(raw)
    noise_image(50).save(source / "cat" / "new.png")
    (source / "cat" / "1.png").unlink()
    noise_image(51).save(source / "dog" / "0.png")  # same name, other image
    (source / "bird").mkdir()
    noise_image(52).save(source / "bird" / "b.png")
    result = sync(source, raw)
    assert result.changes == {
        "bird": ClassChanges(added=1),
        "cat": ClassChanges(added=1, removed=1, unchanged=2),
        "dog": ClassChanges(replaced=1, unchanged=1),
    }
    assert result.class_counts == {"bird": 1, "cat": 3, "dog": 2}
    assert not (raw / "cat" / "1.png").exists()
    assert (raw / "dog" / "0.png").read_bytes() == (source / "dog" / "0.png").read_bytes()
    after = snapshot(raw)
    assert after["cat/0.png"] == before["cat/0.png"] and after["dog/1.png"] == before["dog/1.png"]


def test_same_size_other_bytes_is_replaced(source, tmp_path):
    raw = tmp_path / "raw"
    sync(source, raw)
    blob = bytearray((source / "cat" / "0.png").read_bytes())
    blob[-20] ^= 0xFF  # same length, one byte different
    (source / "cat" / "0.png").write_bytes(bytes(blob))
    assert sync(source, raw).changes["cat"] == ClassChanges(replaced=1, unchanged=2)
    assert (raw / "cat" / "0.png").read_bytes() == bytes(blob)


def test_a_touched_source_file_is_hashed_once_and_not_copied(source, tmp_path):
    raw = tmp_path / "raw"
    sync(source, raw)
    inode = (raw / "cat" / "0.png").stat().st_ino
    os.utime(source / "cat" / "0.png", ns=(0, 10**18))
    assert sync(source, raw).changes["cat"] == ClassChanges(unchanged=3)
    assert (raw / "cat" / "0.png").stat().st_ino == inode
    assert (raw / "cat" / "0.png").stat().st_mtime_ns == 10**18
    before = snapshot(raw)
    sync(source, raw)
    assert snapshot(raw) == before


def test_a_class_that_vanishes_is_removed_with_its_folder(source, tmp_path):
    raw = tmp_path / "raw"
    sync(source, raw)
    for path in (source / "dog").iterdir():
        path.unlink()
    (source / "dog").rmdir()
    result = sync(source, raw)
    assert result.changes["dog"] == ClassChanges(removed=2)
    assert result.class_counts == {"cat": 3}
    assert not (raw / "dog").exists()


def test_leftover_temp_files_and_stray_files_are_removed(source, tmp_path):
    raw = tmp_path / "raw"
    sync(source, raw)
    leftover = raw / "cat" / ".0.png.abc123.ingest-tmp"
    leftover.write_bytes(b"half a file")
    (raw / "cat" / "not in source.png").write_bytes(b"x")
    (raw / "empty folder").mkdir()
    (tmp_path / "raw.ingest-tmp" / "cat").mkdir(parents=True)  # an older ingest's staging copy
    result = sync(source, raw)
    assert not leftover.exists() and not (raw / "cat" / "not in source.png").exists()
    assert result.changes["cat"] == ClassChanges(removed=1, unchanged=3)
    assert not (raw / "empty folder").exists()  # DVC cannot version an empty folder anyway
    assert not (tmp_path / "raw.ingest-tmp").exists()
    assert not any(path.name.endswith(".ingest-tmp") for path in raw.rglob("*"))


def test_broken_symlinks_are_reported_and_the_report_is_rewritten_only_on_change(source, tmp_path):
    raw = tmp_path / "raw"
    (source / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    first = sync(source, raw)
    report = raw / INGEST_REPORT_FILE
    assert "broken symlink" in report.read_text() and INGEST_REPORT_FILE in first.rewritten
    before = report.stat()
    second = sync(source, raw)
    assert second.rewritten == () and report.stat().st_mtime_ns == before.st_mtime_ns
    assert report.stat().st_ino == before.st_ino
    (source / "cat" / "gone.png").unlink()
    assert sync(source, raw).rewritten == (INGEST_REPORT_FILE,)
    assert not report.exists()


def test_max_per_class_keeps_the_first_files(source, tmp_path):
    raw = tmp_path / "raw"
    result = sync(source, raw, max_per_class=2)
    assert result.class_counts == {"cat": 2, "dog": 2}
    assert sorted(path.name for path in (raw / "cat").iterdir()) == ["0.png", "1.png"]


def test_elpv_source_writes_attributes_once(tmp_path):
    raw = tmp_path / "raw"
    first = sync(Path("elpv"), raw, max_per_class=2)
    assert first.class_counts == {"defective": 2, "functional": 2}
    assert ATTRIBUTES_FILE in first.rewritten
    header = (raw / ATTRIBUTES_FILE).read_text().splitlines()[0]
    assert header == "path,cell_type,defect_probability"
    before = snapshot(raw)
    assert not sync(Path("elpv"), raw, max_per_class=2).changed
    assert snapshot(raw) == before


def test_an_empty_source_is_an_error_and_leaves_data_raw_alone(source, tmp_path):
    raw = tmp_path / "raw"
    sync(source, raw)
    before = snapshot(raw)
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no files"):
        sync(empty, raw)
    assert snapshot(raw) == before
