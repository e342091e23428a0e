"""The registry against a real `mlflow server` with models built by the real pipeline.

One module-scoped workspace runs the real stages on 20 + 20 ELPV images, then registers two
versions through `headswap register`: v1 with a head trained on shuffled labels (weak; it becomes
the first champion) and v2 with the real head and `registry.auto_promote: true` (the register
stage promotes it through the gate). The tests then drive the CLI and the Prefect flows.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.workspace import REPO, create_workspace, set_params

pytestmark = pytest.mark.slow

MODEL = "elpv-gate-test"
SHUFFLED_HEAD = """
import dataclasses, numpy as np
from pathlib import Path
from headswap.config import load_params
from headswap.manifest import read_classes
from headswap.feature_set import load_features
from headswap.train import save_head, train_head
params = load_params()
features = load_features(Path("data/features/features.npz"))
labels, train = features.label.copy(), features.split == "train"
labels[train] = np.random.default_rng(0).permutation(labels[train])
classes = read_classes(Path("data/prepared/validation.json"))
head, meta = train_head(dataclasses.replace(features, label=labels), classes, params.head,
                        params.evaluate)
save_head(head, meta, Path("models/head.pt"), Path("models/head.json"))
"""


class Workspace:
    def __init__(self, root: Path, tracking_uri: str, tmp: Path):
        self.root, self.tracking_uri = root, tracking_uri
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PREFECT_HOME": str(tmp / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HEADSWAP_USER": "release-owner",
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-3000:]}"
            )
        return result

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.tracking_uri)

    def champion(self) -> str:
        return str(self.client().get_model_version_by_alias(MODEL, "champion").version)

    def history(self) -> list[dict]:
        tags = self.client().get_registered_model(MODEL).tags
        return sorted(
            (json.loads(v) for k, v in tags.items() if k.startswith("headswap.audit.")),
            key=lambda entry: entry["seq"],
        )


@pytest.fixture(scope="module")
def server_workspace(mlflow_server, tmp_path_factory, feature_cache) -> Workspace:
    tmp = tmp_path_factory.mktemp("server-registry")
    root = create_workspace(
        tmp / "ws", feature_cache, 20, registry={"model_name": MODEL, "gate": {"bootstrap": 200}}
    )
    ws = Workspace(root, mlflow_server, tmp)
    for stage in ("ingest", "prepare", "features"):
        ws.run("headswap", stage)
    ws.run(sys.executable, "-c", SHUFFLED_HEAD)
    for stage in ("evaluate", "export", "register"):
        ws.run("headswap", stage)
    for stage in ("train", "evaluate", "export"):
        ws.run("headswap", stage)
    (root / "reports" / "predictions.csv").replace(root / "good_predictions.csv")
    set_params(root, registry={"auto_promote": True})
    ws.run("headswap", "register")
    return ws


def test_auto_promote_lineage_and_model_card(server_workspace):
    ws = server_workspace
    assert ws.champion() == "2"
    moves = [(e["outcome"], e["old_version"], e["new_version"]) for e in ws.history()]
    assert moves == [("initial", None, "1"), ("promoted", "1", "2")]
    assert ws.history()[1]["reason"] == "registry.auto_promote after register"
    assert ws.history()[1]["gate"]["passed"] is True

    version = ws.client().get_model_version(MODEL, "2")
    for key in (
        "data_md5",
        "git_commit",
        "git_dirty",
        "backbone",
        "weights_sha256",
        "feature_cache_key",
        "test_fingerprint",
        "dvc_experiment",
    ):
        assert version.tags.get(key), key
    assert version.description.startswith(f"# {MODEL} v2")
    assert "Apache-2.0" in version.description and "## Limitations" in version.description
    artifacts = {a.path for a in ws.client().list_artifacts(version.run_id)}
    assert "model_card.md" in artifacts
    registration = json.loads((ws.root / "models" / "registry.json").read_text())
    assert registration["aliases"] == ["challenger", "champion"]
    assert registration["run_id"] == version.run_id


def test_worse_refused_rollback_restores_better_promoted(server_workspace):
    ws = server_workspace
    refused = ws.run("headswap", "promote", "--version", "1", "--reason", "try weak", check=False)
    assert refused.returncode == 1 and "refused" in refused.stderr
    assert "accuracy" in refused.stdout and "McNemar" in refused.stdout  # the side-by-side table
    assert ws.champion() == "2"

    ws.run("headswap", "rollback", "--reason", "drill")
    assert ws.champion() == "1"
    ws.run("headswap", "promote", "--version", "2", "--reason", "back to the good one")
    assert ws.champion() == "2"

    recent = ws.history()[-3:]
    assert [(e["outcome"], e["old_version"], e["new_version"]) for e in recent] == [
        ("refused", "2", "1"),
        ("rolled_back", "2", "1"),
        ("promoted", "1", "2"),
    ]
    assert {e["user"] for e in recent} == {"release-owner"}
    listing = ws.run("headswap", "history").stdout
    assert "rolled_back" in listing and "drill" in listing


def test_two_concurrent_promotions_leave_one_champion(server_workspace):
    ws = server_workspace
    ws.run("headswap", "rollback", "--reason", "set up the race")
    before = len(ws.history())
    racers = [
        subprocess.Popen(
            ["headswap", "promote", "--version", "2", "--reason", f"racer {i}"],
            cwd=ws.root,
            env=ws.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [racer.communicate(timeout=600) for racer in racers]
    new = ws.history()[before:]
    assert ws.champion() == "2"
    assert [(e["outcome"], e["old_version"], e["new_version"]) for e in new] == [
        ("promoted", "1", "2")
    ]
    # The loser waited for the lock, re-read the champion and refused: nothing left to do.
    assert sum("already the champion" in err for _, err in outputs) == 1
    assert not [m for m in ws.client().search_registered_models() if m.name.endswith("-lock")]


def test_champion_predicts_what_the_evaluate_stage_reported(server_workspace, tmp_path):
    ws = server_workspace
    assert ws.champion() == "2"
    out = tmp_path / "preds.csv"
    ws.run(
        "headswap", "predict", "--model", f"models:/{MODEL}@champion", "data/raw", "--out", str(out)
    )
    with open(out, newline="") as handle:
        predicted = {row["path"]: row for row in csv.DictReader(handle)}
    with open(ws.root / "good_predictions.csv", newline="") as handle:
        expected = list(csv.DictReader(handle))
    assert len(predicted) == 40 and not any(row["error"] for row in predicted.values())
    for row in expected:
        got = predicted[row["path"]]
        assert got["predicted"] == row["predicted"], row["path"]
        for column in ("p_functional", "p_defective"):
            assert float(got[column]) == pytest.approx(float(row[column]), abs=1e-4)
