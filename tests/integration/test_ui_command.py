"""`headswap ui` for real: reuses a running Prefect server, starts MLflow and the deployments,
prints the URLs, and on Ctrl-C/SIGTERM stops what it started and nothing else. Slow."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from headswap.ui import free_port, healthy, port_in_use
from tests import prefect_stack as stack

pytestmark = pytest.mark.slow

prefect_server = stack.prefect_server
STARTUP_S = 300


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


def test_ui_starts_missing_servers_and_stops_only_those(prefect_server, tmp_path):
    root = stack.make_workspace(tmp_path / "workspace", tmp_path / "feature-cache")
    mlflow_port = free_port()
    env = {**prefect_server.env, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    command = [
        str(stack.VENV_BIN / "headswap"),
        "ui",
        "--prefect-port",
        prefect_server.url.rsplit(":", 1)[1],
        "--mlflow-port",
        str(mlflow_port),
    ]
    process = subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    log: list[str] = []
    try:
        _wait_for_line(process, "MLflow UI", log)
        assert any("prefect-server: already running" in line for line in log)
        assert healthy(f"http://127.0.0.1:{mlflow_port}/health")
        assert healthy(f"{prefect_server.api_url}/deployments/name/train/train")
        # The MLflow UI serves the workspace's embedded store (created on first start).
        assert (root / "mlflow.db").is_file()
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, "".join(log) + output
    assert not port_in_use("127.0.0.1", mlflow_port)
    assert healthy(f"{prefect_server.api_url}/health"), "the pre-existing server was stopped"
