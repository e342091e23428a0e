"""`headswap ui` is no open door: a non-loopback bind needs --auth, a server it did not start is
not used without --attach, and the generated credentials are private and shown once.

Real `headswap ui` processes and a real HTTP server on loopback; each refusal happens before any
server starts, so these are fast. The servers with auth on are in test_ui_command.py (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from headswap.ui import (
    CREDENTIALS_FILE,
    Service,
    UiError,
    ensure_credentials,
    free_port,
    healthy,
    load_credentials,
    port_in_use,
    start,
    stop,
    wait_until_healthy,
)
from tests.helpers import prefect_stack as stack


@pytest.fixture
def project(tmp_path):
    """A folder `headswap ui` accepts as a project root (it only looks for flows/serve.py)."""
    root = tmp_path / "project"
    (root / "flows").mkdir(parents=True)
    (root / "flows" / "serve.py").write_text("raise SystemExit('must not be served')\n")
    return root


def _headswap_ui(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(stack.VENV_BIN / "headswap"), "ui", *args],
        cwd=root,
        env=stack.base_env(root.parent / "prefect-home"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _error_line(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, output
    assert "Traceback" not in output
    return errors[0]


def test_a_non_loopback_host_without_auth_is_refused_before_anything_starts(tmp_path):
    # No flows/serve.py here: `headswap ui` cannot start a server in this folder whatever it
    # does, so this test never binds 0.0.0.0, not even on code where the check regressed.
    project = tmp_path / "project"
    project.mkdir()
    prefect_port, mlflow_port = free_port(), free_port()
    result = _headswap_ui(
        project,
        *("--host", "0.0.0.0", "--prefect-port", str(prefect_port)),
        *("--mlflow-port", str(mlflow_port)),
    )
    line = _error_line(result)
    assert "--host 0.0.0.0" in line and "--auth" in line
    assert not port_in_use("127.0.0.1", prefect_port)
    assert not port_in_use("127.0.0.1", mlflow_port)
    assert not (project / ".headswap").exists(), "nothing started, nothing written"


def test_a_foreign_server_on_the_prefect_port_is_refused_without_attach(project, tmp_path):
    """Someone else's healthy server (here a plain http.server that answers /api/health) is
    not given our deployments, and is left running."""
    served = tmp_path / "foreign"
    (served / "api").mkdir(parents=True)
    (served / "api" / "health").write_text("true")
    port, mlflow_port = free_port(), free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    foreign = Service("foreign", command, f"http://127.0.0.1:{port}/api/health")
    start(foreign, cwd=served)
    try:
        wait_until_healthy(foreign, timeout_s=60)
        result = _headswap_ui(
            project, "--prefect-port", str(port), "--mlflow-port", str(mlflow_port)
        )
        line = _error_line(result)
        assert f"port {port}" in line and "--attach" in line
        assert not port_in_use("127.0.0.1", mlflow_port), "MLflow was started anyway"
        assert not (project / ".headswap/ui/deployments.log").exists()
        assert healthy(foreign.health_url), "the foreign server was stopped"
    finally:
        stop(foreign, timeout_s=10)


def test_credentials_are_private_and_printed_only_the_first_time(tmp_path, capsys):
    first = ensure_credentials(tmp_path)
    shown = capsys.readouterr().out
    path = tmp_path / CREDENTIALS_FILE
    assert first.password in shown and str(path) in shown
    assert len(first.password) >= 24  # secrets.token_urlsafe(24): 32 characters
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert json.loads(path.read_text())["password"] == first.password

    again = ensure_credentials(tmp_path)
    assert again == first
    assert first.password not in capsys.readouterr().out


def test_credentials_readable_by_others_are_refused(tmp_path):
    ensure_credentials(tmp_path)
    path = tmp_path / CREDENTIALS_FILE
    os.chmod(path, 0o644)
    with pytest.raises(UiError, match=r"mode 0644 lets other users read .*chmod 600"):
        load_credentials(tmp_path)
