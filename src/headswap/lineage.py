"""What a model version records about its data, and how two versions' data compare.

Pure functions over manifest rows and split settings, shared by the register stage (which
writes them as tags and a changes report) and the promotion gate (which checks that comparing
two versions on today's test split is fair). No MLflow here.
"""

from __future__ import annotations

import hashlib

from headswap.config import SplitConfig
from headswap.manifest import SPLIT_RULE

SPLIT_TAGS = ("split_rule", "split_seed", "split_test_size", "split_val_size")


def split_tags(split: SplitConfig) -> dict[str, str]:
    """The tags that say how a version's images were split; equal tags mean equal splits."""
    return {
        "split_rule": SPLIT_RULE,
        "split_seed": str(split.seed),
        "split_test_size": str(float(split.test_size)),
        "split_val_size": str(float(split.val_size)),
    }


def test_fingerprint(manifest_rows: list[dict]) -> str:
    """Hash of the sorted test-image sha256s (informational: the gate checks splits, not this)."""
    hashes = sorted(row["sha256"] for row in manifest_rows if row["split"] == "test")
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def content_column(*manifests: list[dict]) -> str:
    """The manifest column that identifies an image's content in every one of ``manifests``.

    ``pixels_sha256`` (decoded pixels: a re-encoded copy is the same image) when all rows have
    it, else ``sha256`` (file bytes), so manifests written before the column still compare.
    """
    rows = [row for manifest in manifests for row in manifest]
    return "pixels_sha256" if rows and all(row.get("pixels_sha256") for row in rows) else "sha256"


def manifest_changes(old_rows: list[dict], new_rows: list[dict]) -> dict:
    """Per class, the images added, removed and changed from ``old_rows`` to ``new_rows``.

    Rows are keyed by path. ``changed`` counts a path whose content or label differs, and an
    image that moved to another class folder (same content under a new path and label), under
    its new class; an image merely renamed within its class counts as nothing.

    Returns:
        ``{"per_class": {class: {"added", "removed", "changed"}}, "total": {...}}``.
    """
    key = content_column(old_rows, new_rows)
    old = {row["path"]: row for row in old_rows}
    new = {row["path"]: row for row in new_rows}
    added = [new[path] for path in sorted(new.keys() - old.keys())]
    removed = [old[path] for path in sorted(old.keys() - new.keys())]
    gone = {row[key]: row for row in removed}
    moved = {row[key] for row in added} & gone.keys()
    counts = {label: {"added": 0, "removed": 0, "changed": 0} for label in _labels(new_rows)}
    for label in _labels(old_rows):
        counts.setdefault(label, {"added": 0, "removed": 0, "changed": 0})
    for path in sorted(new.keys() & old.keys()):
        if (new[path][key], new[path]["label"]) != (old[path][key], old[path]["label"]):
            counts[new[path]["label"]]["changed"] += 1
    for row in added:
        if row[key] not in moved:
            counts[row["label"]]["added"] += 1
        elif gone[row[key]]["label"] != row["label"]:
            counts[row["label"]]["changed"] += 1
    for row in removed:
        if row[key] not in moved:
            counts[row["label"]]["removed"] += 1
    total = {
        kind: sum(c[kind] for c in counts.values()) for kind in ("added", "removed", "changed")
    }
    return {"per_class": counts, "total": total}


def _labels(rows: list[dict]) -> list[str]:
    return sorted({row["label"] for row in rows})
