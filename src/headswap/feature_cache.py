"""The content-addressed embedding cache shared by every DVC experiment and Prefect run.

Layout under the cache root::

    embeddings/<key>/key.json              what the key stands for (backbone, taps, views...)
    embeddings/<key>/last_run.json         hits and misses of the latest run with this key
    embeddings/<key>/<sha[:2]>/<sha>.npy   one image's embedding [views, dim], checksummed
    bodies/<key>.onnx                      exported frozen bodies (ONNX Runtime engine)
    scores/<model key>/<sha[:2]>/<sha>.npy one image's scores by one deployable model
                                           (promotion, ``headswap.promotion.score_cache``)

An entry's modification time is its last use (a hit touches it), which is what
``prune --older-than`` looks at.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headswap.io import atomic_write_text, create_temp_beside

DIGEST_SIZE = 32
STALE_TEMP_SECONDS = 3600  # a writer's temp file older than this belongs to a crashed run


def default_cache_dir() -> Path:
    """One cache per user, outside any workspace, so DVC temp workspaces share it too."""
    root = os.environ.get("HEADSWAP_CACHE_DIR") or Path.home() / ".cache" / "headswap"
    return Path(root)


def cache_root(configured: str | Path | None) -> Path:
    """``features.cache_dir`` when it is set, else ``default_cache_dir()``."""
    return Path(configured) if configured else default_cache_dir()


def _decode(blob: bytes) -> np.ndarray | None:
    """The array in an entry, or None when the blake2b digest does not match (torn/corrupt)."""
    digest, payload = blob[:DIGEST_SIZE], blob[DIGEST_SIZE:]
    if (
        len(blob) <= DIGEST_SIZE
        or hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest() != digest
    ):
        return None
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except ValueError:
        return None


EMBEDDINGS, SCORES = "embeddings", "scores"  # the sections of the cache that hold entries


class FeatureCache:
    """Per-image array files for one cache key (embeddings, or a model's scores: ``section``).

    Each file carries a blake2b digest of its payload, so a torn or corrupted entry is detected
    and recomputed, never read. Writes go through a temp file and a rename, so two runs writing
    the same entry at once both leave a complete file.
    """

    def __init__(self, root: Path, key: str, section: str = EMBEDDINGS):
        self.root = Path(root)
        self.key = key
        self.dir = self.root / section / key

    def _path(self, sha256: str) -> Path:
        return self.dir / sha256[:2] / f"{sha256}.npy"

    def get(self, sha256: str, touch: bool = False) -> np.ndarray | None:
        """The cached embedding, or None when absent or corrupt; ``touch`` marks it used now."""
        path = self._path(sha256)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        array = _decode(blob)
        if array is not None and touch:
            # Another process may prune it between the read and the touch.
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)
        return array

    def put(self, sha256: str, embedding: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(embedding, dtype=np.float32), allow_pickle=False)
        payload = buffer.getvalue()
        target = self._path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Temp file + rename, but no fsync (unlike headswap.io.atomic_path): after a crash an
        # entry may be torn, and the digest catches that on read. Measured here, the fsync cost
        # about 7 ms per image, a tenth of the inference time.
        # The temp file gets the umask's mode, as every other output does (mkstemp's 0600 would
        # shut other users out of a shared HEADSWAP_CACHE_DIR).
        name = create_temp_beside(target)
        try:
            with open(name, "wb") as handle:
                handle.write(hashlib.blake2b(payload, digest_size=DIGEST_SIZE).digest() + payload)
            os.replace(name, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    def describe(self, identity: dict) -> None:
        """Record what this key stands for (once), so ``cache info`` can name it."""
        target = self.dir / "key.json"
        if not target.is_file():
            atomic_write_text(target, json.dumps(identity, indent=2, sort_keys=True))

    def record_run(self, hits: int, misses: int, seconds: float) -> None:
        """Remember the latest run's hit rate for ``headswap cache info``."""
        run = {"time": time.time(), "hits": hits, "misses": misses, "seconds": round(seconds, 3)}
        atomic_write_text(self.dir / "last_run.json", json.dumps(run, indent=2))


@dataclass
class KeyStats:
    """One cache key as ``headswap cache info`` shows it."""

    key: str
    identity: dict
    entries: int
    bytes: int
    last_run: dict | None


@dataclass
class CacheSummary:
    root: Path
    bytes: int
    entries: int
    keys: list[KeyStats]
    bodies: int
    bodies_bytes: int

    @property
    def last_run(self) -> tuple[str, dict] | None:
        """(key, run) of the most recent run recorded in this cache."""
        runs = [(k.key, k.last_run) for k in self.keys if k.last_run]
        return max(runs, key=lambda item: item[1]["time"]) if runs else None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _entries(key_dir: Path) -> Iterator[Path]:
    yield from key_dir.glob("??/*.npy")


def summarize_cache(root: Path) -> CacheSummary:
    """Sizes, entry counts per key and the last run's hit rate, from the files on disk."""
    keys = []
    for key_dir in sorted((root / EMBEDDINGS).glob("*/")):
        sizes = [path.stat().st_size for path in _entries(key_dir)]
        keys.append(
            KeyStats(
                key_dir.name,
                _read_json(key_dir / "key.json") or {},
                len(sizes),
                sum(sizes),
                _read_json(key_dir / "last_run.json"),
            )
        )
    bodies = [path.stat().st_size for path in (root / "bodies").glob("*.onnx")]
    total = sum(k.bytes for k in keys) + sum(bodies)
    return CacheSummary(root, total, sum(k.entries for k in keys), keys, len(bodies), sum(bodies))


@dataclass
class PruneReport:
    """What ``prune_cache`` removed (or, in a dry run, would remove)."""

    applied: bool
    entries: int = 0
    bytes: int = 0
    corrupt: int = 0
    keys: list[str] = field(default_factory=list)  # keys left with no entries
    bodies: int = 0
    temp_files: int = 0


def _stale(path: Path, cutoff: float | None) -> bool:
    return cutoff is not None and path.stat().st_mtime < cutoff


def _prune_key(
    key_dir: Path, keep: set[str] | None, cutoff: float | None, report: PruneReport
) -> None:
    """Mark (and with ``report.applied`` delete) one key's stale, unreferenced or torn entries."""
    remaining = 0
    for path in list(_entries(key_dir)):
        corrupt = _decode(path.read_bytes()) is None
        unreferenced = keep is not None and path.stem not in keep
        if corrupt or unreferenced or _stale(path, cutoff):
            report.entries += 1
            report.corrupt += corrupt
            report.bytes += path.stat().st_size
            if report.applied:
                path.unlink(missing_ok=True)
        else:
            remaining += 1
    if remaining == 0:
        report.keys.append(key_dir.name)
        if report.applied:
            shutil.rmtree(key_dir, ignore_errors=True)


def prune_cache(
    root: Path,
    *,
    keep: dict[str, set[str]] | None = None,
    older_than_days: float | None = None,
    apply: bool = False,
) -> PruneReport:
    """Remove stale entries; a dry run (the default) only counts them.

    Args:
        root: the cache root.
        keep: when given, the only (key -> image sha256s) still referenced; every other
            embedding, in every other key, is unreferenced and removed. Promotion's scores are
            not embeddings of a configuration: ``keep`` leaves them alone.
        older_than_days: remove entries (embeddings and scores) and exported bodies not used
            for this many days.
        apply: delete for real; otherwise report what would be deleted.

    Torn or corrupt entries and temp files left by crashed writers are always removed.
    """
    report = PruneReport(applied=apply)
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    for key_dir in sorted((root / EMBEDDINGS).glob("*/")):
        key_keep = None if keep is None else keep.get(key_dir.name, set())
        _prune_key(key_dir, key_keep, cutoff, report)
    for key_dir in sorted((root / SCORES).glob("*/")):
        _prune_key(key_dir, None, cutoff, report)
    for body in (root / "bodies").glob("*.onnx"):
        if _stale(body, cutoff):
            report.bodies += 1
            report.bytes += body.stat().st_size
            if apply:
                body.unlink(missing_ok=True)
    temp_cutoff = time.time() - STALE_TEMP_SECONDS
    for temp in root.rglob(".*.tmp"):
        if temp.stat().st_mtime < temp_cutoff:
            report.temp_files += 1
            if apply:
                temp.unlink(missing_ok=True)
    return report
