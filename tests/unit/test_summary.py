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


def test_summary_says_what_changed_since_the_champion_and_what_was_embedded(tmp_path):
    changes = {
        "since_version": "3",
        "since_data_md5": "abc.dir",
        "per_class": {
            "defective": {"added": 5, "removed": 0, "changed": 1},
            "functional": {"added": 7, "removed": 2, "changed": 0},
            "other": {"added": 0, "removed": 0, "changed": 0},
        },
        "total": {"added": 12, "removed": 2, "changed": 1},
        "note": None,
    }
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "registry.json").write_text(json.dumps({**REGISTRY, "data_changes": changes}))
    (tmp_path / "features_info.json").write_text(json.dumps({"embedded": 12, "cache_hits": 30}))
    result = summary.run_summary(
        tmp_path / "metrics.json", tmp_path / "registry.json", tmp_path / "features_info.json"
    )
    text = summary.format_summary(result)
    assert (
        "data            +12 / -2 / ~1 images (defective +5 ~1, functional +7 -2) "
        "since champion v3's data"
    ) in text
    assert "features        12 image(s) embedded, 30 from the cache" in text
    assert "Data: +12 / -2 / ~1 images" in summary.format_markdown(result)


def test_a_first_run_says_why_there_is_nothing_to_compare(tmp_path, monkeypatch):
    note = "no champion yet: this is the first version"
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    registry = {**REGISTRY, "data_changes": {"since_version": None, "note": note}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    monkeypatch.chdir(tmp_path)  # no data/features/features_info.json here
    result = summary.run_summary(tmp_path / "metrics.json", tmp_path / "registry.json")
    assert f"data            {note}" in summary.format_summary(result)
    assert "features " not in summary.format_summary(result)


def _timings() -> dict:
    runs = [
        {"stage": "ingest", "status": "ran", "seconds": 2.0, "cpu_seconds": 1.5},
        {"stage": "features", "status": "up to date", "seconds": 1.0, "cpu_seconds": 0.5},
        {"stage": "train", "status": "restored", "seconds": 3.0, "cpu_seconds": 2.0},
    ]
    return summary.stage_timings(runs, flow_seconds=10.0, flow_cpu_seconds=6.0)


def test_timings_give_each_stage_and_the_flows_overhead():
    timings = _timings()
    assert timings["stages_seconds"] == 6.0 and timings["overhead_seconds"] == 4.0
    assert timings["overhead_cpu_seconds"] == 2.0
    rows = {what: (seconds, cpu, note) for what, seconds, cpu, note in summary.timing_rows(timings)}
    assert rows["ingest"] == (2.0, 1.5, "")
    assert rows["features"][2] == "up to date" and rows["train"][2] == "restored"
    assert rows["flow overhead"][:2] == (4.0, 2.0)
    assert rows["total"] == (10.0, 6.0, "")


def test_startup_before_the_flow_counts_in_the_total():
    timings = {**_timings(), "startup_seconds": 5.0, "startup_cpu_seconds": 3.0}
    rows = {what: (seconds, cpu) for what, seconds, cpu, _ in summary.timing_rows(timings)}
    assert rows["startup"] == (5.0, 3.0) and rows["total"] == (15.0, 9.0)


def test_summary_text_markdown_and_metrics_carry_the_timings(tmp_path, monkeypatch):
    result = {**_summary(tmp_path, monkeypatch), "timings": _timings()}
    text = summary.format_summary(result)
    assert "  features            1.0 /     0.5  up to date" in text
    assert "  flow overhead       4.0 /     2.0" in text
    markdown = summary.format_markdown(result)
    assert "| features | 1.0 | 0.5 | up to date |" in markdown
    assert "| flow overhead | 4.0 | 2.0 |" in markdown
    metrics = summary.timing_metrics(result["timings"])
    assert metrics["seconds.ingest"] == 2.0 and metrics["cpu_seconds.train"] == 2.0
    assert metrics["seconds.flow_overhead"] == 4.0 and metrics["seconds.flow"] == 10.0


def test_a_summary_without_timings_has_no_timing_section(tmp_path, monkeypatch):
    result = _summary(tmp_path, monkeypatch)
    assert "seconds (wall / CPU)" not in summary.format_summary(result)
    assert "| seconds |" not in summary.format_markdown(result)
