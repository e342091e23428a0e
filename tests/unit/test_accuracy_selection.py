"""benchmarks/accuracy.py ``select``: configurations are chosen by cross-validation inside a
split's train+val side, so nothing about that split's test rows can move the choice.

Real features: a few dozen ELPV cells through the small body (taps 6 and head, meanmax, flip
views), sliced into candidates the way ``select`` slices the default's features.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from benchmarks.accuracy import (
    Candidate,
    Selection,
    aligned_rows,
    candidate_columns,
    choose_candidate,
    merge_selections,
    render,
    run_selection,
    select_on_split,
    selection_record,
)
from headswap.config import HeadConfig, SplitConfig
from headswap.feature_set import FeatureSet
from tests.helpers.elpv_features import elpv_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BODY = ["efficientnet_lite0@96"]
SELECTION = Selection(
    criterion="accuracy",
    folds=3,
    seed=0,
    default="6+head, flip, C 0.01",
    split=SplitConfig(seed=0, test_size=0.25, val_size=0.1),
    candidates=[
        Candidate("6+head, flip, C 0.01", BODY, [6, "head"], "flip", HeadConfig(C=0.01)),
        Candidate("head, flip, C 1", BODY, ["head"], "flip", HeadConfig(C=1.0)),
        Candidate("6+head, no views, C 0.001", BODY, [6, "head"], "none", HeadConfig(C=0.001)),
    ],
)


@pytest.fixture(scope="module")
def real(tmp_path_factory, feature_cache) -> dict:
    root = tmp_path_factory.mktemp("elpv")
    features, classes, info = elpv_features(root, feature_cache, taps=[6, "head"], pool="meanmax")
    rows = aligned_rows(features, root / "prepared" / "manifest.csv")
    return {"features": features, "classes": classes, "info": info, "rows": rows}


def select(real: dict, features: FeatureSet) -> dict:
    info = real["info"]
    return select_on_split(features, info["identity"], info["views"], real["classes"], SELECTION)


def corrupted_test_rows(features: FeatureSet) -> FeatureSet:
    """The test rows' labels shuffled and flipped, their embeddings replaced by noise."""
    test = np.flatnonzero(features.split == "test")
    rng = np.random.default_rng(11)
    labels = features.label.copy()
    flipped = np.where(labels[test] == "defective", "functional", "defective")
    labels[test] = rng.permutation(flipped)
    embeddings = features.embeddings.copy()
    embeddings[test] = rng.normal(scale=20, size=embeddings[test].shape).astype(np.float32)
    return dataclasses.replace(features, embeddings=embeddings, label=labels)


def test_corrupting_the_test_rows_leaves_the_choice_and_its_cv_scores_identical(real):
    features = real["features"]
    assert (features.split == "test").sum() >= 10

    clean = select(real, features)
    corrupt = select(real, corrupted_test_rows(features))

    assert corrupt["winner"] == clean["winner"]
    assert corrupt["cv"] == clean["cv"]  # every candidate's every fold, to the last bit
    # the corruption did reach the one figure that reads the test rows
    assert corrupt["test"] != clean["test"]


def test_the_choice_function_refuses_test_rows(real):
    info = real["info"]
    with pytest.raises(ValueError, match="train\\+val side"):
        choose_candidate(
            real["features"], info["identity"], info["views"], real["classes"], SELECTION
        )


def test_the_winner_has_the_best_cross_validated_accuracy(real):
    result = select(real, real["features"])
    best = max(row["accuracy"] for row in result["cv"])
    assert result["cv_accuracy"] == best
    assert {row["candidate"] for row in result["cv"]} == {c.name for c in SELECTION.candidates}
    assert all(len(row["accuracy_per_fold"]) == SELECTION.folds for row in result["cv"])


def test_candidate_columns_follow_the_ensemble_layout():
    """The default's file: Lite2@300 then Lite0@384, taps 3..head, each tap's mean then max."""
    taps = ["3", "4", "5", "6", "head"]
    identity = {
        "backbone": "efficientnet_lite2",
        "preprocessing": {"size": 300},
        "taps": taps,
        "pool": "meanmax",
        "ensemble": [
            {
                "backbone": "efficientnet_lite0",
                "preprocessing": {"size": 384},
                "taps": taps,
                "pool": "meanmax",
            }
        ],
    }
    both = ["efficientnet_lite2@300", "efficientnet_lite0@384"]
    head = HeadConfig(C=0.01)

    def columns(bodies: list[str], picked: list) -> np.ndarray:
        return candidate_columns(identity, Candidate("c", bodies, picked, "flip", head))

    # Lite2: 88+120+208+352 channels before its 1280-channel head; Lite0: 80+112+192+320
    np.testing.assert_array_equal(columns(both, taps), np.arange(8064))
    np.testing.assert_array_equal(columns(both, ["head"]), np.r_[1536:4096, 5504:8064])
    np.testing.assert_array_equal(columns(both[1:], taps), np.arange(4096, 8064))


def test_runs_over_other_seeds_merge_into_the_one_run_and_render(real, tmp_path):
    info = real["info"]
    args = (real["features"], info, real["rows"], real["classes"], SELECTION)
    record = {"cache_key": info["cache_key"]} | info
    paths = []
    for seeds in ([0], [1]):
        part = selection_record(SELECTION, record, run_selection(*args, seeds), {"cpu": 1.0})
        paths.append(tmp_path / f"part{seeds[0]}.json")
        paths[-1].write_text(json.dumps(part))
    whole = selection_record(SELECTION, record, run_selection(*args, [0, 1]), {"cpu": 2.0})

    merged = merge_selections(paths)

    for key in ("selected", "default", "splits"):
        assert merged[key] == json.loads(json.dumps(whole[key])), key
    markdown = "".join(
        f"<!-- generated by benchmarks/accuracy.py render: {name} -->\nold\n"
        "<!-- end of generated table -->\n"
        for name in ("selection", "selection-splits", "selection-candidates")
    )
    rendered = render(markdown, [], merged)
    assert "old" not in rendered
    for split in merged["splits"]:
        assert f"| {split['seed']} | {split['winner']} |" in rendered


def test_a_shared_cv_cache_worked_from_both_ends_gives_the_same_choice(real, tmp_path):
    """Two processes on one split (``--cv-cache``, one ``--reverse``) meet in the middle."""
    info = real["info"]
    args = (real["features"], info["identity"], info["views"], real["classes"], SELECTION)
    reverse = select_on_split(*args, tmp_path, reverse=True)
    cached = select_on_split(*args, tmp_path)  # every candidate from the cache
    assert len(list(tmp_path.glob("*.json"))) == len(SELECTION.candidates)
    assert reverse == cached == select_on_split(*args)
