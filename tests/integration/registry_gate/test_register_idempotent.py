"""The register stage on a real MLflow store: idempotent per store, lineage, label-set guard and
what changed since the champion's data.

DVC runs `headswap register` on every `dvc repro`, so it must register only when
models/registry.json does not already describe this model and data in the store in use. The
workspace holds the files the earlier stages write (a tiny real ONNX model, manifest, reports);
the cwd is the workspace, so the embedded ``sqlite:///<cwd>/mlflow.db`` store is the default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from registry_gate.conftest import GOOD, TINY_CLASSES, WORSE, tiny_model, write_images
from registry_gate.conftest import write_manifest as write_rows

MODEL = "tiny-register"
SPLITS = ("test", "val", "train", "train", "train")
METRICS = {
    "accuracy": 0.9,
    "balanced_accuracy": 0.9,
    "f1_macro": 0.9,
    "roc_auc": 0.95,
    "pr_auc": 0.94,
    "ece": 0.03,
    "ece_uncalibrated": 0.05,
    "temperature": 1.2,
    "threshold": 0.5,
    "n": 4,
    "classes": TINY_CLASSES,
    "confusion_matrix": [[2, 0], [0, 2]],
    "per_class": {
        name: {"precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 2} for name in TINY_CLASSES
    },
}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_lock(root: Path, md5: str) -> None:
    """dvc.lock as DVC writes it after the ingest stage synced data/raw."""
    lock = {"schema": "2.0", "stages": {"ingest": {"cmd": "headswap ingest", "outs": []}}}
    lock["stages"]["ingest"]["outs"] = [
        {"path": "data/raw", "hash": "md5", "md5": md5, "size": 1, "nfiles": 1}
    ]
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))


def write_data(root: Path, rows: list[dict], classes: list[str] = TINY_CLASSES) -> None:
    counts = {
        split: {c: sum(r["split"] == split and r["label"] == c for r in rows) for c in classes}
        for split in ("train", "val", "test")
    }
    write_rows(root / "data/prepared/manifest.csv", rows)
    write_json(
        root / "data/prepared/validation.json",
        {"classes": classes, "counts": counts, "images": len(rows), "skipped": []},
    )


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """What prepare ... export leave behind, for 2 classes x 10 images; cwd, embedded store."""
    root = tmp_path / "ws"
    rows = write_images(root / "data/raw", per_class=10)
    for index, row in enumerate(rows):
        row["split"] = SPLITS[index % len(SPLITS)]
    write_data(root, rows)
    identity = {"backbone": "tiny-brightness", "weights_sha256": "0" * 64}
    write_json(root / "data/features/features_info.json", {"identity": identity, "cache_key": "k"})
    write_json(root / "models/head.json", {"type": "logistic", "C": 1.0})
    (root / "models/head.pt").write_bytes(b"head weights")
    tiny_model(root / "models/model.onnx", *GOOD)
    write_json(root / "reports/export_parity.json", {"passed": True, "max_abs_diff": 1e-7})
    write_json(root / "reports/metrics.json", METRICS)
    write_lock(root, "aaaa.dir")
    (root / "params.yaml").write_text(
        f"registry:\n  model_name: {MODEL}\n  experiment: headswap-tests\n"
    )
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return root


def register():
    from headswap.config import load_params
    from headswap.register import StageFiles, register_model

    return register_model(load_params("params.yaml"), StageFiles(), Path("models/registry.json"))


def versions(uri: str | None = None) -> list:
    from mlflow import MlflowClient

    from headswap.tracking import tracking_uri

    return MlflowClient(uri or tracking_uri()).search_model_versions(f"name='{MODEL}'")


def client():
    from mlflow import MlflowClient

    from headswap.tracking import tracking_uri

    return MlflowClient(tracking_uri())


def test_register_twice_with_nothing_changed_registers_one_version(workspace):
    from headswap.cli import app
    from headswap.tracking import tracking_uri

    first = register()
    recorded = (workspace / "models/registry.json").read_bytes()
    result = CliRunner().invoke(app, ["register"])

    assert result.exit_code == 0, result.output
    assert f"already registered: {MODEL} v{first.version} in {tracking_uri()}" in result.output
    assert len(versions()) == 1 and not first.reused
    assert (workspace / "models/registry.json").read_bytes() == recorded  # left untouched
    again = register()
    assert again.reused and (again.version, again.run_id) == (first.version, first.run_id)


def test_a_wiped_store_is_registered_in_again(workspace):
    """As DVC runs it: `headswap register` in a new process, after the store was deleted."""
    import shutil
    import subprocess
    import sys

    first = register()
    (workspace / "mlflow.db").unlink()
    shutil.rmtree(workspace / "mlartifacts")

    done = subprocess.run(
        [str(Path(sys.executable).parent / "headswap"), "register"],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert f"registered {MODEL} v1" in done.stderr and "already registered" not in done.stderr
    recorded = json.loads((workspace / "models/registry.json").read_text())
    assert recorded["run_id"] != first.run_id


def test_a_new_store_or_a_new_model_registers_again(workspace, tmp_path, monkeypatch):
    first = register()
    fresh = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", fresh)

    moved = register()

    assert not moved.reused and moved.tracking_uri == fresh and moved.version == "1"
    assert [v.run_id for v in versions(fresh)] == [moved.run_id] != [first.run_id]
    recorded = json.loads((workspace / "models/registry.json").read_text())
    assert (recorded["tracking_uri"], recorded["run_id"]) == (fresh, moved.run_id)
    assert recorded["registered_at"].endswith("+00:00") and "reused" not in recorded

    tiny_model(workspace / "models/model.onnx", *WORSE)  # a retrained model, same data
    assert register().version == "2" and len(versions(fresh)) == 2


def test_every_version_carries_its_lineage_and_its_manifest(workspace):
    from headswap.manifest import SPLIT_RULE
    from headswap.tracking import run_artifact_text

    registration = register()
    tags = client().get_model_version(MODEL, registration.version).tags
    onnx = hashlib.sha256((workspace / "models/model.onnx").read_bytes()).hexdigest()
    assert tags["onnx_sha256"] == onnx and tags["data_md5"] == "aaaa.dir"
    assert (tags["split_rule"], tags["split_seed"]) == (SPLIT_RULE, "0")
    assert (tags["split_test_size"], tags["split_val_size"]) == ("0.25", "0.1")
    assert json.loads(tags["classes"]) == TINY_CLASSES
    run = client().get_run(registration.run_id)
    assert run.data.tags["headswap.onnx_sha256"] == onnx
    manifest = run_artifact_text(client(), registration.run_id, "data/manifest.csv")
    assert manifest == (workspace / "data/prepared/manifest.csv").read_text()
    recorded = json.loads((workspace / "models/registry.json").read_text())
    assert recorded["data_changes"]["since_version"] is None
    assert "no champion" in recorded["data_changes"]["note"]


def test_a_different_label_set_is_refused_before_anything_is_logged(workspace):
    from headswap.errors import RegistryError

    register()
    runs_before = len(
        client().search_runs([client().get_experiment_by_name("headswap-tests").experiment_id])
    )
    rows = write_images(workspace / "data/raw", per_class=10)
    for index, row in enumerate(rows):
        row["split"] = SPLITS[index % len(SPLITS)]
    write_data(workspace, rows, classes=["dark", "bright", "grey"])
    write_lock(workspace, "bbbb.dir")
    client().delete_model_version_tag(MODEL, "1", "classes")  # read from its validation.json

    with pytest.raises(RegistryError) as refused:
        register()

    message = str(refused.value)
    assert "\n" not in message and MODEL in message
    assert "['dark', 'bright']" in message and "['dark', 'bright', 'grey']" in message
    assert "set registry.model_name to a new name for this data (or restore data.source)" in message
    assert len(versions()) == 1
    experiment = client().get_experiment_by_name("headswap-tests").experiment_id
    assert len(client().search_runs([experiment])) == runs_before


def test_changes_since_the_champion_are_counted_per_class(workspace):
    from headswap.manifest import read_manifest
    from headswap.tracking import run_artifact_text

    register()  # v1: the champion
    rows = {row["path"]: row for row in read_manifest(workspace / "data/prepared/manifest.csv")}
    del rows["dark/dark005.png"]  # removed
    rows["bright/bright002.png"]["sha256"] = "f" * 64  # same path, new content
    moved = rows.pop("dark/dark004.png")  # relabelled: moved to the other class folder
    rows["bright/dark004.png"] = {**moved, "path": "bright/dark004.png", "label": "bright"}
    for path, label in (("dark/new1.png", "dark"), ("bright/new1.png", "bright")):
        rows[path] = {
            "path": path,
            "sha256": hashlib.sha256(path.encode()).hexdigest(),
            "label": label,
            "split": "train",
        }
    rows["bright/new2.png"] = {
        **rows["bright/new1.png"],
        "path": "bright/new2.png",
        "sha256": "e" * 64,
    }
    write_data(workspace, list(rows.values()))
    write_lock(workspace, "cccc.dir")

    registration = register()

    expected = {
        "dark": {"added": 1, "removed": 1, "changed": 0},
        "bright": {"added": 2, "removed": 0, "changed": 2},
    }
    changes = registration.data_changes
    assert registration.version == "2" and changes["per_class"] == expected
    assert changes["total"] == {"added": 3, "removed": 1, "changed": 2}
    assert (changes["since_version"], changes["since_data_md5"]) == ("1", "aaaa.dir")
    recorded = json.loads((workspace / "models/registry.json").read_text())
    assert recorded["data_changes"] == changes
    logged = run_artifact_text(client(), registration.run_id, "data/changes.json")
    assert json.loads(logged)["per_class"] == expected
    card = client().get_model_version(MODEL, "2").description
    assert "## Data changes since the champion (v1)" in card and "| bright | 2 | 0 | 2 |" in card
