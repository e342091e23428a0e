"""Learning curve: per-class subsampling, table and plot, MLflow run (real sqlite store)."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from headswap.config import HeadConfig
from headswap.errors import ConfigError
from headswap.learning_curve import learning_curve, parse_sizes, subsample_train
from tests.helpers.synthetic import CLASSES, make_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_subsample_keeps_n_train_images_per_class_and_never_touches_val_or_test():
    features = make_features(n=400)
    subset = subsample_train(features, 10, seed=3)
    for label in CLASSES:
        assert ((subset.split == "train") & (subset.label == label)).sum() == 10
    for split in ("val", "test"):
        np.testing.assert_array_equal(subset.split == split, features.split == split)
    assert ((subset.split == "unused") | (subset.split == features.split)).all()
    again = subsample_train(features, 10, seed=3)
    np.testing.assert_array_equal(subset.split, again.split)
    assert not np.array_equal(subset.split, subsample_train(features, 10, seed=4).split)
    assert subsample_train(features, None, seed=0) is features


def test_parse_sizes():
    assert parse_sizes("10, 25,all") == [10, 25, None]
    with pytest.raises(ConfigError, match="'ten'"):
        parse_sizes("ten")
    with pytest.raises(ConfigError):
        parse_sizes(" , ")


def test_more_training_images_do_not_hurt_on_average():
    features = make_features(n=600, dim=20, seed=5)
    points = learning_curve(
        features, CLASSES, HeadConfig(C=0.5, device="cpu"), 0.5, [3, None], seeds=3
    )
    small, full = points
    assert (small.per_class, full.per_class) == (3, None)
    assert small.train_images == 6 and full.train_images == 300
    assert small.seeds == full.seeds == 3 and len(small.accuracy) == 3
    assert full.accuracy_std == pytest.approx(
        0.0, abs=1e-12
    )  # every seed trains the same logistic head on the same data
    assert small.accuracy_std > 0.0
    assert full.accuracy_mean > small.accuracy_mean
    assert full.roc_auc_mean > small.roc_auc_mean


def test_sizes_at_or_above_the_split_collapse_into_all():
    features = make_features(n=120)
    points = learning_curve(
        features, CLASSES, HeadConfig(device="cpu", C=1.0), 0.5, [5, 5000, None], seeds=1
    )
    assert [p.per_class for p in points] == [5, None]


def write_workspace(root, features) -> None:
    (root / "data/features").mkdir(parents=True)
    (root / "data/prepared").mkdir(parents=True)
    np.savez(
        root / "data/features/features.npz",
        embeddings=features.embeddings,
        sha256=features.sha256,
        path=features.path,
        label=features.label,
        split=features.split,
    )
    (root / "data/prepared/validation.json").write_text(json.dumps({"classes": CLASSES}))
    params = {"head": {"device": "cpu"}, "registry": {"experiment": "lc-test"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_command_writes_plot_and_table_and_logs_an_mlflow_run(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from headswap.cli import app

    write_workspace(tmp_path, make_features(n=300, views=2))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    result = CliRunner().invoke(app, ["learning-curve", "--sizes", "5,20,all", "--seeds", "2"])

    assert result.exit_code == 0, result.output
    assert (tmp_path / "reports/learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "reports/learning_curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["per_class"] for row in rows] == ["5", "20", "all"]
    assert [
        len(point["accuracy"])
        for point in json.loads((tmp_path / "reports/learning_curve.json").read_text())
    ] == [2, 2, 2]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lc-test")
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "lc_accuracy_mean")
    assert sorted(m.step for m in history) == sorted(int(row["train_images"]) for row in rows)
    by_step = {m.step: m.value for m in history}
    for row in rows:
        assert by_step[int(row["train_images"])] == pytest.approx(
            float(row["accuracy_mean"]), abs=1e-6
        )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "learning_curve")}
    assert artifacts == {
        "learning_curve/learning_curve.png",
        "learning_curve/learning_curve.csv",
        "learning_curve/learning_curve.json",
    }


def test_logging_leaves_the_process_tracking_uri_as_it_found_it(tmp_path, monkeypatch):
    """A served deployment runs many flows in one process; one run's store must not stick to it.

    ``mlflow.set_tracking_uri`` writes ``MLFLOW_TRACKING_URI`` into ``os.environ``, which every
    later flow run and every ``dvc repro`` it starts would inherit.
    """
    from headswap.cli import app

    write_workspace(tmp_path, make_features(n=120, views=1))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    result = CliRunner().invoke(app, ["learning-curve", "--sizes", "5,all", "--seeds", "1"])

    assert result.exit_code == 0, result.output
    assert (tmp_path / "mlflow.db").is_file()
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_command_without_features_says_what_to_run(tmp_path, monkeypatch):
    from headswap.cli import app

    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["learning-curve", "--no-mlflow"])
    assert result.exit_code == 1
    assert "dvc repro features" in result.output
