"""Faults that must lose nothing: concurrent runs, a killed features stage, torn cache entries.

The registry faults (server unreachable, server dying mid-registration, failed parity) are in
test_registry_faults.py because they need a real MLflow server and a pipeline run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headswap.config import DataConfig
from headswap.feature_cache import FeatureCache
from headswap.feature_set import load_features
from headswap.prepare import prepare
from tests.helpers.workspace import tool_env

# ---------------------------------------------------------------- two `dvc repro` at once

SLOW_STAGE = """stages:
  slow:
    cmd: >-
      python -c "import pathlib, time; pathlib.Path('started').touch(); time.sleep(8);
      pathlib.Path('out.txt').write_text('done')"
    outs:
      - out.txt
"""


def _dvc_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=tool_env())
    (root / "dvc.yaml").write_text(SLOW_STAGE)
    return root


def _start_first_run(project: Path) -> subprocess.Popen:
    first = subprocess.Popen(
        ["dvc", "repro"],
        cwd=project,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while not (project / "started").exists():  # the stage runs: DVC holds the repo lock now
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.1)
    return first


def _run_beside_a_repro(project: Path, command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` in ``project`` while a first `dvc repro` holds the lock (which succeeds)."""
    first = _start_first_run(project)
    second = subprocess.run(command, cwd=project, env=tool_env(), capture_output=True, text=True)
    assert first.wait() == 0
    return second


@pytest.mark.slow
def test_plain_dvc_repro_does_not_queue(tmp_path):
    """Why the wrapper exists: DVC's own lock makes a concurrent `dvc repro` fail at once."""
    second = _run_beside_a_repro(_dvc_project(tmp_path / "plain"), ["dvc", "repro"])
    assert second.returncode != 0
    output = second.stdout + second.stderr
    assert "Unable to acquire lock" in output or "it is being blocked by" in output


def test_headswap_repro_waits_for_the_lock(tmp_path):
    """`headswap repro` (what `make repro` and the flow use) waits, then finds nothing to do."""
    project = _dvc_project(tmp_path / "wrapped")
    second = _run_beside_a_repro(project, ["headswap", "repro"])
    assert second.returncode == 0, second.stdout + second.stderr
    assert "waiting for it to finish" in second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    assert (project / "out.txt").read_text() == "done"
    assert "Stage 'slow' didn't change, skipping" in second.stdout


def test_flow_driver_waits_for_the_lock(tmp_path, monkeypatch):
    """workspace.repro_stage (one Prefect task per stage) goes through the same wait."""
    from headswap import workspace

    project = _dvc_project(tmp_path / "flow")
    first = _start_first_run(project)
    monkeypatch.chdir(project)
    run = workspace.repro_stage("slow")
    assert first.wait() == 0
    assert run.status == "up to date"  # the first run did the work; the second saw it done
    assert not run.ran


# ---------------------------------------------------------------- torn and killed cache writes


def test_torn_or_corrupted_cache_entries_are_never_read(tmp_path):
    cache = FeatureCache(tmp_path, "key")
    embedding = np.arange(12, dtype=np.float32).reshape(1, 12)
    cache.put("ab" * 32, embedding)
    path = cache._path("ab" * 32)
    assert np.array_equal(cache.get("ab" * 32), embedding)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 7])  # torn: the tail never reached the disk
    assert cache.get("ab" * 32) is None
    path.write_bytes(blob[:-4] + b"\x00\x00\x00\x00")  # same length, flipped payload bytes
    assert cache.get("ab" * 32) is None
    path.write_bytes(b"")
    assert cache.get("ab" * 32) is None
    # an interrupted atomic write leaves only a hidden temp file, never the entry itself
    (path.parent / f".{path.name}.x1.tmp").write_bytes(blob[:20])
    path.unlink()
    assert cache.get("ab" * 32) is None


def _features_workspace(root: Path, n_per_class: int) -> Path:
    for offset, label in enumerate(("functional", "defective")):
        (root / "data/raw" / label).mkdir(parents=True)
        for index in range(n_per_class):
            rng = np.random.default_rng(offset * 1000 + index)
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "data/raw" / label / f"{index}.png")
    prepare(DataConfig(), root / "data/raw", root / "data/prepared")
    (root / "params.yaml").write_text(
        "features:\n  engine: torch\n  workers: 0\n  batch_size: 2\n"
        f"  cache_dir: '{root / 'cache'}'\n"
    )
    return root


def _cache_files(root: Path) -> list[Path]:
    return list((root / "cache" / "embeddings").rglob("*.npy"))


@pytest.mark.slow
def test_kill_9_during_features_resumes_from_the_cache(tmp_path):
    workspace = _features_workspace(tmp_path, n_per_class=40)
    env = tool_env(OMP_NUM_THREADS="1")
    victim = subprocess.Popen(
        ["headswap", "features"],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while len(_cache_files(workspace)) < 6:
        assert victim.poll() is None, "features finished before it could be killed"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    survivors = len(_cache_files(workspace))
    assert 6 <= survivors < 80
    assert not (workspace / "data/features/features.npz").exists()

    rerun = subprocess.run(
        ["headswap", "features"], cwd=workspace, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    info = json.loads((workspace / "data/features/features_info.json").read_text())
    # every entry that survived the kill was complete (checksummed) and was reused
    assert info["cache_hits"] == survivors and info["embedded"] == 80 - survivors

    # and the resumed features equal a clean uninterrupted run (batches are grouped differently
    # after a resume, and CPU kernels may pick other algorithms per batch size: 1e-5 tolerance)
    clean_cache = tmp_path / "clean-cache"
    (workspace / "params.yaml").write_text(
        (workspace / "params.yaml").read_text().replace(str(workspace / "cache"), str(clean_cache))
    )
    clean = subprocess.run(
        ["headswap", "features"], cwd=workspace, env=env, capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    key = info["cache_key"]
    resumed, fresh = FeatureCache(workspace / "cache", key), FeatureCache(clean_cache, key)
    features = load_features(workspace / "data/features/features.npz")
    for sha in features.sha256:
        np.testing.assert_allclose(resumed.get(str(sha)), fresh.get(str(sha)), rtol=0, atol=1e-5)
