"""What a finished pipeline run reports: headline metrics, the registered version, next steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

from headswap import paths
from headswap.io import markdown_table

MLFLOW_UI = "http://127.0.0.1:5000"


def mlflow_ui() -> str:
    """Base URL of the MLflow UI that links point to (``make ui`` serves it on :5000)."""
    return os.environ.get("HEADSWAP_MLFLOW_UI_URL", MLFLOW_UI).rstrip("/")


def registered_run_id(registry_path: Path = paths.REGISTRATION) -> str:
    """The MLflow run that models/registry.json names ('' before the first registration)."""
    try:
        return str(json.loads(registry_path.read_text())["run_id"])
    except (OSError, ValueError, KeyError):
        return ""


def run_summary(
    metrics_path: Path = paths.METRICS,
    registry_path: Path = paths.REGISTRATION,
    features_info_path: Path = paths.FEATURES_INFO,
) -> dict:
    """Headline numbers and registry facts of the workspace's latest pipeline run."""
    metrics = json.loads(metrics_path.read_text())
    registration = json.loads(registry_path.read_text())
    features = json.loads(features_info_path.read_text()) if features_info_path.is_file() else {}
    ui = mlflow_ui()
    experiment_id, run_id = registration["experiment_id"], registration["run_id"]
    name = registration["model_name"]
    return {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "roc_auc": metrics["roc_auc"],
        "ci95": metrics.get("ci95", {}),
        "n_test": metrics["n"],
        "model_name": registration["model_name"],
        "version": registration["version"],
        "aliases": registration["aliases"],
        "run_id": registration["run_id"],
        "experiment_id": registration["experiment_id"],
        "run_url": f"{ui}/#/experiments/{experiment_id}/runs/{run_id}",
        "model_url": f"{ui}/#/models/{name}/versions/{registration['version']}",
        "tracking_uri": registration["tracking_uri"],
        "data_changes": registration.get("data_changes") or {},
        "embedded": features.get("embedded"),
        "cache_hits": features.get("cache_hits"),
    }


def format_summary(summary: dict) -> str:
    """The closing text of `make run`: results, then the exact commands to go further."""
    ci = summary["ci95"].get("accuracy")
    ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    auc = summary["roc_auc"]
    return "\n".join(
        [
            "headswap run complete",
            *[f"  {label:<15} {text}" for label, text in _data_facts(summary)],
            f"  test accuracy   {summary['accuracy']:.4f}{ci_text}  on {summary['n_test']} images",
            f"  test ROC-AUC    {auc:.4f}" if auc is not None else "  test ROC-AUC    n/a",
            f"  registered      {summary['model_name']} version {summary['version']}"
            f"  aliases: {', '.join(summary['aliases'])}",
            f"  MLflow run      {summary['run_id']}  ({summary['tracking_uri']})",
            *(_timing_lines(summary["timings"]) if summary.get("timings") else []),
            "",
            "next:",
            "  make ui               # Prefect UI :4200 + MLflow UI :5000 (run, plots, model)",
            "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db   # MLflow UI only",
            "  make repro            # after editing params.yaml: re-run only the stale stages",
            "  .venv/bin/dvc exp show   # compare runs (UI runs are experiments train-<run id>)",
            "  .venv/bin/headswap promote   # gate the challenger against the champion",
        ]
    )


def stage_timings(stage_runs: list[dict], flow_seconds: float, flow_cpu_seconds: float) -> dict:
    """Seconds per stage and the flow's own overhead: its wall time minus the stages'.

    Args:
        stage_runs: one ``workspace.StageRun`` (as a dict) per stage, in the order they ran.
        flow_seconds: wall time of the flow so far, stages included.
        flow_cpu_seconds: CPU time of the flow's process and its finished children so far.
    """
    stages_seconds = sum(run["seconds"] for run in stage_runs)
    stages_cpu = sum(run["cpu_seconds"] for run in stage_runs)
    return {
        "stages": stage_runs,
        "stages_seconds": stages_seconds,
        "stages_cpu_seconds": stages_cpu,
        "flow_seconds": flow_seconds,
        "flow_cpu_seconds": flow_cpu_seconds,
        "overhead_seconds": flow_seconds - stages_seconds,
        "overhead_cpu_seconds": flow_cpu_seconds - stages_cpu,
    }


def timing_rows(timings: dict) -> list[tuple[str, float, float, str]]:
    """(what, wall seconds, CPU seconds, note) per stage, then the flow's overhead and total.

    ``startup_seconds`` (set by ``python -m flows.pipeline``: interpreter start, imports and the
    ephemeral Prefect server, before the flow's first line) is shown when the timings carry it.
    """
    rows = [
        (
            run["stage"],
            run["seconds"],
            run["cpu_seconds"],
            "" if run["status"] == "ran" else run["status"],
        )
        for run in timings["stages"]
    ]
    rows.append(
        (
            "flow overhead",
            timings["overhead_seconds"],
            timings["overhead_cpu_seconds"],
            "Prefect tasks, dvc push, dvc exp save, MLflow links",
        )
    )
    total, total_cpu = timings["flow_seconds"], timings["flow_cpu_seconds"]
    if "startup_seconds" in timings:
        rows.append(
            (
                "startup",
                timings["startup_seconds"],
                timings["startup_cpu_seconds"],
                "imports, Prefect server",
            )
        )
        total, total_cpu = (
            total + timings["startup_seconds"],
            total_cpu + timings["startup_cpu_seconds"],
        )
    rows.append(("total", total, total_cpu, ""))
    return rows


def _timing_lines(timings: dict) -> list[str]:
    lines = ["", "seconds (wall / CPU)"]
    for what, seconds, cpu, note in timing_rows(timings):
        lines.append(f"  {what:<15} {seconds:7.1f} / {cpu:7.1f}" + (f"  {note}" if note else ""))
    return lines


def timing_metrics(timings: dict) -> dict[str, float]:
    """The timings as MLflow metrics: ``seconds.<stage>`` and ``cpu_seconds.<stage>`` (for a
    skipped stage, what DVC's check cost), ``seconds.flow_overhead`` and ``seconds.flow``."""
    metrics = {f"seconds.{run['stage']}": run["seconds"] for run in timings["stages"]}
    metrics |= {f"cpu_seconds.{run['stage']}": run["cpu_seconds"] for run in timings["stages"]}
    metrics["seconds.flow_overhead"] = timings["overhead_seconds"]
    metrics["seconds.flow"] = timings["flow_seconds"]
    return {key: round(value, 3) for key, value in metrics.items()}


def _data_facts(summary: dict) -> list[tuple[str, str]]:
    """What changed in the data since the champion, and what the features stage had to embed."""
    facts = []
    changes = summary.get("data_changes") or {}
    if changes.get("since_version"):
        since = f"since champion v{changes['since_version']}'s data"
        facts.append(("data", f"{describe_changes(changes)} {since}"))
    elif changes.get("note"):
        facts.append(("data", changes["note"]))
    if summary.get("embedded") is not None:
        embedded = (
            f"{summary['embedded']} image(s) embedded, {summary['cache_hits']} from the cache"
        )
        facts.append(("features", embedded))
    return facts


def describe_changes(changes: dict) -> str:
    """'+12 / -0 / ~1 (defective +5, functional +7 ~1)': added / removed / changed images."""
    total = changes.get("total") or {}
    per_class = ", ".join(
        f"{name} " + " ".join(_counts(counts))
        for name, counts in changes.get("per_class", {}).items()
        if any(counts.get(k) for k in ("added", "removed", "changed"))
    )
    head = f"+{total.get('added', 0)} / -{total.get('removed', 0)} / ~{total.get('changed', 0)}"
    return f"{head} images" + (f" ({per_class})" if per_class else "")


def _counts(counts: dict) -> list[str]:
    signs = (("added", "+"), ("removed", "-"), ("changed", "~"))
    return [f"{sign}{counts[key]}" for key, sign in signs if counts.get(key)]


METRIC_ROWS = (
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("roc_auc", "ROC-AUC"),
)


def metrics_table(summary: dict) -> list[dict]:
    """Rows of the Prefect table artifact: one per headline metric, with its 95% CI if known."""
    rows = []
    for key, label in METRIC_ROWS:
        ci = summary["ci95"].get(key)
        rows.append(
            {
                "metric": label,
                "value": None if summary[key] is None else round(summary[key], 4),
                "ci95_low": round(ci[0], 4) if ci else None,
                "ci95_high": round(ci[1], 4) if ci else None,
                "n_test": summary["n_test"],
            }
        )
    return rows


def lineage_links(summary: dict) -> dict[str, str]:
    """Tags that point from the MLflow run and model version back to DVC and Prefect."""
    links = {
        "headswap.dvc_experiment": summary.get("dvc_experiment", ""),
        "headswap.dvc_experiment_rev": summary.get("dvc_experiment_rev", ""),
        "headswap.prefect_flow_run_url": summary.get("prefect_flow_run_url", ""),
    }
    return {key: value for key, value in links.items() if value}


def live_aliases(summary: dict) -> list[str]:
    """The aliases the registered version holds now, read from the tracking store in use
    (registry.json records them at register time; a promotion since may have moved them)."""
    from mlflow import MlflowClient

    from headswap.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    return sorted(client.get_model_version(summary["model_name"], summary["version"]).aliases)


def tag_mlflow_run(summary: dict, tags: dict[str, str]) -> None:
    """Set ``tags`` on the run and the model version that ``summary`` describes."""
    from mlflow import MlflowClient

    client = MlflowClient(summary["tracking_uri"])
    for key, value in tags.items():
        client.set_tag(summary["run_id"], key, value)
        client.set_model_version_tag(summary["model_name"], summary["version"], key, value)


def log_timings(summary: dict) -> None:
    """Log the run's timings to the MLflow run that ``summary`` describes: metrics to compare
    runs by, and ``pipeline_timings.json`` with each stage's status.

    The register stage made that run from inside the pipeline, before the timings were complete,
    so they are added to it afterwards.
    """
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    timings = summary.get("timings")
    if not timings:
        return
    client = MlflowClient(summary["tracking_uri"])
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in timing_metrics(timings).items()]
    client.log_batch(summary["run_id"], metrics=metrics)
    client.log_dict(summary["run_id"], timings, "pipeline_timings.json")


def format_markdown(summary: dict) -> str:
    """The Prefect run artifact: metrics table, registered version and aliases, links."""
    rows = "\n".join(
        f"| {row['metric']} | {_number(row['value'])} | {_interval(row)} |"
        for row in metrics_table(summary)
    )
    experiment = summary.get("dvc_experiment", "workspace")
    rev = summary.get("dvc_experiment_rev", "")
    return "\n".join(
        [
            f"# {summary['model_name']} version {summary['version']}",
            "",
            f"Aliases: **{', '.join(summary['aliases']) or 'none'}**  ",
            ""
            if summary.get("registered_now", True)
            else "Registered by an earlier run: nothing changed since, so no new version.  ",
            *[f"{label.capitalize()}: {text}  " for label, text in _data_facts(summary)],
            f"Test images: {summary['n_test']}",
            "",
            "| metric | value | 95% CI |",
            "|---|---|---|",
            rows,
            "",
            f"- MLflow run: [{summary['run_id']}]({summary['run_url']})",
            f"- Registered model: [{summary['model_name']} version {summary['version']}]"
            f"({summary['model_url']})",
            f"- DVC experiment: `{experiment}`"
            + (f" (rev `{rev[:12]}`)" if rev else "")
            + f": `dvc exp show`, `dvc exp apply {experiment}`",
            f"- Model URI: `models:/{summary['model_name']}/{summary['version']}`",
            *(_timing_markdown(summary["timings"]) if summary.get("timings") else []),
        ]
    )


def _timing_markdown(timings: dict) -> list[str]:
    rows = [
        (what, f"{seconds:.1f}", f"{cpu:.1f}", note)
        for what, seconds, cpu, note in timing_rows(timings)
    ]
    return ["", markdown_table(("seconds", "wall", "CPU", "note"), rows)]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _interval(row: dict) -> str:
    if row["ci95_low"] is None:
        return "n/a"
    return f"{row['ci95_low']:.4f} - {row['ci95_high']:.4f}"
