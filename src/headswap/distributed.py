"""Sharded feature extraction on existing engines: Dask (through prefect-dask) or torchrun.

``features.executor: dask`` sends the images that are not in the cache to Dask workers, a few
whole batches per shard. Each worker loads the frozen body once per shard, embeds its shard with
the same engine and batch size as a local run, and writes into the shared content-addressed
cache; the features stage then gathers the rows from the cache exactly as it does locally.

Workers must see ``data/raw`` and ``features.cache_dir`` at the same paths as the driver: true
for the default ``LocalCluster``; on a remote cluster (``features.dask_address``) mount both on
a shared filesystem.

``features.executor: torchrun`` runs the stage once per process under ``torchrun`` (one per GPU):
each rank takes a contiguous slice of the missing images (no DistributedSampler: its padding
repeats images to even out the ranks), embeds it on its own device into the shared cache, and
after a barrier every rank gathers the same complete features from the cache.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from headswap.backbones.loader import load_body
from headswap.engine import EmbeddingJob, embed_missing, make_runner

if TYPE_CHECKING:
    from headswap.backbones.body import Body
    from headswap.config import FeaturesConfig


def shard(paths: list[Path], hashes: list[str], n_shards: int, batch_size: int) -> list[tuple]:
    """Split into at most ``n_shards`` runs of whole batches, so each batch matches a local run."""
    n_batches = -(-len(paths) // batch_size)
    per_shard = -(-n_batches // max(1, n_shards)) * batch_size
    return [
        (paths[start : start + per_shard], hashes[start : start + per_shard])
        for start in range(0, len(paths), per_shard)
    ]


def embed_shard(index: int, job: EmbeddingJob) -> int:
    """Embed one shard on a Dask worker and write it to the cache; returns the image count."""
    # Dask worker processes are daemonic and may not fork DataLoader workers: decode inline.
    local = job.with_config(workers=0, executor="local")
    body, _ = load_body(job.backbone)
    runner, _ = make_runner(body, local)
    embed_missing(local, runner)
    return len(job.paths)


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


def embed_on_dask(job: EmbeddingJob) -> int:
    """Embed the job's images across the Dask cluster; returns how many were embedded."""
    # Prefect is imported here, not at module level, so torchrun ranks do not need it.
    from prefect import flow, task

    config = job.config
    shards = shard(job.paths, job.hashes, config.dask_workers, config.batch_size)
    shard_task = task(embed_shard, name="embed shard", task_run_name="embed shard {index}")

    @flow(name="features-dask", task_runner=task_runner(config), log_prints=True)
    def embed_shards() -> int:
        futures = [
            shard_task.submit(index, replace(job, paths=paths, hashes=hashes))
            for index, (paths, hashes) in enumerate(shards)
        ]
        return sum(future.result() for future in futures)

    return embed_shards()


def embed_distributed(job: EmbeddingJob, body: Body) -> str:
    """Embed the job's images with ``features.executor``; returns the engine description."""
    if job.config.executor == "torchrun":
        return embed_on_ranks(job, body)
    # Build the engine once here: for ONNX Runtime this exports the body ONNX into the cache
    # before the workers look for it, so they never race to export it.
    _, engine = make_runner(body, job)
    embed_on_dask(job)
    return f"{engine} on dask"


def rank_slice(n_items: int, rank: int, world_size: int) -> slice:
    """Contiguous, unpadded share of ``rank``: sizes differ by at most one, nothing repeats."""
    return slice(n_items * rank // world_size, n_items * (rank + 1) // world_size)


def embed_on_ranks(job: EmbeddingJob, body: Body) -> str:
    """This rank's slice of the images, on its own GPU (or CPU with gloo); all ranks sync twice."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:  # before the runner moves the body: "cuda" then means this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    dist.barrier()  # every rank listed the missing images before anyone writes to the cache
    runner, engine = make_runner(body, job)
    embed_missing(job.part(rank_slice(len(job.paths), rank, world_size)), runner)
    dist.barrier()  # every slice is in the cache before any rank gathers
    return f"{engine} on {world_size} ranks"
