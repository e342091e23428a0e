"""The loop without hands, on a real Prefect server: images arrive in data.source, the scheduled
`train` deployment retrains, the gate compares the new model with the champion on the grown test
split, `@champion` moves, and `headswap predict` with `@champion` uses the new version.

Slow: a real `prefect server`, `python -m flows.serve`, and two pipeline runs (small body).
"""

from __future__ import annotations

import csv
import json

import pytest

from tests.helpers import prefect_stack as stack
from tests.helpers.prefect_stack import api_client, serving, wait_for_final_state
from tests.helpers.workspace import features_info, make_folder_workspace, make_image_folder, run

pytestmark = pytest.mark.slow

prefect_server = stack.prefect_server

# The gate's statistics have their own tests; here any challenger that is scored may pass.
LOOSE_GATE = {
    "accuracy_tolerance": 1.0,
    "roc_auc_tolerance": 1.0,
    "recall_tolerance": 1.0,
    "ece_tolerance": 1.0,
}


def _scheduled_run(client, deployment):
    """A run with the deployment's own parameters, as its schedule creates them."""
    flow_run = client.create_flow_run_from_deployment(deployment.id)
    finished = wait_for_final_state(client, flow_run.id)
    assert finished.state.is_completed(), finished.state.message
    return finished


def _test_paths(root) -> set[str]:
    with open(root / "data/prepared/manifest.csv", newline="") as handle:
        return {row["path"] for row in csv.DictReader(handle) if row["split"] == "test"}


def test_new_images_reach_the_champion_without_hands(prefect_server, tmp_path):
    from mlflow import MlflowClient

    cache = tmp_path / "cache"
    root, source = make_folder_workspace(
        tmp_path,
        cache,
        registry={"auto_promote": True, "gate": LOOSE_GATE},
        schedule={"train_cron": "0 3 * * *"},
    )
    run(["git", "commit", "-qam", "the loop's settings"], root)

    with serving(root, prefect_server, cache), api_client(prefect_server) as client:
        deployment = client.read_deployment_by_name("train/train")
        assert deployment.schedules, "the train deployment retrains on schedule.train_cron"
        _scheduled_run(client, deployment)
        first_test = _test_paths(root)
        assert features_info(root)["embedded"] == 24

        added = make_image_folder(source, 6, first=12, size=40)
        _scheduled_run(client, deployment)

    info = features_info(root)
    assert (info["embedded"], info["cache_hits"]) == (12, 24), "only the new images are embedded"
    grown_test = _test_paths(root)
    assert first_test <= grown_test, "an old test image left the test split"
    new_to_champion = grown_test - first_test
    assert {p.name for p in added} >= {path.split("/")[-1] for path in new_to_champion}

    registration = json.loads((root / "models/registry.json").read_text())
    assert registration["version"] == "2"
    assert registration["data_changes"]["total"]["added"] == 12
    mlflow = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    assert str(mlflow.get_model_version_by_alias("elpv-defects", "champion").version) == "2"

    history = run(["headswap", "history"], root).stdout
    assert "promoted" in history and "v1" in history and "v2" in history

    predicted = run(
        ["headswap", "predict", str(source), "--out", str(tmp_path / "predictions.csv")], root
    )
    assert "elpv-defects@champion (version 2)" in predicted.stderr + predicted.stdout
