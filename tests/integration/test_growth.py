"""The everyday loop through `headswap repro` (what `make repro` runs): images arrive in
data.source, and the next run sees them, embeds only them, and keeps every old image's split.

A small body (Lite0 at 96 px, one tap, no views) on generated images keeps each run short; the
behaviour under test is the DAG's, not the body's.
"""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers.workspace import (
    CLASSES,
    features_info,
    make_folder_workspace,
    make_image_folder,
    run,
    set_params,
)


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def manifest_splits(workspace: Path) -> dict[str, str]:
    with open(workspace / "data/prepared/manifest.csv", newline="") as handle:
        return {row["path"]: row["split"] for row in csv.DictReader(handle)}


def data_md5(workspace: Path) -> str:
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    (out,) = lock["stages"]["ingest"]["outs"]
    return out["md5"]


@pytest.fixture
def grown(tmp_path, feature_cache) -> tuple[Path, Path]:
    """A workspace on a 12-per-class folder source, after its first `headswap repro`."""
    workspace, source = make_folder_workspace(tmp_path, tmp_path / "cache")
    first = run(["headswap", "repro"], workspace)
    assert ran_stages(first.stdout)[:2] == ["ingest", "prepare"]
    return workspace, source


def test_added_removed_and_replaced_images_reach_the_model(grown):
    workspace, source = grown
    splits_before, md5_before = manifest_splits(workspace), data_md5(workspace)
    assert len(splits_before) == 24

    unchanged = run(["headswap", "repro"], workspace)
    assert ran_stages(unchanged.stdout) == ["ingest", "register"]
    assert data_md5(workspace) == md5_before, "an unchanged source made a new data version"

    make_image_folder(source, 5, first=12, size=40)
    (source / "functional" / "functional_0.png").unlink()
    shutil.copy(source / "defective" / "defective_1.png", source / "defective" / "defective_2.png")
    grew = run(["headswap", "repro"], workspace)
    assert "prepare" in ran_stages(grew.stdout)
    assert data_md5(workspace) != md5_before

    splits = manifest_splits(workspace)
    assert "functional/functional_0.png" not in splits
    assert {f"{c}/{c}_{i}.png" for c in CLASSES for i in range(12, 17)} <= set(splits)
    # defective_2 now holds defective_1's pixels: one image, kept once.
    assert "defective/defective_2.png" not in splits or "defective/defective_1.png" not in splits
    kept = {path for path in splits_before if path in splits}
    assert {path: splits[path] for path in kept} == {p: splits_before[p] for p in kept}, (
        "an existing image changed split when the data grew"
    )
    info = features_info(workspace)
    assert info["embedded"] == 10, "only the new images are embedded; the rest are cache hits"
    assert info["cache_hits"] == info["images"] - 10


def test_dvc_repro_follows_a_new_data_source(grown, tmp_path):
    """`dvc repro` itself (not only the flow) trains on whatever data.source names now."""
    workspace, _ = grown
    other = tmp_path / "other-source"
    make_image_folder(other, 8, first=500, size=40)
    set_params(workspace, data={"source": str(other)})
    result = run(["dvc", "repro"], workspace)
    assert ran_stages(result.stdout)[:2] == ["ingest", "prepare"]
    assert {Path(p).name for p in manifest_splits(workspace)} == {
        f"{c}_{i}.png" for c in CLASSES for i in range(500, 508)
    }


def test_other_drivers_wait_and_a_hand_run_dvc_repro_refuses(grown):
    from headswap.runlock import workspace_lock

    workspace, source = grown
    make_image_folder(source, 1, first=40, size=40)
    with workspace_lock("make run (test)", workspace / ".headswap/run.lock"):
        refused = run(["dvc", "repro"], workspace, check=False)
        wait_briefly = {"HEADSWAP_LOCK_WAIT_S": "1"}
        waited = run(["headswap", "repro"], workspace, wait_briefly, check=False)
        flow = run(["python", "-m", "flows.pipeline"], workspace, wait_briefly, check=False)
    assert refused.returncode != 0
    assert "in use by make run (test)" in refused.stdout + refused.stderr
    assert waited.returncode != 0 and "make run (test)" in waited.stderr
    assert flow.returncode != 0 and "in use by make run (test)" in flow.stderr
    # Nothing was half-done: the next run picks the new images up.
    run(["headswap", "repro"], workspace)
    assert "functional/functional_40.png" in manifest_splits(workspace)
