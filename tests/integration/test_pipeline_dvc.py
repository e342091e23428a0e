"""The spine through `dvc repro`: full run, no-op re-run, head-only re-run, registry parity.

`ingest` and `register` look outside the repository (data.source, the tracking store), so DVC
runs them every time; when nothing changed they change nothing, and nothing after ingest re-runs.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.workspace import create_workspace, run, set_params

STAGES = ["ingest", "prepare", "features", "train", "evaluate", "export", "register"]
ALWAYS_RUN = ["ingest", "register"]


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, feature_cache) -> Path:
    """One full `dvc repro` on 20 + 20 ELPV images, shared by this module's tests."""
    workspace = create_workspace(tmp_path_factory.mktemp("dvc-workspace"), feature_cache, 20)
    result = run(["dvc", "repro"], workspace)
    assert ran_stages(result.stdout) == STAGES
    return workspace


def test_repro_runs_all_then_nothing_then_only_head_stages(reproduced: Path):
    """After one full run, nothing is stale; a head param re-runs only the head's downstream."""
    workspace = reproduced
    metrics = json.loads((workspace / "reports/metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["classes"] == ["functional", "defective"]
    assert (workspace / "reports/plots/confusion_matrix.png").stat().st_size > 1000

    first = json.loads((workspace / "models/registry.json").read_text())
    assert (first["version"], first["aliases"]) == ("1", ["challenger", "champion"])

    again = run(["dvc", "repro"], workspace)
    assert ran_stages(again.stdout) == ALWAYS_RUN
    assert json.loads((workspace / "models/registry.json").read_text()) == first

    set_params(workspace, head={"C": 0.05})
    after_head_change = run(["dvc", "repro"], workspace)
    assert ran_stages(after_head_change.stdout) == [
        "ingest",
        "train",
        "evaluate",
        "export",
        "register",
    ]

    status = run(["dvc", "status"], workspace)
    assert set(re.findall(r"^(\w+):", status.stdout, re.M)) <= set(ALWAYS_RUN)
    second = json.loads((workspace / "models/registry.json").read_text())
    assert (second["version"], second["aliases"]) == ("2", ["challenger"])


def test_registered_challenger_predicts_what_evaluate_reported(reproduced: Path, monkeypatch):
    """Load the model from MLflow by alias; ONNX Runtime must reproduce evaluate's probabilities."""
    import mlflow
    import onnxruntime as ort

    from headswap.imaging import load_model_input

    workspace = reproduced
    monkeypatch.chdir(workspace)
    registration = json.loads(Path("models/registry.json").read_text())
    assert "challenger" in registration["aliases"]
    mlflow.set_tracking_uri(registration["tracking_uri"])
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("elpv-defects", "challenger")
    assert str(version.version) == registration["version"]
    for tag in ("data_md5", "git_commit", "backbone", "weights_sha256", "test_fingerprint"):
        assert version.tags[tag], tag

    model_dir = mlflow.artifacts.download_artifacts("models:/elpv-defects@challenger")
    session = ort.InferenceSession(
        str(Path(model_dir) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    meta = session.get_modelmeta().custom_metadata_map
    size = int(meta["headswap.image_size"])

    with open("reports/predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    pixels = np.stack([load_model_input(Path("data/raw") / r["path"], size) for r in rows])
    probabilities, labels = session.run(None, {"pixels": pixels})
    expected = np.array([[float(r["p_functional"]), float(r["p_defective"])] for r in rows])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    classes = json.loads(meta["headswap.classes"])
    assert [classes[i] for i in labels] == [r["predicted"] for r in rows]


def test_a_new_tracking_store_gets_the_model_registered_again(reproduced: Path, tmp_path):
    """Never a registration restored from DVC's run cache: the store in use gets the model."""
    from mlflow import MlflowClient

    before = json.loads((reproduced / "models/registry.json").read_text())
    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    result = run(["dvc", "repro"], reproduced, {"MLFLOW_TRACKING_URI": store})
    assert "register" in ran_stages(result.stdout)
    after = json.loads((reproduced / "models/registry.json").read_text())
    assert after["tracking_uri"] == store and after["run_id"] != before["run_id"]
    versions = MlflowClient(store).search_model_versions("name='elpv-defects'")
    assert [str(v.version) for v in versions] == ["1"]
