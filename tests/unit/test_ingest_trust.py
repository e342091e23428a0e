"""Ingest copies images only, keeps nested paths, refuses a source overlapping the project, and
turns file names that are not UTF-8 into names every later stage can write and find."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from headswap.config import DataConfig
from headswap.errors import DataError
from headswap.ingest import NAME_TAKEN, ClassChanges, ingest
from headswap.manifest import read_manifest
from headswap.prepare import prepare
from headswap.raw_layout import INGEST_REPORT_FILE
from tests.helpers.workspace import noise_folder, noise_image

SECRET = b"[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = hunter2\n"


def sync(source: Path, raw: Path, workspace: Path | None = None, **data):
    return ingest(DataConfig(source=str(source), **data), raw, workspace=workspace)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def report(raw: Path) -> dict[str, str]:
    items = json.loads((raw / INGEST_REPORT_FILE).read_text())["skipped"]
    return {item["path"]: item["reason"] for item in items}


def test_nothing_but_images_is_copied_even_when_named_or_linked_as_one(tmp_path):
    source = noise_folder(tmp_path / "source", {"cat": 3, "dog": 3})
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_bytes(SECRET)
    cat = source / "cat"
    (cat / "credentials.png").symlink_to(home / ".aws" / "credentials")  # image name, text inside
    (cat / "notes.txt").write_text("labelling notes")
    (cat / "text.jpg").write_text("a text file, not a JPEG")
    (cat / "empty.png").write_bytes(b"")
    (cat / "BMW.bmp").write_bytes(b"BMW owners list: " + bytes(40))  # starts "BM", not a bitmap
    os.mkfifo(cat / "pipe.png")  # not a regular file: opening it would block the sync
    (cat / ".git").mkdir()
    noise_image(7).save(cat / ".git" / "hidden-folder.png")  # hidden folder, at depth
    (cat / "sub" / ".cache").mkdir(parents=True)
    noise_image(8).save(cat / "sub" / ".cache" / "deeper.png")
    noise_image(9).save(cat / ".hidden.png")
    real = tmp_path / "real.png"
    noise_image(10).save(real)
    (cat / "link.png").symlink_to(real)  # a link to an image is an image

    result = sync(source, tmp_path / "raw")

    raw = tmp_path / "raw"
    assert files_under(raw) - {INGEST_REPORT_FILE} == {
        *(f"{label}/{i}.png" for label in ("cat", "dog") for i in range(3)),
        "cat/link.png",
    }
    assert result.class_counts == {"cat": 4, "dog": 3}
    assert not any(SECRET in path.read_bytes() for path in raw.rglob("*") if path.is_file())
    reasons = report(raw)
    assert reasons["cat/credentials.png"].startswith("not an image file")
    assert reasons["cat/text.jpg"].startswith("not an image file")
    assert reasons["cat/BMW.bmp"].startswith("not an image file")
    assert reasons["cat/empty.png"] == "empty file (0 bytes)"
    assert reasons["cat/notes.txt"] == "not an image extension (.txt)"
    assert reasons["cat/pipe.png"] == "not a regular file"
    assert not any(".git" in path or ".cache" in path or ".hidden" in path for path in reasons)


def test_every_image_format_ingest_accepts_starts_as_it_checks(tmp_path):
    source = noise_folder(tmp_path / "source", {"dog": 2})
    image = noise_image(1, 16)
    for fmt, suffix in (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("BMP", "bmp")):
        (source / "cat").mkdir(exist_ok=True)
        image.save(source / "cat" / f"x.{suffix}", fmt)
    image.save(source / "cat" / "x.tif", "TIFF")
    image.save(source / "cat" / "x.webp", "WEBP")
    result = sync(source, tmp_path / "raw")
    assert result.class_counts == {"cat": 6, "dog": 2}
    assert not (tmp_path / "raw" / INGEST_REPORT_FILE).exists()


def test_subfolders_keep_their_paths_so_equal_names_no_longer_collide(tmp_path):
    source = noise_folder(tmp_path / "source", {"cat": 2, "dog": 2})
    for index, sub in enumerate(("a", "b", "a/deep")):
        (source / "cat" / sub).mkdir(parents=True, exist_ok=True)
        noise_image(50 + index).save(source / "cat" / sub / "x.png")
    raw = tmp_path / "raw"
    result = sync(source, raw)
    assert result.changes["cat"] == ClassChanges(added=5)
    for sub in ("a", "b", "a/deep"):
        assert (raw / "cat" / sub / "x.png").read_bytes() == (
            source / "cat" / sub / "x.png"
        ).read_bytes()
    # prepare takes the nested paths: relative to data/raw, forward slashes, found on disk
    out = prepare(DataConfig(source=str(source), positive_class=None), raw, tmp_path / "prepared")
    rows = read_manifest(out.manifest)
    paths = {row["path"] for row in rows}
    assert {"cat/a/x.png", "cat/b/x.png", "cat/a/deep/x.png"} <= paths
    assert len(paths) == 7 and all((raw / path).is_file() for path in paths)
    # removing one nested file removes just that copy (and its emptied folder)
    (source / "cat" / "a" / "deep" / "x.png").unlink()
    assert sync(source, raw).changes["cat"] == ClassChanges(removed=1, unchanged=4)
    assert not (raw / "cat" / "a" / "deep").exists() and (raw / "cat" / "a" / "x.png").exists()


def test_a_linked_class_folder_is_followed_but_a_linked_folder_inside_a_class_is_not(tmp_path):
    elsewhere = noise_folder(tmp_path / "elsewhere", {"dogs": 3}, seed=500)
    source = noise_folder(tmp_path / "source", {"cat": 3})
    (source / "dog").symlink_to(elsewhere / "dogs", target_is_directory=True)
    outside = noise_folder(tmp_path / "outside", {"stuff": 2}, seed=900)
    (source / "cat" / "more").symlink_to(outside / "stuff", target_is_directory=True)
    raw = tmp_path / "raw"
    result = sync(source, raw)
    assert result.class_counts == {"cat": 3, "dog": 3}
    assert not (raw / "cat" / "more").exists()
    ignored = json.loads((raw / INGEST_REPORT_FILE).read_text())["ignored"]
    assert ignored == [{"path": "cat/more", "reason": "symlinked folder (not followed)"}]
    out = prepare(DataConfig(source=str(source), positive_class=None), raw, tmp_path / "prepared")
    assert ignored[0] in json.loads(out.report.read_text())["ignored"]


@pytest.mark.parametrize(
    ("where", "fragment"),
    [
        ("workspace", "is the workspace"),
        ("link to workspace", "is the workspace"),
        ("above workspace", "a folder holding the workspace"),
        ("inside raw", "inside"),
        ("holds raw", "a folder holding"),
    ],
)
def test_a_source_overlapping_the_workspace_or_data_raw_is_refused(tmp_path, where, fragment):
    work = tmp_path / "project"
    raw = work / "data" / "raw"
    noise_folder(work / "images", {"cat": 2, "dog": 2})
    sync(work / "images", raw, workspace=work)  # a source inside the project is fine
    before = files_under(raw)
    (tmp_path / "link").symlink_to(work, target_is_directory=True)
    source = {
        "workspace": work,
        "link to workspace": tmp_path / "link",
        "above workspace": tmp_path,
        "inside raw": raw / "cat",
        "holds raw": work / "data",
    }[where]
    with pytest.raises(DataError, match=fragment) as caught:
        sync(source, raw, workspace=work)
    assert "\n" not in str(caught.value) and "data.source" in str(caught.value)
    assert files_under(raw) == before


def test_a_source_of_non_images_only_is_refused_and_data_raw_kept(tmp_path):
    raw = tmp_path / "raw"
    sync(noise_folder(tmp_path / "source", {"cat": 2, "dog": 2}), raw)
    before = files_under(raw)
    other = tmp_path / "other" / "cat"
    other.mkdir(parents=True)
    (other / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        sync(tmp_path / "other", raw)
    assert files_under(raw) == before


def test_a_name_that_is_not_utf8_is_copied_escaped_and_reaches_the_manifest(tmp_path):
    source = noise_folder(tmp_path / "source", {"cat": 4, "dog": 4})
    latin1 = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name from an old archive
    noise_image(40).save(source / "cat" / latin1)
    os.mkdir(os.path.join(os.fsencode(source), b"b\xf6se"))  # a class folder too
    for index in range(2):
        noise_image(60 + index).save(source / os.fsdecode(b"b\xf6se") / f"{index}.png")
    raw = tmp_path / "raw"
    result = sync(source, raw)
    assert set(result.renamed) == {"cat/caf%E9.png", "b%F6se/0.png", "b%F6se/1.png"}
    assert (raw / "cat" / "caf%E9.png").read_bytes() == (source / "cat" / latin1).read_bytes()
    assert result.class_counts["b%F6se"] == 2
    out = prepare(DataConfig(source=str(source), positive_class=None), raw, tmp_path / "prepared")
    rows = read_manifest(out.manifest)
    paths = {row["path"] for row in rows}
    assert {"cat/caf%E9.png", "b%F6se/0.png"} <= paths
    assert all((raw / path).is_file() for path in paths)  # features read data/raw/<path>
    assert any("not valid UTF-8" in warning for warning in out.warnings)
    validation = json.loads(out.report.read_text())
    assert {item["path"] for item in validation["renamed"]} == set(result.renamed)
    # a second sync leaves the escaped copies alone
    assert not sync(source, raw).changed


def test_an_escaped_name_that_is_taken_is_reported_not_overwritten(tmp_path):
    source = noise_folder(tmp_path / "source", {"cat": 2, "dog": 2})
    noise_image(70).save(source / "cat" / "caf%E9.png")
    noise_image(71).save(source / "cat" / os.fsdecode(b"caf\xe9.png"))
    raw = tmp_path / "raw"
    sync(source, raw)
    assert (raw / "cat" / "caf%E9.png").read_bytes() == (source / "cat" / "caf%E9.png").read_bytes()
    assert report(raw)["cat/caf%E9.png"] == NAME_TAKEN


def test_a_name_that_is_not_utf8_put_in_data_raw_by_hand_is_skipped_with_an_escaped_path(
    tmp_path,
):
    raw = noise_folder(tmp_path / "raw", {"cat": 4, "dog": 4})
    noise_image(80).save(raw / "cat" / os.fsdecode(b"na\xefve.png"))
    out = prepare(DataConfig(source="elpv", positive_class=None), raw, tmp_path / "prepared")
    (skipped,) = out.skipped_files
    assert skipped["path"] == "cat/na%EFve.png" and "not valid UTF-8" in skipped["reason"]
    assert out.manifest.read_text().count("\n") == 9  # header + 8 images, no error


def test_a_file_swapped_for_a_non_image_after_the_sync_planned_it_is_not_copied(tmp_path):
    from headswap.ingest import _atomic_copy

    link = tmp_path / "x.png"
    noise_image(1).save(tmp_path / "image.png")
    (tmp_path / "secret").write_bytes(SECRET)
    link.symlink_to(tmp_path / "image.png")
    raw = tmp_path / "raw" / "cat"
    _atomic_copy(link, raw / "x.png")  # planned and copied while it was an image
    link.unlink()
    link.symlink_to(tmp_path / "secret")  # re-pointed between the plan and the copy
    with pytest.raises(DataError, match="not an image now"):
        _atomic_copy(link, raw / "y.png")
    assert sorted(path.name for path in raw.iterdir()) == ["x.png"]  # no copy, no temp file


def test_a_class_folder_linked_to_the_project_is_refused(tmp_path):
    work = tmp_path / "project"
    source = noise_folder(tmp_path / "source", {"cat": 2})
    noise_folder(work / "images", {"x": 2})
    (source / "dog").symlink_to(work, target_is_directory=True)  # would copy data/raw into itself
    with pytest.raises(DataError, match="class folder dog is the workspace"):
        sync(source, work / "data" / "raw", workspace=work)
    assert not (work / "data").exists()


def test_the_ingest_command_says_how_many_names_it_escaped(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from headswap.cli import app

    source = noise_folder(tmp_path / "source", {"cat": 3, "dog": 3})
    noise_image(41).save(source / "cat" / os.fsdecode(b"caf\xe9.png"))
    (tmp_path / "params.yaml").write_text(f"data:\n  source: {source}\n  positive_class: null\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ingest"])
    assert result.exit_code == 0, result.output
    assert "1 file name(s) not valid UTF-8" in result.output
    assert (tmp_path / "data/raw/cat/caf%E9.png").is_file()
