"""The served `train` deployment on a real Prefect server, triggered through the API as the UI is.

Slow: a real `prefect server` on loopback, `python -m flows.serve` in a subprocess, and two
pipeline runs on 40 ELPV images in a fresh git + DVC workspace.
"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import yaml
from prefect.exceptions import PrefectHTTPStatusError

from tests.helpers import prefect_stack as stack
from tests.helpers.prefect_stack import (
    api_client,
    dvc_experiments,
    mlflow_runs,
    wait_for_final_state,
)
from tests.helpers.workspace import REPO, set_params

# Module-scoped fixtures: this module gets its own server and workspace.
prefect_server = stack.prefect_server
served_workspace = stack.served_workspace

pytestmark = pytest.mark.slow


def _with(defaults: dict, **changes) -> dict:
    return {"parameters": {**defaults["parameters"], **changes}}


def test_form_starts_empty_and_a_default_run_uses_params_yaml_as_it_is_then(served_workspace):
    """Edit params.yaml after the deployments were served: a default run must train on the edit."""
    with api_client(served_workspace.server) as client:
        deployment = client.read_deployment_by_name("train/train")
        others = [client.read_deployment_by_name(f"{n}/{n}") for n in ("promote", "predict")]
    assert deployment.parameters == {"parameters": {}}
    schema = deployment.parameter_openapi_schema["definitions"]
    assert "torchvision/resnet50" in schema["Backbone"]["enum"]
    assert deployment.global_concurrency_limit.limit == 1
    assert {d.name for d in others} == {"promote", "predict"}
    assert others[1].parameter_openapi_schema["required"] == ["folder"]
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"

    params_path = served_workspace.root / "params.yaml"
    assert yaml.safe_load(params_path.read_text())["head"]["C"] != 0.02
    set_params(served_workspace.root, head={"C": 0.02})  # a person's edit, after serving began
    edited = params_path.read_text()
    with api_client(served_workspace.server) as client:
        run = client.create_flow_run_from_deployment(deployment.id)
        run = wait_for_final_state(client, run.id)
    assert run.state.is_completed(), run.state.message
    assert params_path.read_text() == edited, "a default run rewrote params.yaml"
    trained = [
        r
        for r in mlflow_runs(served_workspace.root)
        if r.data.tags.get("headswap.prefect_flow_run_id") == str(run.id)
    ]
    assert [r.data.params["head.C"] for r in trained] == ["0.02"]


def test_invalid_values_are_refused_never_defaulted(served_workspace):
    with api_client(served_workspace.server) as client:
        deployment = client.read_deployment_by_name("train/train")
        with pytest.raises(PrefectHTTPStatusError, match=r"parameters\.C"):
            client.create_flow_run_from_deployment(
                deployment.id, parameters=_with(deployment.parameters, C=-1.0)
            )

        # With the form's "Validate parameters" unticked the run starts, and the flow refuses.
        response = httpx.post(
            f"{served_workspace.server.api_url}/deployments/{deployment.id}/create_flow_run",
            json={
                "parameters": _with(deployment.parameters, backbone="resnet-9000"),
                "enforce_parameter_schema": False,
            },
        )
        response.raise_for_status()
        run = wait_for_final_state(client, response.json()["id"])
    assert run.state.is_failed()
    assert "invalid value for 'backbone' (backbone.name)" in run.state.message
    written = yaml.safe_load((served_workspace.root / "params.yaml").read_text())
    committed = yaml.safe_load((REPO / "params.yaml").read_text())
    assert written["backbone"]["name"] == committed["backbone"]["name"]


def test_api_triggered_runs_queue_and_are_recorded_in_mlflow_and_dvc(served_workspace):
    with api_client(served_workspace.server) as client:
        deployment = client.read_deployment_by_name("train/train")
        # Two triggers at once: the concurrency limit makes the second wait, not vanish.
        first = client.create_flow_run_from_deployment(
            deployment.id, parameters=_with(deployment.parameters, C=0.125)
        )
        second = client.create_flow_run_from_deployment(
            deployment.id, parameters=_with(deployment.parameters, C=4.0)
        )
        runs = [wait_for_final_state(client, run.id) for run in (first, second)]
        artifacts = {run.id: client.read_artifacts(flow_run_filter=_only(run.id)) for run in runs}
    assert [run.state.name for run in runs] == ["Completed", "Completed"], [
        run.state.message for run in runs
    ]
    earlier, later = sorted(runs, key=lambda run: run.start_time)
    assert earlier.end_time <= later.start_time, "two train runs overlapped in one workspace"

    root = served_workspace.root
    by_c = {run.data.params["head.C"]: run for run in mlflow_runs(root)}
    shown = dvc_experiments(root)
    for flow_run, c in ((first, "0.125"), (second, "4.0")):
        experiment = f"train-{str(flow_run.id)[:8]}"
        mlflow_run = by_c[c]
        assert mlflow_run.data.tags["headswap.dvc_experiment"] == experiment
        assert mlflow_run.data.tags["headswap.prefect_flow_run_id"] == str(flow_run.id)
        assert experiment in shown
        # ...and back: the experiment's commit names the MLflow run.
        rev = mlflow_run.data.tags["headswap.dvc_experiment_rev"]
        message = subprocess.run(
            ["git", "log", "-1", "--format=%B", rev],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert mlflow_run.info.run_id in message

        kinds = {artifact.key: artifact for artifact in artifacts[flow_run.id]}
        markdown = kinds["train-summary"].data
        assert mlflow_run.info.run_id in markdown and "/#/models/elpv-defects/versions/" in markdown
        table = kinds["train-metrics"].data
        rows = json.loads(table) if isinstance(table, str) else table
        assert {row["metric"] for row in rows} == {"accuracy", "balanced accuracy", "ROC-AUC"}


def _only(flow_run_id):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
