"""Real MLflow tracking servers on loopback for the tests that need one.

Every server binds 127.0.0.1 on a free port (``headswap.ui.free_port``) and is stopped by the
caller's fixture with ``stop``.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.helpers.workspace import VENV_BIN, tool_env


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {url}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"server did not answer at {url}")


def start_mlflow(backend_uri: str, artifacts: Path, port: int, log: Path) -> subprocess.Popen:
    """A real MLflow tracking server on 127.0.0.1:<port>, ready when this returns."""
    handle = open(log, "ab")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--workers",
            "1",
        ],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=tool_env(),
        start_new_session=True,
    )
    wait_for_http(f"http://127.0.0.1:{port}/health", process)
    return process


def stop(process: subprocess.Popen) -> None:
    """Stop a server and everything it started (it runs in its own session)."""
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
