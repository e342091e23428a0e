"""Is comparing two versions on today's test split fair?

An image's split depends only on its content and the split settings, so the test split only
grows as images arrive. Comparing two versions on today's test split is fair when none of
today's test images was in either version's train or val split; each version's manifest (its
run artifact ``data/manifest.csv``) says which images those were. ``split_conflicts`` checks
that, and the split settings, labels and class lists; a conflict refuses the comparison unless
a person allows it (``allow_split_conflict``, with a reason; audited).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from headswap.config import SplitConfig
from headswap.lineage import SPLIT_TAGS, content_column, split_tags
from headswap.promotion.scoring import TestSet
from headswap.tracking import tracking_call, version_manifest

TRAINING_SPLITS = ("train", "val")  # what a model has learned from (val: calibration, stopping)


def split_conflicts(
    version: str,
    manifest: list[dict] | None,
    tags: dict[str, str],
    current_rows: list[dict],
    current_split: dict[str, str],
) -> list[str]:
    """Why scoring ``version`` on the workspace's test split would not be fair; [] if it is.

    Args:
        version: the version's number, for the messages.
        manifest: the rows the version was trained on (its ``data/manifest.csv``), or None.
        tags: the version's tags (``split_*`` as ``lineage.split_tags`` writes them).
        current_rows: the workspace's manifest rows.
        current_split: ``lineage.split_tags`` of the workspace's split settings.
    """
    if manifest is None:
        return [f"v{version} has no recorded split (registered before split records)"]
    conflicts = [
        f"v{version} was split with {key}={tags.get(key, 'unrecorded')}, the workspace with "
        f"{key}={current_split[key]}"
        for key in SPLIT_TAGS
        if tags.get(key) != current_split[key]
    ]
    key = content_column(manifest, current_rows)
    theirs = {row[key]: row for row in manifest}
    test = [row for row in current_rows if row["split"] == "test"]
    learned = [r for r in test if theirs.get(r[key], {}).get("split") in TRAINING_SPLITS]
    if learned:
        conflicts.append(
            f"{len(learned)} current test image(s) were in v{version}'s train/val split "
            f"(e.g. {learned[0]['path']})"
        )
    relabelled = [
        r for r in current_rows if r[key] in theirs and theirs[r[key]]["label"] != r["label"]
    ]
    if relabelled:
        first = relabelled[0]
        conflicts.append(
            f"{len(relabelled)} image(s) have another label than in v{version}'s data (e.g. "
            f"{first['path']}: {theirs[first[key]]['label']} -> {first['label']})"
        )
    return conflicts


def class_conflict(champion: tuple[str, dict], challenger: tuple[str, dict]) -> list[str]:
    """A conflict when the two (version, tags) record different class lists; [] otherwise."""
    (old, old_tags), (new, new_tags) = champion, challenger
    old_classes, new_classes = old_tags.get("classes"), new_tags.get("classes")
    if old_classes and new_classes and json.loads(old_classes) != json.loads(new_classes):
        return [f"v{old} predicts {old_classes}, v{new} predicts {new_classes}"]
    return []


def new_test_images(manifest: list[dict] | None, current_rows: list[dict]) -> int | None:
    """How many of the workspace's test images are not in ``manifest``'s test split."""
    if manifest is None:
        return None
    key = content_column(manifest, current_rows)
    seen = {row[key] for row in manifest if row["split"] == "test"}
    return sum(1 for row in current_rows if row["split"] == "test" and row[key] not in seen)


@dataclass(frozen=True)
class SplitReview:
    """Whether champion and challenger can be compared fairly on the workspace's test split."""

    conflicts: list[str]
    new_to_champion: int | None


def _recorded_split(mlflow_client, name: str, version: str) -> tuple[dict, list[dict] | None]:
    """A version's tags and the manifest it was trained on (None if it recorded none)."""
    tags = tracking_call(
        lambda: mlflow_client.get_model_version(name, version).tags, "reading the version"
    )
    manifest = tracking_call(
        lambda: version_manifest(mlflow_client, name, version), "reading its data/manifest.csv"
    )
    return dict(tags), manifest


def review_split(
    mlflow_client, name: str, champion: str, challenger: str, test_set: TestSet, split: SplitConfig
) -> SplitReview:
    """Check both versions' recorded splits against the workspace's test split."""
    current = split_tags(split)
    recorded = {v: _recorded_split(mlflow_client, name, v) for v in (champion, challenger)}
    conflicts = [
        conflict
        for version, (tags, manifest) in recorded.items()
        for conflict in split_conflicts(version, manifest, tags, test_set.rows, current)
    ]
    conflicts += class_conflict(
        (champion, recorded[champion][0]), (challenger, recorded[challenger][0])
    )
    return SplitReview(conflicts, new_test_images(recorded[champion][1], test_set.rows))
