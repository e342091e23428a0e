"""The features stage: embed every manifest image once per backbone configuration.

Embeddings live in a content-addressed cache (``headswap.feature_cache``) keyed by (image
sha256, backbone identity, views), shared by every DVC experiment and Prefect run on the
machine. The stage output ``features.npz`` (``headswap.feature_set``) is streamed from that
cache row by row, so adding images embeds only the new ones, sweeping heads never re-runs the
body, and peak memory does not grow with the dataset.

In order: ``missing_rows`` (cache lookup) -> the embedding engine (``headswap.engine``, in this
process, or sharded by ``headswap.distributed``) -> ``write_features`` (stream the manifest's
rows from the cache).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from headswap.backbones.loader import load_body, resolve_backbone
from headswap.backbones.spec import BackboneSpec, identity_key
from headswap.codeversion import code_version
from headswap.distributed import embed_distributed
from headswap.engine import EmbeddingJob, embed_missing, make_runner, pixel_batches
from headswap.feature_cache import FeatureCache, cache_root
from headswap.feature_set import write_features
from headswap.io import atomic_write_text
from headswap.manifest import read_manifest
from headswap.paths import FEATURES_INFO

if TYPE_CHECKING:
    from headswap.config import BackboneConfig, FeaturesConfig


@dataclass(frozen=True)
class FeaturesResult:
    path: Path
    images: int
    dim: int
    views: int
    cache_hits: int
    cache_key: str
    engine: str


def missing_rows(rows: list[dict], cache: FeatureCache) -> list[dict]:
    """Manifest rows without a valid cache entry (absent, torn or corrupt)."""
    return [row for row in rows if cache.get(row["sha256"]) is None]


def feature_cache_key(spec: BackboneSpec, backbone: BackboneConfig, config: FeaturesConfig) -> str:
    """The content address of one feature configuration (everything but the image itself)."""
    return identity_key(feature_identity(spec, backbone, config))


def feature_identity(spec: BackboneSpec, backbone: BackboneConfig, config: FeaturesConfig) -> dict:
    """Everything that changes an image's embedding, except the image.

    ``code_version`` stands for the decoding and preprocessing code (``headswap.codeversion``):
    a real change to it re-embeds, any other edit keeps the cache.
    """
    identity = spec.identity(backbone.taps, backbone.pool)
    return {**identity, "views": config.views, "code_version": code_version()}


def embed_locally(job: EmbeddingJob) -> str:
    """Embed in this process; returns the engine description."""
    # Start the decoding workers first: they fill the queue while the model loads.
    config = job.config
    batches = pixel_batches(job.paths, job.spec, config.batch_size, config.workers)
    runner, engine = make_runner(lambda: load_body(job.backbone)[0], job)
    embed_missing(job, runner, batches)
    return engine


def extract_features(
    backbone: BackboneConfig,
    config: FeaturesConfig,
    manifest_path: Path,
    raw_dir: Path,
    out_path: Path,
) -> FeaturesResult:
    """Embed every manifest image (from cache where possible) and write ``features.npz``.

    Also writes ``features_info.json`` beside it (cache key, identity, engine, hits/misses)
    and records the hit rate in the cache for ``headswap cache info``.
    """
    started = time.perf_counter()
    spec = resolve_backbone(backbone)
    root = cache_root(config.cache_dir)
    key = feature_cache_key(spec, backbone, config)
    cache = FeatureCache(root, key)
    rows = read_manifest(manifest_path)
    missing = missing_rows(rows, cache)
    engine = "cache"
    if missing:
        cache.describe(feature_identity(spec, backbone, config))
        paths = [raw_dir / row["path"] for row in missing]
        hashes = [row["sha256"] for row in missing]
        job = EmbeddingJob(paths, hashes, spec, backbone, config, cache)
        if config.executor == "local":
            engine = embed_locally(job)
        else:  # dask or torchrun: sharded into the same cache
            engine = embed_distributed(job, load_body(backbone)[0])
    views, dim = write_features(rows, cache, out_path)
    hits, seconds = len(rows) - len(missing), time.perf_counter() - started
    cache.record_run(hits, len(missing), seconds)
    info = {
        "cache_key": key,
        "identity": spec.identity(backbone.taps, backbone.pool),
        "views": config.views,
        "engine": engine,
        "images": len(rows),
        "embedded": len(missing),
        "cache_hits": hits,
        "hit_rate": round(hits / len(rows), 4),
        "dim": dim,
        "cache_dir": str(root),
    }
    atomic_write_text(out_path.with_name(FEATURES_INFO.name), json.dumps(info, indent=2))
    return FeaturesResult(out_path, len(rows), dim, views, hits, key, engine)
