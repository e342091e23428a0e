"""Helpers for tests that drive real tools: temp DVC workspaces, tiny datasets, real servers.

Every server binds 127.0.0.1 on a free port and is stopped by the caller's fixture.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# No usage telemetry from the in-process MLflow/Prefect clients either: an offline machine would
# otherwise keep a sender thread (and pytest) waiting at exit.
for _key, _value in (
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DO_NOT_TRACK", "1"),
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
):
    os.environ.setdefault(_key, _value)


def tool_env(**extra: str) -> dict[str, str]:
    """This interpreter's tools first on PATH, this checkout's sources first on the path."""
    pythonpath = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {
        **os.environ,
        "PATH": str(BIN) + os.pathsep + os.environ["PATH"],
        "PYTHONPATH": pythonpath,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # a loaded machine can take longer than the 20 s default to start a temporary server
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        **extra,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_image_folder(root: Path, per_class: int, bad_files: bool = True) -> Path:
    """Two separable classes of small noisy images, plus one truncated file under skip."""
    for offset, label in enumerate(("functional", "defective")):
        (root / label).mkdir(parents=True)
        for index in range(per_class):
            rng = np.random.default_rng(offset * 1000 + index)
            base = 70 if label == "functional" else 170
            pixels = rng.normal(base, 40, (48, 48, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{label}_{index}.png")
    if bad_files:
        (root / "defective" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10))
    return root


def run(args: list[str], cwd: Path, env: dict | None = None, check: bool = True):
    result = subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def make_pipeline_workspace(root: Path, per_class: int = 12) -> Path:
    """A git + DVC project with this checkout's pipeline and a tiny ImageFolder in data/raw."""
    source = make_image_folder(root / "images", per_class)
    work = root / "ws"
    work.mkdir()
    for name in ("src", "flows", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        path = ROOT / name
        (shutil.copytree if path.is_dir() else shutil.copy)(path, work / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source=str(source), positive_class="defective")
    params["evaluate"].update(slices=[], bootstrap=20)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work)
    run(["dvc", "init", "-q"], work)
    run(["dvc", "remote", "add", "-d", "local", str(root / "dvc-storage")], work)
    run(["git", "add", "-A"], work)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], work)
    return work


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
            str(BIN / "mlflow"),
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
