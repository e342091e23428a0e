"""`headswap ui` for real: attaches to a running Prefect server only when told to, starts MLflow
and the deployments, prints the URLs, and on Ctrl-C/SIGTERM stops what it started and nothing
else; with --auth both servers turn away anonymous requests. Slow."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from headswap.ui import CREDENTIALS_FILE, Credentials, free_port, healthy, port_in_use
from tests.helpers import prefect_stack as stack

pytestmark = pytest.mark.slow

prefect_server = stack.prefect_server
STARTUP_S = 300


def _launch(root, env: dict[str, str], *args: str) -> subprocess.Popen:
    # The workspace's code first; whatever the runner had on the path after it.
    path = [str(root / "src"), str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    return subprocess.Popen(
        [str(stack.VENV_BIN / "headswap"), "ui", *args],
        cwd=root,
        env={**env, "PYTHONPATH": os.pathsep.join(path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_line(process: subprocess.Popen, needle: str, log: list[str]) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        log.append(line)
        if needle in line:
            return
    raise AssertionError(f"`headswap ui` never printed {needle!r}:\n{''.join(log)}")


def _ctrl_c(process: subprocess.Popen, log: list[str]) -> None:
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    log.append(output)


def _status(url: str, authorization: str | None = None) -> int:
    request = urllib.request.Request(url)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_ui_attaches_when_told_starts_missing_servers_and_stops_only_those(
    prefect_server, tmp_path
):
    root = stack.make_workspace(tmp_path / "workspace", tmp_path / "feature-cache")
    mlflow_port = free_port()
    prefect_port = prefect_server.url.rsplit(":", 1)[1]
    ports = ("--prefect-port", prefect_port, "--mlflow-port", str(mlflow_port))
    process = _launch(root, prefect_server.env, *ports, "--attach")
    log: list[str] = []
    try:
        _wait_for_line(process, "MLflow UI", log)
        assert any("prefect-server: attaching to" in line for line in log)
        assert healthy(f"http://127.0.0.1:{mlflow_port}/health")
        assert healthy(f"{prefect_server.api_url}/deployments/name/train/train")
        # The MLflow UI serves the workspace's embedded store (created on first start).
        assert (root / "mlflow.db").is_file()
    finally:
        _ctrl_c(process, log)
    assert process.returncode == 0, "".join(log)
    assert not port_in_use("127.0.0.1", mlflow_port)
    assert healthy(f"{prefect_server.api_url}/health"), "the pre-existing server was stopped"
    assert not (root / ".headswap/ui/mlflow-server.json").exists(), "its record outlived it"


def test_with_auth_both_servers_refuse_anonymous_requests_and_admit_the_generated_user(
    tmp_path,
):
    """The path a non-loopback --host takes, bound to 127.0.0.1 here (tests stay on loopback)."""
    root = stack.make_workspace(tmp_path / "workspace", tmp_path / "feature-cache")
    prefect_port, mlflow_port = free_port(), free_port()
    env = stack.base_env(tmp_path / "prefect-home")
    ports = ("--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port))
    process = _launch(root, env, "--auth", *ports)
    log: list[str] = []
    try:
        _wait_for_line(process, "MLflow UI", log)
        path = root / CREDENTIALS_FILE
        assert path.stat().st_mode & 0o777 == 0o600
        credentials = Credentials(**json.loads(path.read_text()))
        assert any(credentials.password in line for line in log), "not shown on first use"
        wrong = "Basic " + base64.b64encode(b"headswap:not-the-password").decode()
        for url in (
            f"http://127.0.0.1:{prefect_port}/api/deployments/name/train/train",
            f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1",
        ):
            assert _status(url) == 401, url
            assert _status(url, wrong) == 401, url
            assert _status(url, credentials.header) == 200, url
    finally:
        _ctrl_c(process, log)
    assert process.returncode == 0, "".join(log)
    assert not port_in_use("127.0.0.1", prefect_port)
    assert not port_in_use("127.0.0.1", mlflow_port)
