"""Throwaway headswap workspaces (git + DVC) on small real ELPV subsets.

A plain module rather than conftest.py: tests import these helpers, and `from conftest import`
resolves to whichever conftest.py pytest loaded last (tests/unit/ has its own).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
WORKSPACE_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore")


def run(
    args: list[str], cwd: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command with the project's venv first on PATH (DVC stages call `headswap`).

    An inherited MLFLOW_TRACKING_URI is dropped, so each workspace uses its own embedded sqlite
    store unless ``env`` names one.
    """
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env = {
        **inherited,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        **(env or {}),
    }
    result = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def set_params(workspace: Path, **sections: dict) -> None:
    """Merge ``{"head": {"C": 0.1}}``-style overrides into the workspace's params.yaml."""
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        target = params.setdefault(section, {})
        for key, value in values.items():
            if isinstance(value, dict):
                target.setdefault(key, {}).update(value)
            else:
                target[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def create_workspace(
    root: Path, feature_cache: Path, max_per_class: int = 20, **overrides: dict
) -> Path:
    """A git + DVC workspace holding the project's DAG, on `max_per_class` ELPV images per class.

    The embedded MLflow store lives inside the workspace, so tests never share registry state
    with each other or with a developer's own runs. The feature cache is content-addressed, so
    sharing one across a test session is safe and saves re-embedding the same images.
    """
    workspace = Path(root)
    for name in WORKSPACE_FILES:
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, workspace / name)
    # dvc.yaml lists the stage sources as dependencies, so the workspace needs them too.
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", workspace / "src", ignore=ignore)
    shutil.copytree(REPO / "flows", workspace / "flows", ignore=ignore)
    (workspace / ".gitignore").write_text(
        "/data/raw\n/mlflow.db\n/mlartifacts/\n/.dvc-storage/\n/.headswap/\n"
    )
    features = {"cache_dir": str(feature_cache), **overrides.pop("features", {})}
    set_params(
        workspace,
        data={"max_per_class": max_per_class},
        evaluate={"bootstrap": 50},
        features=features,
        **overrides,
    )
    run(["git", "init", "-q", "-b", "main"], workspace)
    run(["git", "config", "user.email", "test@headswap.local"], workspace)
    run(["git", "config", "user.name", "headswap tests"], workspace)
    run(["git", "add", "-A"], workspace)
    run(["git", "commit", "-q", "-m", "workspace"], workspace)
    return workspace
