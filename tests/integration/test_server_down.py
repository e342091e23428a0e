"""A tracking server that is not listening: every command fails soon, says so in one line, and
shows each retry while it waits.

There is one retry policy (MLflow's HTTP client, with headswap's defaults: 5 retries, backoff
factor 2); headswap and Prefect add none on top. The slow test runs the commands with MLflow's
retry settings as a user has them (unset), the fast one with a user's own setting, which wins.
The register stage is covered by test_registry_faults.py.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from registry_gate.conftest import write_images, write_manifest

from headswap.ui import free_port
from tests.helpers.workspace import VENV_BIN, tool_env

RETRY_SETTINGS = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """params.yaml, a few images and a manifest of them: what promote and predict read first."""
    root = tmp_path_factory.mktemp("server-down")
    write_manifest(root / "data/prepared/manifest.csv", write_images(root / "data/raw", 3))
    (root / "params.yaml").write_text(yaml.safe_dump({"registry": {"model_name": "down-test"}}))
    return root


def down_env(**settings: str) -> tuple[dict[str, str], str]:
    """An environment whose tracking URI is a port nothing listens on, retry settings unset
    unless given."""
    uri = f"http://127.0.0.1:{free_port()}"
    env = tool_env(MLFLOW_TRACKING_URI=uri, **settings)
    for key in RETRY_SETTINGS:
        if key not in settings:
            env.pop(key, None)
    return env, uri


def retries(output: str, uri: str) -> list[tuple[int, int]]:
    """(retry, of how many) for each progress line about ``uri``."""
    pattern = re.compile(
        rf"^waiting for the MLflow tracking server at {re.escape(uri)} \(connection refused\): "
        r"retry (\d+) of (\d+)$"
    )
    found = (pattern.match(line) for line in output.splitlines())
    return [(int(m[1]), int(m[2])) for m in found if m]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


COMMANDS = {
    "promote": ["promote", "--version", "2"],
    "history": ["history"],
    "rollback": ["rollback"],
    "predict": ["predict", "data/raw", "--out", "p.csv", "--model", "models:/down-test@champion"],
}


def test_a_users_retry_setting_is_kept_and_each_retry_is_shown(workspace):
    env, uri = down_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")
    done = subprocess.run(
        [str(VENV_BIN / "headswap"), "history"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert retries(done.stderr, uri) == [(1, 2), (2, 2)]
    [error] = error_lines(done.stderr)
    assert f"the MLflow tracking server at {uri} did not answer (connection refused" in error
    assert "gave up after 2 retries" in error and "Check that the server is running" in error
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # each command waits out the default retries: about a minute
def test_every_command_fails_within_minutes_against_a_server_that_is_down(workspace):
    env, uri = down_env()
    started = time.monotonic()
    running = {
        name: subprocess.Popen(
            [str(VENV_BIN / "headswap"), *args],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in COMMANDS.items()
    }
    results, seconds = {}, {}
    for name, process in running.items():
        # A guard, not a timing assert: before the fix these hung for many minutes.
        out, err = process.communicate(timeout=300)
        results[name], seconds[name] = (process.returncode, out + err), time.monotonic() - started
    print(f"\nserver down at {uri}: seconds until each command failed {seconds}")
    for name, (returncode, output) in results.items():
        assert returncode == 1, (name, output[-2000:])
        assert retries(output, uri) == [(n, 5) for n in range(1, 6)], name
        [error] = error_lines(output)
        assert f"{uri} did not answer (connection refused; gave up after 5 retries" in error
        assert "Check that the server is running" in error
        assert "Traceback" not in output, name
    assert not (workspace / "p.csv").exists()
