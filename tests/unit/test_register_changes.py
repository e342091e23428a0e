"""The register stage's pure parts: what changed between two manifests, the data md5, the split
tags, registry.json's record and the model card's changes table."""

from __future__ import annotations

import json

import pytest
import yaml

from headswap.config import SplitConfig
from headswap.lineage import content_column, manifest_changes, split_tags
from headswap.modelcard import _changes_section
from headswap.register import Registration, StageFiles, data_md5


def row(path: str, content: str, label: str | None = None, pixels: str | None = None) -> dict:
    found = {
        "path": path,
        "sha256": content,
        "label": label or path.split("/")[0],
        "split": "train",
    }
    if pixels is not None:
        found["pixels_sha256"] = pixels
    return found


OLD = [
    row("cat/a.png", "A"),
    row("cat/b.png", "B"),
    row("cat/c.png", "C"),
    row("dog/d.png", "D"),
    row("dog/e.png", "E"),
]


def test_added_removed_and_changed_are_counted_per_class():
    new = [
        row("cat/a.png", "A"),
        row("cat/b.png", "B2"),  # same path, new content
        row("dog/d.png", "D"),
        row("dog/e.png", "E"),
        row("dog/f.png", "F"),  # added
        row("dog/g.png", "G"),  # added
        row("bird/h.png", "H"),  # added, in a new class
    ]  # cat/c.png removed
    changes = manifest_changes(OLD, new)
    assert changes["per_class"] == {
        "bird": {"added": 1, "removed": 0, "changed": 0},
        "cat": {"added": 0, "removed": 1, "changed": 1},
        "dog": {"added": 2, "removed": 0, "changed": 0},
    }
    assert changes["total"] == {"added": 3, "removed": 1, "changed": 1}


def test_a_relabelled_image_is_changed_in_its_new_class_and_a_rename_is_no_change():
    new = [
        row("cat/a.png", "A"),
        row("cat/b-renamed.png", "B"),  # renamed within its class: the same image
        row("dog/c.png", "C"),  # moved to the other class folder: relabelled
        row("dog/d.png", "D"),
        row("dog/e.png", "E", label="cat"),  # same path, label changed
    ]
    changes = manifest_changes(OLD, new)
    assert changes["per_class"]["dog"] == {"added": 0, "removed": 0, "changed": 1}
    assert changes["per_class"]["cat"] == {"added": 0, "removed": 0, "changed": 1}
    assert changes["total"] == {"added": 0, "removed": 0, "changed": 2}


def test_identical_manifests_change_nothing_and_classes_that_vanished_are_listed():
    assert manifest_changes(OLD, OLD)["total"] == {"added": 0, "removed": 0, "changed": 0}
    gone = manifest_changes(OLD, [r for r in OLD if r["label"] == "cat"])
    assert gone["per_class"]["dog"] == {"added": 0, "removed": 2, "changed": 0}


def test_content_is_the_pixel_hash_when_every_row_has_one_else_the_file_hash():
    reencoded_old = [row("cat/a.png", "bytes-1", pixels="P")]
    reencoded_new = [row("cat/a.png", "bytes-2", pixels="P")]  # re-saved: same pixels
    assert content_column(reencoded_old, reencoded_new) == "pixels_sha256"
    assert manifest_changes(reencoded_old, reencoded_new)["total"]["changed"] == 0
    # An older manifest without the column: fall back to file bytes on both sides.
    assert content_column([row("cat/a.png", "bytes-1")], reencoded_new) == "sha256"
    assert manifest_changes([row("cat/a.png", "bytes-1")], reencoded_new)["total"]["changed"] == 1


def test_data_md5_comes_from_the_ingest_stage_in_dvc_lock_then_raw_dvc(tmp_path):
    files = StageFiles(dvc_lock=tmp_path / "dvc.lock", raw_dvc=tmp_path / "raw.dvc")
    assert data_md5(files) == "untracked"
    files.raw_dvc.write_text(yaml.safe_dump({"outs": [{"md5": "old.dir", "path": "raw"}]}))
    assert data_md5(files) == "old.dir"
    outs = [{"path": "data/other", "md5": "x"}, {"path": "data/raw", "md5": "new.dir"}]
    files.dvc_lock.write_text(yaml.safe_dump({"stages": {"ingest": {"outs": outs}}}))
    assert data_md5(files) == "new.dir"


def test_split_tags_name_the_rule_and_its_settings():
    from headswap.manifest import SPLIT_RULE

    assert split_tags(SplitConfig(seed=3, test_size=0.2, val_size=0)) == {
        "split_rule": SPLIT_RULE,
        "split_seed": "3",
        "split_test_size": "0.2",
        "split_val_size": "0.0",
    }


def test_registry_json_keeps_its_keys_and_never_records_reuse():
    changes = {"since_version": "1", "since_data_md5": "m", "per_class": {}, "total": {}}
    registration = Registration(
        "m",
        "2",
        "r",
        "e",
        "sqlite:///x",
        ["challenger"],
        "models:/m/2",
        "2024-01-01T00:00:00+00:00",
    )
    record = json.loads(
        Registration(**{**registration.__dict__, "data_changes": changes}).to_json()
    )
    assert "reused" not in record and record["data_changes"] == changes
    assert {"registered_at", "onnx_sha256", "data_md5", "tracking_uri", "run_id"} <= set(record)
    # A registry.json from before these keys still reads back.
    old = {k: v for k, v in record.items() if k not in ("registered_at", "data_changes")}
    assert Registration.from_record(old, reused=True).reused


@pytest.mark.parametrize("changes", [None, {}])
def test_a_card_without_changes_has_no_changes_section(changes):
    assert _changes_section(changes) == []


def test_the_card_shows_changes_per_class_or_why_there_are_none():
    changes = {
        "since_version": "4",
        "since_data_md5": "abc.dir",
        "per_class": {"cat": {"added": 2, "removed": 0, "changed": 1}},
        "total": {"added": 2, "removed": 0, "changed": 1},
        "note": None,
    }
    card = "\n".join(_changes_section(changes))
    assert "since the champion (v4)" in card and "abc.dir" in card
    assert "| cat | 2 | 0 | 1 |" in card and "| total | 2 | 0 | 1 |" in card
    none = {"since_version": None, "per_class": {}, "total": {}, "note": "no champion yet"}
    assert "no champion yet" in "\n".join(_changes_section(none))
