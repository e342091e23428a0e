"""A real Prefect server on loopback plus the served deployments over a small workspace copy.

Shared by the deployment tests (tests/integration) and the browser test (tests/e2e). Each test
module that imports the fixtures gets its own server and workspace (module scope), and every
process started here is stopped afterwards, whatever the test outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from headswap.ui import Service, free_port, start, stop, wait_for_deployments, wait_until_healthy
from tests.helpers.workspace import VENV_BIN, create_workspace, run

RUN_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class PrefectServer:
    url: str  # the UI, e.g. http://127.0.0.1:41234
    api_url: str
    home: Path
    env: dict[str, str]


@dataclass(frozen=True)
class ServedWorkspace:
    root: Path
    server: PrefectServer
    serve_log: Path


def make_workspace(dest: Path, feature_cache: Path) -> Path:
    """A git + DVC copy of this project on 20 ELPV images per class."""
    dest.mkdir(parents=True)
    root = create_workspace(dest, feature_cache, max_per_class=20)
    # The served processes log to .headswap/ui/ inside the workspace, as `make ui` does.
    with (root / ".gitignore").open("a") as ignore:
        ignore.write("/.headswap/\n")
    run(["git", "commit", "-q", "-am", "ignore server logs"], root)
    return root


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PATH": os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        }
    )
    return env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME (and SQLite)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**base_env(home), "PREFECT_UI_API_URL": f"{url}/api"}
    service = Service(
        "prefect-server",
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        f"{url}/api/health",
        env=env,
    )
    start(service, cwd=home)
    try:
        wait_until_healthy(service)
        yield PrefectServer(url, f"{url}/api", home, env)
    finally:
        stop(service)


@pytest.fixture(scope="module")
def served_workspace(prefect_server, tmp_path_factory) -> Iterator[ServedWorkspace]:
    """`python -m flows.serve` in a fresh workspace copy, until all its deployments exist."""
    cache = tmp_path_factory.getbasetemp() / "headswap-cache"
    root = make_workspace(tmp_path_factory.mktemp("served") / "workspace", cache)
    with serving(root, prefect_server, cache) as served:
        yield served


@contextmanager
def serving(root: Path, server: PrefectServer, cache: Path) -> Iterator[ServedWorkspace]:
    """Serve ``root``'s deployments to ``server`` (as `make ui` does) for the block."""
    env = {
        **server.env,
        "PREFECT_API_URL": server.api_url,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "HEADSWAP_CACHE_DIR": str(cache),
        "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
        # The served runs record into this workspace's own store, whatever an earlier test in
        # this process left in os.environ (the service inherits it).
        "MLFLOW_TRACKING_URI": f"sqlite:///{root.resolve() / 'mlflow.db'}",
    }
    service = Service("deployments", [sys.executable, "-m", "flows.serve"], None, env=env)
    start(service, cwd=root)
    try:
        wait_for_deployments(service, server.api_url)
        yield ServedWorkspace(root, server, root / service.log_path)
    finally:
        stop(service)


@contextmanager
def api_client(server: PrefectServer):
    """A synchronous Prefect client for ``server`` (the API the UI itself calls)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
        get_client(sync_client=True) as client,
    ):
        yield client


def wait_for_final_state(client, flow_run_id, timeout_s: float = RUN_TIMEOUT_S):
    """Poll a flow run until it is Completed/Failed/Crashed/Cancelled; return the run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(3)
    raise AssertionError(f"flow run {flow_run_id} not finished after {timeout_s:.0f} s")


def mlflow_runs(root: Path, experiment: str = "headswap") -> list:
    """The MLflow runs in the workspace's embedded store, newest first."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r} in {root / 'mlflow.db'}"
    return client.search_runs([found.experiment_id], order_by=["start_time DESC"])


def dvc_experiments(root: Path) -> str:
    """`dvc exp show` as a person would read it (all columns, no pager)."""
    result = subprocess.run(
        [str(VENV_BIN / "dvc"), "exp", "show", "--no-pager", "--md"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout
