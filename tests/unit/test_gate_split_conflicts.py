"""Is comparing on today's test split fair? The pure split-conflict rules over two manifests."""

from __future__ import annotations

import numpy as np
import pytest

from headswap.config import PromotionGateConfig, RegistryConfig, SplitConfig
from headswap.errors import PromotionError
from headswap.evaluate import core_metrics
from headswap.lineage import split_tags
from headswap.promotion.fairness import class_conflict, new_test_images, split_conflicts
from headswap.promotion.promote import promote_version
from headswap.promotion.scoring import PromotionFiles
from headswap.promotion.statistics import Scores, compare

CURRENT = split_tags(SplitConfig())


def row(name: str, split: str, label: str = "cat", pixels: str | None = None) -> dict:
    found = {"path": f"{label}/{name}.png", "sha256": f"bytes-{name}", "label": label}
    found["split"] = split
    if pixels is not None:
        found["pixels_sha256"] = pixels
    return found


BEFORE = [row("t1", "test"), row("t2", "test"), row("v1", "val"), row("r1", "train")]
# Grown: everything kept its split, and new images arrived in every split.
AFTER = [*BEFORE, row("t3", "test"), row("t4", "test", "dog"), row("r2", "train")]


def test_grown_data_with_the_same_split_is_fair_and_counts_new_test_images():
    assert split_conflicts("1", BEFORE, CURRENT, AFTER, CURRENT) == []
    assert split_conflicts("2", AFTER, CURRENT, AFTER, CURRENT) == []
    assert new_test_images(BEFORE, AFTER) == 2
    assert new_test_images(AFTER, AFTER) == 0
    assert new_test_images(None, AFTER) is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("split_seed", "7"),
        ("split_test_size", "0.3"),
        ("split_val_size", "0.0"),
        ("split_rule", "x"),
    ],
)
def test_other_split_settings_are_a_conflict_naming_the_setting(key, value):
    conflicts = split_conflicts("1", BEFORE, {**CURRENT, key: value}, AFTER, CURRENT)
    assert conflicts == [
        f"v1 was split with {key}={value}, the workspace with {key}={CURRENT[key]}"
    ]


def test_a_version_without_split_tags_is_a_conflict():
    assert "split_rule=unrecorded" in split_conflicts("1", BEFORE, {}, AFTER, CURRENT)[0]


def test_a_test_image_the_version_trained_or_validated_on_is_a_conflict_with_an_example():
    learned = [row("t1", "train"), row("t2", "val"), row("v1", "val"), row("r1", "train")]
    assert split_conflicts("3", learned, CURRENT, AFTER, CURRENT) == [
        "2 current test image(s) were in v3's train/val split (e.g. cat/t1.png)"
    ]


def test_an_image_whose_label_changed_is_a_conflict():
    relabelled = [{**r, "label": "dog"} if r["path"] == "cat/r1.png" else r for r in BEFORE]
    conflicts = split_conflicts("1", relabelled, CURRENT, AFTER, CURRENT)
    assert conflicts == [
        "1 image(s) have another label than in v1's data (e.g. cat/r1.png: dog -> cat)"
    ]


def test_a_version_without_a_manifest_is_a_conflict():
    assert split_conflicts("5", None, CURRENT, AFTER, CURRENT) == [
        "v5 has no recorded split (registered before split records)"
    ]


def test_images_are_matched_by_pixels_when_both_manifests_have_them():
    # The champion trained on t9's pixels under another file name and encoding.
    theirs = [row("old-name", "train", pixels="P9")]
    today = [row("t9", "test", pixels="P9")]
    assert "1 current test image(s)" in split_conflicts("1", theirs, CURRENT, today, CURRENT)[0]
    # Without pixel hashes on one side, file bytes are compared: these differ, so no match.
    theirs_bytes_only = [{k: v for k, v in theirs[0].items() if k != "pixels_sha256"}]
    assert split_conflicts("1", theirs_bytes_only, CURRENT, today, CURRENT) == []


def test_different_class_lists_conflict_and_untagged_versions_do_not():
    cat_dog, dog_cat = '["cat", "dog"]', '["dog", "cat"]'
    assert class_conflict(("1", {"classes": cat_dog}), ("2", {"classes": cat_dog})) == []
    assert class_conflict(("1", {"classes": cat_dog}), ("2", {"classes": dog_cat})) == [
        f"v1 predicts {cat_dog}, v2 predicts {dog_cat}"
    ]
    assert class_conflict(("1", {}), ("2", {"classes": dog_cat})) == []


def test_the_comparison_table_says_how_many_test_images_are_new_to_the_champion():
    labels = np.array([0, 1, 0, 1])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    predictions = probabilities.argmax(1)
    metrics = core_metrics(probabilities, labels, predictions, ["a", "b"])
    scores = Scores("1", ["a", "b"], labels, probabilities, predictions, metrics)
    comparison = compare(scores, scores, PromotionGateConfig(bootstrap=0), new_to_champion=3)
    row_ = next(r for r in comparison.table_rows() if r["metric"] == "test images new to champion")
    assert row_["champion"] == "3 of 4" and row_["result"] == "info"
    assert comparison.audit_summary()["new_to_champion"] == 3


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"force": True}, "--force"),
        ({"allow_split_conflict": True, "reason": "  "}, "--allow-split-conflict"),
    ],
)
def test_an_override_without_a_reason_is_refused_before_anything_is_read(tmp_path, options, flag):
    missing = PromotionFiles(tmp_path / "no-manifest.csv", tmp_path)
    with pytest.raises(PromotionError, match=f"^{flag}: also pass --reason TEXT"):
        promote_version(RegistryConfig(), missing, split=SplitConfig(), **options)
