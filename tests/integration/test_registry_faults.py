"""Registry faults against a real MLflow server: unreachable, dying mid-way, failed parity.

One tiny pipeline runs up to ``export`` in a temp DVC workspace; each test then exercises the
register stage as ``dvc repro`` (or the CLI's own function) runs it. MLflow's HTTP retry settings
are left as a user has them (unset): headswap's one retry policy (tracking.HTTP_RETRY_POLICY)
is what is tested, not a test-only override.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from headswap import register
from headswap.config import load_params
from headswap.errors import RegistryError
from headswap.ui import free_port
from tests.helpers.servers import start_mlflow, stop
from tests.helpers.workspace import make_pipeline_workspace, run, tool_env

pytestmark = pytest.mark.slow
STAGES = ("prepare", "features", "train", "evaluate", "export", "register")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A workspace whose pipeline ran up to export (one truncated image skipped on the way)."""
    root = tmp_path_factory.mktemp("registry-faults")
    work = make_pipeline_workspace(root)
    env = tool_env(HEADSWAP_CACHE_DIR=str(root / "cache"))
    run(["dvc", "repro", "export"], work, env)
    return work


RETRY_SETTINGS = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


def _server_env(work, port: int) -> dict[str, str]:
    env = tool_env(
        HEADSWAP_CACHE_DIR=str(work.parent / "cache"),
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}",
    )
    for key in RETRY_SETTINGS:  # as a user has them: unset
        env.pop(key, None)
    return env


def _ran_stages(output: str) -> list[str]:
    return [stage for stage in STAGES if f"Running stage '{stage}'" in output]


def test_make_run_against_a_server_that_is_down_tries_register_once_and_stops(exported):
    """`make run` (the Prefect train flow) used to print `> headswap register`, then nothing for
    over 7 minutes: three retry layers multiplied. Now `register` runs once, shows MLflow's five
    retries, and the run fails with the stage's one line."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**_server_env(exported, port), "PREFECT_HOME": str(exported.parent / "prefect-home")}
    started = time.monotonic()
    flow = subprocess.run(
        [sys.executable, "-m", "flows.pipeline"],
        cwd=exported,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a guard only
    )
    print(
        f"\nthe train flow against {uri} (nothing listening) failed after "
        f"{time.monotonic() - started:.0f} s"
    )
    output = flow.stdout + flow.stderr
    assert flow.returncode == 1, output[-3000:]
    # The stage's output is echoed, then logged again in the task's failure: count kinds of line.
    assert "will start" not in output  # Prefect's "Retry 1/3 will start ...": no task retry
    shown = set(
        re.findall(
            rf"waiting for the MLflow tracking server at {re.escape(uri)} "
            r"\(connection refused\): retry (\d) of (\d)",
            output,
        )
    )
    assert shown == {(str(n), "5") for n in range(1, 6)}
    last = flow.stderr.strip().splitlines()[-20:]
    assert any(
        f"the MLflow tracking server at {uri} did not answer" in line and "Check that" in line
        for line in last
    )
    assert not (exported / "models/registry.json").exists()


def test_unreachable_server_fails_clearly_then_repro_reruns_only_register(exported, tmp_path):
    port = free_port()
    env = _server_env(exported, port)
    uri = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    # The timeout is a guard, not a timing assert: before the fix this waited for many minutes.
    down = subprocess.run(
        ["dvc", "repro"], cwd=exported, env=env, capture_output=True, text=True, timeout=600
    )
    print(
        f"\ndvc repro against {uri} (nothing listening) failed after "
        f"{time.monotonic() - started:.0f} s"
    )
    output = down.stdout + down.stderr
    assert down.returncode != 0
    assert _ran_stages(output) == ["register"]
    waiting = re.findall(
        rf"^waiting for the MLflow tracking server at {re.escape(uri)} \(connection refused\): "
        r"retry (\d) of (\d)$",
        output,
        re.MULTILINE,
    )
    assert waiting == [(str(n), "5") for n in range(1, 6)]  # one line per retry, then it stops
    [error] = [line for line in output.splitlines() if line.startswith("error:")]
    assert f"the MLflow tracking server at {uri} did not answer (connection refused" in error
    assert "Check that the server is running" in error
    assert "re-run `dvc repro` (it redoes only this stage)" in error
    assert "Traceback" not in output
    assert not (exported / "models/registry.json").exists()

    server = start_mlflow(
        f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art", port, tmp_path / "mlflow.log"
    )
    try:
        up = run(["dvc", "repro"], exported, env)
        assert _ran_stages(up.stdout + up.stderr) == ["register"]
        registration = json.loads((exported / "models/registry.json").read_text())
        from mlflow import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{port}")
        name = registration["model_name"]
        version = client.get_model_version(name, registration["version"])
        assert version.tags["parity_passed"] == "true"
        assert version.tags["skipped_files"] == "1"
        assert client.get_model_version_by_alias(name, "challenger").version == version.version
        run_data = client.get_run(registration["run_id"]).data
        assert run_data.metrics["data.skipped_files"] == 1.0
        artifacts = [a.path for a in client.list_artifacts(registration["run_id"], "data")]
        assert "data/validation.json" in artifacts
    finally:
        stop(server)


def test_server_dying_mid_registration_leaves_no_version_without_its_gates(
    exported, tmp_path, monkeypatch
):
    port = free_port()
    for key, value in _server_env(exported, port).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(exported)
    db, art = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art"
    server = start_mlflow(db, art, port, tmp_path / "mlflow.log")
    real_alias = register.finish_registration

    def die_first(*args, **kwargs):  # the server goes away after the version was created
        stop(server)
        return real_alias(*args, **kwargs)

    monkeypatch.setattr(register, "finish_registration", die_first)
    params = load_params("params.yaml")
    for key in RETRY_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RegistryError, match="setting aliases: the MLflow tracking server at"):
        register.register_model(params, register.StageFiles(), tmp_path / "registry.json")
    monkeypatch.setattr(register, "finish_registration", real_alias)

    server = start_mlflow(db, art, port, tmp_path / "mlflow.log")
    try:
        retry = register.register_model(params, register.StageFiles(), tmp_path / "registry.json")
        from mlflow import MlflowClient

        client = MlflowClient()
        versions = client.search_model_versions(f"name='{params.registry.model_name}'")
        assert len(versions) == 2
        for version in versions:  # both carry their gates, the half-registered one included
            assert version.tags["parity_passed"] == "true"
        model = client.get_registered_model(params.registry.model_name)
        assert model.aliases == {"challenger": retry.version, "champion": retry.version}
    finally:
        stop(server)


def test_failed_parity_is_never_registered_or_aliased(exported, tmp_path, monkeypatch):
    port = free_port()
    for key, value in _server_env(exported, port).items():
        monkeypatch.setenv(key, value)
    work = tmp_path / "copy"
    shutil.copytree(exported, work, symlinks=True)
    monkeypatch.chdir(work)
    parity = json.loads((work / "reports/export_parity.json").read_text())
    parity.update(passed=False, max_abs_diff=0.3)
    (work / "reports/export_parity.json").write_text(json.dumps(parity))
    server = start_mlflow(
        f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art", port, tmp_path / "mlflow.log"
    )
    try:
        params = load_params("params.yaml")
        with pytest.raises(RegistryError, match="parity check did not pass"):
            register.register_model(params, register.StageFiles(), tmp_path / "registry.json")
        from mlflow import MlflowClient

        assert MlflowClient().search_registered_models() == []
    finally:
        stop(server)
