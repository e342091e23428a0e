"""The feature set: ``features.npz``, the features stage's output and the train stage's input.

One row per manifest image: embeddings [N, views, dim] float32 plus its sha256, path, label and
split. ``write_features`` streams it from the feature cache row by row, so the embeddings
matrix never exists in memory; ``load_features`` reads it back as a ``FeatureSet``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from headswap.errors import DataError
from headswap.feature_cache import FeatureCache
from headswap.io import atomic_path

METADATA_COLUMNS = ("sha256", "path", "label", "split")


@dataclass(frozen=True)
class FeatureSet:
    """``features.npz`` loaded: embeddings [N, views, D] and per-row metadata."""

    embeddings: np.ndarray
    sha256: np.ndarray
    path: np.ndarray
    label: np.ndarray
    split: np.ndarray

    def select(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split == split
        return self.embeddings[mask], self.label[mask]


def load_features(path: Path) -> FeatureSet:
    with np.load(path, allow_pickle=False) as data:
        return FeatureSet(**{name: data[name] for name in data.files})


def _must_get(cache: FeatureCache, row: dict) -> np.ndarray:
    embedding = cache.get(row["sha256"], touch=True)
    if embedding is None:  # only if another process pruned or damaged the entry under us
        raise RuntimeError(f"feature cache entry for {row['path']} vanished; re-run the stage")
    return embedding


def write_features(rows: list[dict], cache: FeatureCache, out_path: Path) -> tuple[int, ...]:
    """Stream ``features.npz`` from the cache, one row at a time; returns the per-row shape.

    The archive is the one ``numpy.savez`` writes (uncompressed members ``embeddings.npy``
    [N, views, dim] float32 plus sha256/path/label/split), so ``numpy.load`` reads it as usual,
    but the embeddings matrix never exists in memory here.
    """
    if not rows:
        raise DataError(f"{out_path}: the manifest has no images to embed")
    row_shape = _must_get(cache, rows[0]).shape
    header = {"descr": "<f4", "fortran_order": False, "shape": (len(rows), *row_shape)}
    with atomic_path(out_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        with archive.open("embeddings.npy", "w", force_zip64=True) as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            for row in rows:
                embedding = _must_get(cache, row)
                if embedding.shape != row_shape:
                    raise RuntimeError(
                        f"cache entry for {row['path']} has shape "
                        f"{embedding.shape}, expected {row_shape}"
                    )
                handle.write(embedding.astype("<f4", copy=False).tobytes())
        for name in METADATA_COLUMNS:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as handle:
                column = np.array([row[name] for row in rows])
                np.lib.format.write_array(handle, column, allow_pickle=False)
    return row_shape
