"""`head.C: auto` and `evaluate.threshold: auto` are chosen on the training side only.

On real features (ELPV cells through the small body), the train stage's choices (C by
cross-validation on train, temperature and threshold on val) and the head's weights come out
identical whether the test rows carry their own labels, scrambled labels and noise, or are not
there at all. The stage is run as the CLI runs it, on files.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml

from headswap.config import EvaluateConfig, HeadConfig
from headswap.feature_set import FeatureSet
from headswap.train import C_GRID, train_head
from tests.helpers.elpv_features import elpv_features
from tests.helpers.workspace import REPO

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUTO_HEAD = HeadConfig(C="auto", device="cpu")
AUTO_THRESHOLD = EvaluateConfig(threshold="auto")


@pytest.fixture(scope="module")
def real(tmp_path_factory, feature_cache) -> tuple[FeatureSet, list[str]]:
    features, classes, _ = elpv_features(tmp_path_factory.mktemp("elpv"), feature_cache)
    assert set(features.split) == {"train", "val", "test"}
    return features, classes


def scrambled(features: FeatureSet, split: str = "test") -> FeatureSet:
    """Every ``split`` row's label swapped to the other class and its embedding made noise."""
    rows = features.split == split
    classes = sorted(set(features.label))
    labels = features.label.copy()
    labels[rows] = np.where(labels[rows] == classes[0], classes[1], classes[0])
    embeddings = features.embeddings.copy()
    noise = np.random.default_rng(5).normal(scale=30, size=embeddings[rows].shape)
    embeddings[rows] = noise.astype(np.float32)
    return dataclasses.replace(features, embeddings=embeddings, label=labels)


def without_test_rows(features: FeatureSet) -> FeatureSet:
    keep = features.split != "test"
    return FeatureSet(*(getattr(features, f.name)[keep] for f in dataclasses.fields(FeatureSet)))


def trained(features: FeatureSet, classes: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
    head, meta = train_head(features, classes, AUTO_HEAD, AUTO_THRESHOLD)
    choices = {"C": meta.C, "temperature": meta.temperature, "threshold": meta.threshold}
    return choices, {k: v.numpy().copy() for k, v in head.state_dict().items()}


@pytest.mark.parametrize("change", [scrambled, without_test_rows])
def test_C_threshold_and_weights_ignore_the_test_rows(real, change):
    features, classes = real
    choices, weights = trained(features, classes)
    changed_choices, changed_weights = trained(change(features), classes)

    assert changed_choices == choices
    for name, value in weights.items():
        np.testing.assert_array_equal(changed_weights[name], value, err_msg=name)


def test_the_same_change_on_the_val_rows_moves_the_calibration(real):
    """Guard against a vacuous pass: the choices do read data, the val rows' at least."""
    features, classes = real
    choices, _ = trained(features, classes)
    changed, _ = trained(scrambled(features, "val"), classes)
    assert choices["C"] in C_GRID and changed["C"] == choices["C"]  # C reads train only
    assert (changed["temperature"], changed["threshold"]) != (
        choices["temperature"],
        choices["threshold"],
    )


def test_the_train_stage_writes_the_same_head_without_the_test_rows(real, tmp_path, monkeypatch):
    """`headswap train` on a features.npz with and without its test rows: same head.json."""
    from headswap import paths
    from headswap.cli import train

    features, classes = real
    written = {}
    for name, variant in (("all", features), ("no-test", without_test_rows(features))):
        workspace = tmp_path / name
        (workspace / paths.FEATURES.parent).mkdir(parents=True)
        (workspace / paths.VALIDATION.parent).mkdir(parents=True)
        np.savez(workspace / paths.FEATURES, **dataclasses.asdict(variant))
        (workspace / paths.VALIDATION).write_text(json.dumps({"classes": classes}))
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["head"].update(C="auto", device="cpu")
        params["evaluate"]["threshold"] = "auto"
        (workspace / paths.PARAMS).write_text(yaml.safe_dump(params))
        monkeypatch.chdir(workspace)
        train(paths.PARAMS)
        meta = json.loads((workspace / paths.HEAD_META).read_text())
        written[name] = {k: meta[k] for k in ("C", "temperature", "threshold", "dim")}
    assert written["no-test"] == written["all"]
