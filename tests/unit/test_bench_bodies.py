"""The pure helpers of benchmarks/bodies.py: column slices, the simulated unflipped member, the
adoption rule and the calibration pool."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BODIES = Path(__file__).resolve().parents[2] / "benchmarks" / "bodies.py"


@pytest.fixture(scope="module")
def bodies():
    spec = importlib.util.spec_from_file_location("bench_bodies", BODIES)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_bodies"] = module
    spec.loader.exec_module(module)
    return module


def test_block_columns_pick_each_taps_mean_and_max_block(bodies) -> None:
    blocks = bodies.tap_blocks({"3": 2, "4": 3, "head": 1}, [3, 4, "head"])
    assert blocks == [("3", 4), ("4", 6), ("head", 2)]
    assert bodies.block_columns(blocks, [4]).tolist() == [4, 5, 6, 7, 8, 9]
    assert bodies.block_columns(blocks, ["head"], offset=100).tolist() == [110, 111]
    assert bodies.block_columns(blocks, [3, "head"]).tolist() == [0, 1, 2, 3, 10, 11]


def test_unflipped_member_copies_view_zero_into_the_flip_rows_only(bodies) -> None:
    embeddings = np.arange(2 * 2 * 4, dtype=np.float32).reshape(2, 2, 4)
    out = bodies.unflipped_member(embeddings, np.array([2, 3]))
    assert np.array_equal(out[:, 1, 2:], embeddings[:, 0, 2:])
    assert np.array_equal(out[:, :, :2], embeddings[:, :, :2])  # the main body keeps its views
    assert np.array_equal(out[:, 0], embeddings[:, 0])
    assert not np.array_equal(embeddings[:, 1, 2:], embeddings[:, 0, 2:])  # input untouched


def test_verdict_needs_both_speedups_and_no_metric_more_than_one_se_below(bodies) -> None:
    ses = {"accuracy": 0.004, "roc_auc": 0.003}
    close = {"accuracy": -0.003, "roc_auc": 0.001}
    assert bodies.verdict(1.6, 1.5, close, ses)["kept"]
    assert not bodies.verdict(1.6, 1.4, close, ses)["kept"]  # CPU throughput short of 1.5x
    worse = bodies.verdict(2.0, 2.0, {"accuracy": 0.0, "roc_auc": -0.0031}, ses)
    assert worse["within_one_se"] == {"accuracy": True, "roc_auc": False}
    assert not worse["kept"]
    assert bodies.standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(
        np.std([1, 2, 3, 4], ddof=1) / 2
    )


def test_calibration_pool_is_train_in_every_split(bodies) -> None:
    splits = [
        np.array(["train", "train", "test", "val"]),
        np.array(["train", "val", "train", "train"]),
    ]
    assert bodies.train_everywhere(splits).tolist() == [0]
