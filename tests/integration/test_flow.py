"""The spine through Prefect: `python -m flows.pipeline` in ephemeral mode drives the DVC stages."""

from __future__ import annotations

import json

import yaml

from tests.helpers.workspace import run


def test_flow_runs_pipeline_records_experiment_and_registers(make_workspace):
    workspace = make_workspace(max_per_class=12)
    result = run(["python", "-m", "flows.pipeline"], workspace)

    assert "headswap run complete" in result.stdout
    assert "registered      elpv-defects version 1" in result.stdout
    registration = json.loads((workspace / "models/registry.json").read_text())
    assert registration["aliases"] == ["challenger", "champion"]
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert lock["stages"]["ingest"]["outs"][0]["path"] == "data/raw", "ingest versions data/raw"
    assert any((workspace / ".dvc-storage").rglob("*")), "the flow pushes data to the DVC remote"

    experiments = run(["dvc", "exp", "list", "--all-commits", "--name-only"], workspace).stdout
    assert "train-" in experiments

    import mlflow

    mlflow.set_tracking_uri(registration["tracking_uri"])
    mlflow_run = mlflow.get_run(registration["run_id"])
    assert mlflow_run.data.tags["headswap.dvc_experiment"] in experiments
    assert mlflow_run.data.tags["headswap.prefect_flow_run_id"]
    configured_C = yaml.safe_load((workspace / "params.yaml").read_text())["head"]["C"]
    assert mlflow_run.data.params["head.C"] == str(configured_C)

    # Seconds per stage and the flow's overhead: in the closing text and on the MLflow run.
    assert "seconds (wall / CPU)" in result.stdout and "flow overhead" in result.stdout
    stages = ["ingest", "prepare", "features", "train", "evaluate", "export", "register"]
    assert all(f"seconds.{stage}" in mlflow_run.data.metrics for stage in stages)
    assert "seconds.flow_overhead" in mlflow_run.data.metrics
