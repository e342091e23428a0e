"""What a train run publishes: metrics table, markdown with version, aliases and links."""

from __future__ import annotations

import json

from headswap import summary

METRICS = {
    "accuracy": 0.875,
    "balanced_accuracy": 0.8,
    "roc_auc": None,
    "n": 40,
    "ci95": {"accuracy": [0.75, 0.95]},
}
REGISTRY = {
    "model_name": "elpv-defects",
    "version": "7",
    "run_id": "abc123",
    "experiment_id": "2",
    "tracking_uri": "sqlite:///mlflow.db",
    "aliases": ["challenger"],
    "model_uri": "models:/elpv-defects/7",
}


def _summary(tmp_path, monkeypatch, ui: str | None = None) -> dict:
    if ui:
        monkeypatch.setenv("HEADSWAP_MLFLOW_UI_URL", ui)
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "registry.json").write_text(json.dumps(REGISTRY))
    return summary.run_summary(tmp_path / "metrics.json", tmp_path / "registry.json")


def test_table_rows_carry_value_and_interval(tmp_path, monkeypatch):
    rows = {row["metric"]: row for row in summary.metrics_table(_summary(tmp_path, monkeypatch))}
    assert rows["accuracy"] == {
        "metric": "accuracy",
        "value": 0.875,
        "ci95_low": 0.75,
        "ci95_high": 0.95,
        "n_test": 40,
    }
    assert rows["ROC-AUC"]["value"] is None and rows["balanced accuracy"]["ci95_low"] is None


def test_markdown_links_mlflow_run_model_version_and_experiment(tmp_path, monkeypatch):
    result = _summary(tmp_path, monkeypatch, ui="http://mlflow.example:5001/")
    result.update(dvc_experiment="train-1234abcd", dvc_experiment_rev="f" * 40)
    text = summary.format_markdown(result)
    assert "# elpv-defects version 7" in text and "Aliases: **challenger**" in text
    assert "(http://mlflow.example:5001/#/experiments/2/runs/abc123)" in text
    assert "(http://mlflow.example:5001/#/models/elpv-defects/versions/7)" in text
    assert "| accuracy | 0.8750 | 0.7500 - 0.9500 |" in text and "| ROC-AUC | n/a | n/a |" in text
    assert "`train-1234abcd` (rev `ffffffffffff`)" in text


def test_lineage_links_skip_what_is_unknown():
    links = summary.lineage_links({"dvc_experiment": "train-1", "prefect_flow_run_url": ""})
    assert links == {"headswap.dvc_experiment": "train-1"}
