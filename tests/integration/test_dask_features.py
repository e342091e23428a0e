"""features.executor: dask (2-worker LocalCluster) and torchrun (2 CPU ranks, gloo) give the
single-process features.

Every run is the real ``headswap features`` stage, each with its own empty cache, so the sharded
runs embed every image on their workers or ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from headswap.config import DataConfig
from headswap.distributed import rank_slice, shard
from headswap.feature_set import load_features
from headswap.prepare import prepare
from tests.helpers.workspace import make_image_folder, run, tool_env


def test_shards_are_whole_batches_covering_every_image():
    paths = [Path(f"{index}.png") for index in range(23)]
    hashes = [str(index) for index in range(23)]
    shards = shard(paths, hashes, n_shards=2, batch_size=4)
    assert [len(p) for p, _ in shards] == [12, 11]  # 3 whole batches, then the rest
    assert [h for _, hs in shards for h in hs] == hashes
    assert len(shard(paths, hashes, n_shards=50, batch_size=4)) == 6


def test_rank_slices_are_unpadded_and_disjoint():
    """Unlike DistributedSampler, no rank repeats an image to even out the counts."""
    for n_items, world in ((10, 3), (2, 4), (0, 2), (23, 8)):
        shares = [range(n_items)[rank_slice(n_items, rank, world)] for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(n_items))


def _features(
    work: Path,
    executor: str,
    engine: str = "onnxruntime",
    batch: int = 4,
    launcher: tuple[str, ...] = (),
) -> tuple[np.ndarray, dict]:
    params = {
        "features": {
            "engine": engine,
            "batch_size": batch,
            "workers": 0,
            "cache_dir": str(work / f"cache-{executor}"),
            "executor": executor,
            "dask_workers": 2,
        },
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = tool_env(PREFECT_HOME=str(work / "prefect-home"), OMP_NUM_THREADS="1")
    result = run([*launcher, shutil.which("headswap", path=env["PATH"]), "features"], work, env)
    info = json.loads((work / "data/features/features_info.json").read_text())
    features = load_features(work / "data/features/features.npz")
    return features.embeddings, {**info, "output": result.stdout + result.stderr}


@pytest.mark.slow
def test_two_worker_local_cluster_matches_single_process_bit_for_bit(tmp_path):
    make_image_folder(tmp_path / "data/raw", per_class=10, bad_files=False)
    prepare(DataConfig(), tmp_path / "data/raw", tmp_path / "data/prepared")
    local, local_info = _features(tmp_path, "local")
    dask, dask_info = _features(tmp_path, "dask")
    assert local_info["embedded"] == dask_info["embedded"] == 20
    assert dask_info["engine"] == "onnxruntime/cpu on dask"
    # same engine, same batches (shards are whole batches): identical bits, not just close
    assert local.dtype == dask.dtype and np.array_equal(local, dask)


@pytest.mark.slow
def test_torchrun_two_ranks_match_single_process_bit_for_bit(tmp_path):
    make_image_folder(tmp_path / "data/raw", per_class=10, bad_files=False)
    prepare(DataConfig(), tmp_path / "data/raw", tmp_path / "data/prepared")
    local, _ = _features(tmp_path, "local", engine="torch", batch=5)
    torchrun = shutil.which("torchrun", path=tool_env()["PATH"])
    launcher = (torchrun, "--standalone", "--nproc-per-node", "2")
    ranks, info = _features(tmp_path, "torchrun", engine="torch", batch=5, launcher=launcher)
    assert info["embedded"] == 20 and info["engine"] == "torch/cpu on 2 ranks"
    # 10 images per rank in batches of 5: the same batches as the single process
    assert np.array_equal(local, ranks)
