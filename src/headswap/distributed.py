"""Sharded feature extraction on Dask, driven by Prefect's ``DaskTaskRunner`` (prefect-dask).

``features.executor: dask`` sends the images that are not in the cache to Dask workers, a few
whole batches per shard. Each worker loads the frozen body once per shard, embeds its shard with
the same engine and batch size as a local run, and writes into the shared content-addressed
cache; the features stage then gathers the rows from the cache exactly as it does locally.

Workers must see ``data/raw`` and ``features.cache_dir`` at the same paths as the driver: true
for the default ``LocalCluster``; on a remote cluster (``features.dask_address``) mount both on
a shared filesystem.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, task

if TYPE_CHECKING:
    from headswap.config import BackboneConfig, FeaturesConfig
    from headswap.features import FeatureCache


def shard(paths: list[Path], hashes: list[str], n_shards: int, batch_size: int) -> list[tuple]:
    """Split into at most ``n_shards`` runs of whole batches, so each batch matches a local run."""
    n_batches = -(-len(paths) // batch_size)
    per_shard = -(-n_batches // max(1, n_shards)) * batch_size
    return [
        (paths[start : start + per_shard], hashes[start : start + per_shard])
        for start in range(0, len(paths), per_shard)
    ]


@task(name="embed shard", task_run_name="embed shard {index}")
def embed_shard(
    index: int,
    paths: list[Path],
    hashes: list[str],
    backbone: BackboneConfig,
    config: FeaturesConfig,
    cache: FeatureCache,
) -> int:
    """Embed one shard on a Dask worker and write it to the cache; returns the image count."""
    from headswap.backbones import load_body
    from headswap.features import embed_missing, make_runner

    # Dask worker processes are daemonic and may not fork DataLoader workers: decode inline.
    local = config.model_copy(update={"workers": 0, "executor": "local"})
    body, spec = load_body(backbone)
    runner, _ = make_runner(body, spec, backbone, local, cache.dir.parent.parent)
    embed_missing(paths, hashes, runner, spec, local, cache)
    return len(paths)


def task_runner(config: FeaturesConfig):
    """A DaskTaskRunner on ``features.dask_address``, or on a LocalCluster of dask_workers."""
    from prefect_dask import DaskTaskRunner

    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": config.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "host": "127.0.0.1",
        },
    )


def embed_on_dask(
    paths: list[Path],
    hashes: list[str],
    backbone: BackboneConfig,
    config: FeaturesConfig,
    cache: FeatureCache,
) -> int:
    """Embed ``paths`` across the Dask cluster; returns how many images were embedded."""
    shards = shard(paths, hashes, config.dask_workers, config.batch_size)

    @flow(name="features-dask", task_runner=task_runner(config), log_prints=True)
    def embed_shards() -> int:
        futures = [
            embed_shard.submit(index, shard_paths, shard_hashes, backbone, config, cache)
            for index, (shard_paths, shard_hashes) in enumerate(shards)
        ]
        return sum(future.result() for future in futures)

    return embed_shards()
