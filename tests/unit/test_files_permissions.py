"""Files keep their owner's intent: atomic writes keep a file's mode (a new one gets the umask's),
and a killed run's temp files are never uploaded as run artifacts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from headswap.config import DataConfig, Params
from headswap.ingest import ingest
from headswap.io import atomic_path, atomic_write_text, is_temp_file, output_files
from headswap.raw_layout import INGEST_REPORT_FILE
from headswap.workspace import apply_overrides


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.mark.parametrize("kept", [0o644, 0o640, 0o664, 0o600, 0o755])
def test_an_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask_022, kept):
    target = tmp_path / "out.json"
    target.write_text("old")
    target.chmod(kept)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and mode(target) == kept


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_new_file_gets_the_umask_permissions_not_0600(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        with atomic_path(tmp_path / "plots" / "roc.png") as tmp:
            tmp.write_bytes(b"png")
    finally:
        os.umask(old)
    assert mode(tmp_path / "new.json") == expected
    assert mode(tmp_path / "plots" / "roc.png") == expected


def test_params_yaml_keeps_its_mode_when_a_run_applies_overrides(tmp_path, umask_022):
    params = tmp_path / "params.yaml"
    params.write_text("head:\n  C: 1.0  # a person's comment\n")
    params.chmod(0o664)  # group-writable, as a team shares it
    _, changes = apply_overrides({"head.C": 0.5}, params)
    assert [change.key for change in changes] == ["head.C"]
    assert "C: 0.5" in params.read_text() and mode(params) == 0o664


def test_ingest_report_gets_the_umask_permissions(tmp_path, umask_022):
    source = tmp_path / "source"
    for label in ("cat", "dog"):
        (source / label).mkdir(parents=True)
        (source / label / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (source / "cat" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    raw = tmp_path / "raw"
    ingest(DataConfig(source=str(source)), raw)
    assert mode(raw / INGEST_REPORT_FILE) == 0o644


def test_a_failed_write_leaves_no_temp_file_and_temp_names_are_recognised(tmp_path):
    target = tmp_path / "metrics.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert is_temp_file(tmp) and tmp.parent == tmp_path
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    assert is_temp_file(".roc.png.ab12cd34.tmp") and is_temp_file(".x.png.1234.ingest-tmp")
    assert not is_temp_file("roc.png") and not is_temp_file("notes.tmp.png")


def test_a_killed_runs_temp_files_are_not_uploaded_with_the_plots(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from headswap.register import StageFiles, _log_run_contents

    monkeypatch.chdir(tmp_path)
    files = StageFiles(
        manifest=tmp_path / "manifest.csv",
        validation=tmp_path / "data" / "validation.json",
        features_info=tmp_path / "data" / "features_info.json",
        head_weights=tmp_path / "models" / "head.pt",
        head_meta=tmp_path / "models" / "head.json",
        parity=tmp_path / "reports" / "export_parity.json",
        metrics=tmp_path / "reports" / "metrics.json",
        plots=tmp_path / "reports" / "plots",
    )
    for path in (files.validation, files.features_info, files.head_meta, files.parity):
        atomic_write_text(path, "{}")
    atomic_write_text(files.metrics, json.dumps({"accuracy": 0.9}))
    atomic_write_text(files.manifest, "path,label\n")
    (files.head_weights).write_bytes(b"weights")
    for name in ("roc.png", "reliability.png"):
        atomic_write_text(files.plots / name, "png")
    # what a run killed while writing plots leaves: temp files of both writers, and a stray dot
    for leftover in (".roc.png.1a2b3c4d.tmp", ".confusion_matrix.png.tmp", ".DS_Store"):
        (files.plots / leftover).write_text("half a file")
    (files.plots / "old").mkdir()
    assert [path.name for path in output_files(files.plots)] == ["reliability.png", "roc.png"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = MlflowClient(uri).create_experiment("perm", (tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        _log_run_contents(Params(), files, {"accuracy": 0.9}, {"counts": {}}, {})
    uploaded = {item.path for item in MlflowClient(uri).list_artifacts(run.info.run_id, "plots")}
    assert uploaded == {"plots/roc.png", "plots/reliability.png"}
