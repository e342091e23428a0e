"""Throwaway headswap workspaces (git + DVC), generated image folders, and the one ``run``.

Each workspace holds its own embedded MLflow store, so tests never share registry state with each
other or with a developer's own runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
WORKSPACE_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore")
CLASSES = ("functional", "defective")
# A small body (Lite0 at 96 px, one tap, no ensemble) for tests about the DAG, not the body.
SMALL_BODY = {
    "name": "efficientnet_lite0",
    "image_size": 96,
    "taps": ["head"],
    "pool": "mean",
    "ensemble": [],
}

# No usage telemetry from the in-process MLflow/Prefect clients either: an offline machine would
# otherwise keep a sender thread (and pytest) waiting at exit.
for _key, _value in (
    ("MLFLOW_DISABLE_TELEMETRY", "true"),
    ("DO_NOT_TRACK", "1"),
    ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
):
    os.environ.setdefault(_key, _value)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment for a tool subprocess: this venv first on PATH, this checkout's sources
    first on the path, and no inherited ``MLFLOW_TRACKING_URI`` (each workspace uses its own
    embedded store unless ``extra`` names one)."""
    inherited = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    pythonpath = os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {
        **inherited,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": pythonpath,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # a loaded machine can take longer than the 20 s default to start a temporary server
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        **extra,
    }


def run(
    args: list[str], cwd: Path, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a command in ``cwd`` with ``tool_env()`` updated by ``env``; raise if it fails."""
    result = subprocess.run(
        args, cwd=cwd, env={**tool_env(), **(env or {})}, capture_output=True, text=True
    )
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


def noise_image(seed: int, size: int = 8) -> Image.Image:
    """Uniform RGB noise: the same seed always gives the same pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def noise_folder(
    root: Path, n_per_class: dict[str, int], seed: int = 0, class_stride: int = 100
) -> Path:
    """``root/<class>/<i>.png``: distinct noise images, seeded ``seed + k * class_stride + i``
    for image ``i`` of the k-th class."""
    for offset, (label, n) in enumerate(n_per_class.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(n):
            noise_image(seed + offset * class_stride + index).save(root / label / f"{index}.png")
    return root


def make_image_folder(
    root: Path, per_class: int, first: int = 0, size: int = 48, bad_files: bool = False
) -> list[Path]:
    """Two separable classes of noisy images ``<class>/<class>_<i>.png``, i from ``first``.

    The same index always gives the same pixels, so a folder can be grown image by image.
    With ``bad_files`` a truncated PNG is added under ``defective/`` as well (not returned).
    """
    made = []
    for offset, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        for index in range(first, first + per_class):
            rng = np.random.default_rng(offset * 100_000 + index)
            base = 70 if label == "functional" else 170
            pixels = rng.normal(base, 40, (size, size, 3)).clip(0, 255).astype(np.uint8)
            path = root / label / f"{label}_{index}.png"
            Image.fromarray(pixels).save(path)
            made.append(path)
    if bad_files:
        (root / "defective" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10))
    return made


def _commit_all(workspace: Path, message: str) -> None:
    run(["git", "add", "-A"], workspace)
    run(
        ["git", "-c", "user.name=headswap tests", "-c", "user.email=test@headswap.local"]
        + ["commit", "-q", "-m", message],
        workspace,
    )


def create_workspace(
    root: Path, feature_cache: Path, max_per_class: int = 20, **overrides: dict
) -> Path:
    """A git + DVC workspace holding the project's DAG, on `max_per_class` ELPV images per class.

    The feature cache is content-addressed, so sharing one across a test session is safe and
    saves re-embedding the same images.
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
    _commit_all(workspace, "workspace")
    return workspace


def make_folder_workspace(
    tmp_path: Path, feature_cache: Path, **overrides: dict
) -> tuple[Path, Path]:
    """A workspace on the small body (no views) whose data.source is ``tmp_path/source``, a
    folder of 12 images per class; returns the workspace and the source to grow."""
    source = tmp_path / "source"
    make_image_folder(source, 12, first=0, size=40)
    workspace = create_workspace(
        tmp_path / "ws",
        feature_cache,
        1000,
        backbone=SMALL_BODY,
        features={"views": "none"},
        **overrides,
    )
    set_params(workspace, data={"source": str(source), "positive_class": "defective"})
    return workspace, source


def make_pipeline_workspace(root: Path, per_class: int = 12) -> Path:
    """A git + DVC project with this checkout's pipeline on a generated ImageFolder source."""
    source = root / "images"
    make_image_folder(source, per_class, bad_files=True)
    work = root / "ws"
    work.mkdir()
    for name in ("src", "flows", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        path = REPO / name
        (shutil.copytree if path.is_dir() else shutil.copy)(path, work / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source=str(source), positive_class="defective")
    params["evaluate"].update(slices=[], bootstrap=20)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], work)
    run(["dvc", "init", "-q"], work)
    run(["dvc", "remote", "add", "-d", "local", str(root / "dvc-storage")], work)
    _commit_all(work, "init")
    return work


def features_info(workspace: Path) -> dict:
    """The features stage's summary (how many images it embedded, how many came from cache)."""
    return json.loads((workspace / "data/features/features_info.json").read_text())
