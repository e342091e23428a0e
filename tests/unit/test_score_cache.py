"""Promotion's score cache: exact round trips, and every damaged entry read as missing."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from headswap.feature_cache import SCORES, FeatureCache, prune_cache
from headswap.promotion.score_cache import ImageScore, ScoreCache, score_key

MODEL = "ab" * 32
IMAGE = "cd" * 32
CLASSES = ["functional", "defective"]


def entry_path(cache: ScoreCache, image: str = IMAGE):
    return cache.dir / image[:2] / f"{image}.npy"


def test_a_score_reads_back_exactly_under_the_model_and_image_hashes(tmp_path):
    cache = ScoreCache(tmp_path, MODEL, CLASSES)
    probabilities = np.array([0.1234567, 0.8765433], dtype=np.float32)
    cache.put(IMAGE, ImageScore(probabilities, 1))

    got = cache.get(IMAGE)
    assert got is not None and got.label == 1
    assert got.probabilities.dtype == np.float32
    assert got.probabilities.tobytes() == probabilities.tobytes()
    assert entry_path(cache).is_file()
    assert cache.dir == tmp_path / SCORES / score_key(MODEL)
    assert cache.dir.name.startswith(MODEL + "-")
    # Another model's bytes or another image's bytes never find it.
    assert ScoreCache(tmp_path, "ef" * 32, CLASSES).get(IMAGE) is None
    assert cache.get("01" * 32) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(path.read_bytes()[:-3]),  # torn write
        lambda path: path.write_bytes(path.read_bytes()[:10] + b"X" + path.read_bytes()[11:]),
        lambda path: path.write_bytes(b""),
    ],
    ids=["truncated", "flipped-byte", "empty"],
)
def test_a_damaged_entry_reads_as_missing(tmp_path, damage):
    cache = ScoreCache(tmp_path, MODEL, CLASSES)
    cache.put(IMAGE, ImageScore(np.array([0.3, 0.7], dtype=np.float32), 1))
    damage(entry_path(cache))
    assert cache.get(IMAGE) is None


@pytest.mark.parametrize(
    "stored",
    [
        np.array([0.3, 0.7], dtype=np.float32),  # no label
        np.array([0.3, 0.7, 5.0], dtype=np.float32),  # label out of range
        np.array([0.3, 0.7, 0.5], dtype=np.float32),  # label not an index
        np.array([np.nan, 0.7, 1.0], dtype=np.float32),
        np.zeros((2, 3), dtype=np.float32),
    ],
)
def test_an_intact_entry_of_the_wrong_shape_reads_as_missing(tmp_path, stored):
    cache = ScoreCache(tmp_path, MODEL, CLASSES)
    # Written with a valid digest: only the content check can refuse it.
    FeatureCache(tmp_path, score_key(MODEL), SCORES).put(IMAGE, stored)
    assert cache.get(IMAGE) is None


def test_scores_a_model_returns_in_another_type_are_not_cached(tmp_path):
    cache = ScoreCache(tmp_path, MODEL, CLASSES)
    cache.put(IMAGE, ImageScore(np.array([0.25, 0.75], dtype=np.float64), 1))
    assert cache.get(IMAGE) is None and not entry_path(cache).exists()


def test_prune_ages_out_scores_but_unreferenced_pruning_leaves_them(tmp_path):
    cache = ScoreCache(tmp_path, MODEL, CLASSES)
    cache.put(IMAGE, ImageScore(np.array([0.3, 0.7], dtype=np.float32), 1))
    kept = prune_cache(tmp_path, keep={"some-feature-key": set()}, apply=True)
    assert kept.entries == 0 and cache.get(IMAGE) is not None

    old = time.time() - 3 * 86400
    os.utime(entry_path(cache), (old, old))
    report = prune_cache(tmp_path, older_than_days=1, apply=True)
    assert report.entries == 1 and cache.get(IMAGE) is None


def test_a_hit_marks_the_entry_used(tmp_path):
    cache = ScoreCache(tmp_path, MODEL, CLASSES)
    cache.put(IMAGE, ImageScore(np.array([0.3, 0.7], dtype=np.float32), 1))
    old = time.time() - 3 * 86400
    os.utime(entry_path(cache), (old, old))
    assert cache.get(IMAGE) is not None
    assert entry_path(cache).stat().st_mtime > old + 86400
