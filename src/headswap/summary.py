"""What a finished pipeline run reports: headline metrics, the registered version, next steps."""

from __future__ import annotations

import json
from pathlib import Path

MLFLOW_UI = "http://127.0.0.1:5000"


def run_summary(metrics_path: Path = Path("reports/metrics.json"),
                registry_path: Path = Path("models/registry.json")) -> dict:
    """Headline numbers and registry facts of the workspace's latest pipeline run."""
    metrics = json.loads(metrics_path.read_text())
    registration = json.loads(registry_path.read_text())
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
        "run_url": f"{MLFLOW_UI}/#/experiments/{registration['experiment_id']}/runs/{registration['run_id']}",
        "model_url": f"{MLFLOW_UI}/#/models/{registration['model_name']}/versions/{registration['version']}",
        "tracking_uri": registration["tracking_uri"],
    }


def format_summary(summary: dict) -> str:
    """The closing text of `make run`: results, then the exact commands to go further."""
    ci = summary["ci95"].get("accuracy")
    ci_text = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""
    auc = summary["roc_auc"]
    return "\n".join([
        "headswap run complete",
        f"  test accuracy   {summary['accuracy']:.4f}{ci_text}  on {summary['n_test']} images",
        f"  test ROC-AUC    {auc:.4f}" if auc is not None else "  test ROC-AUC    n/a",
        f"  registered      {summary['model_name']} version {summary['version']}"
        f"  aliases: {', '.join(summary['aliases'])}",
        f"  MLflow run      {summary['run_id']}  ({summary['tracking_uri']})",
        "",
        "next:",
        "  make ui                              # Prefect UI :4200 + MLflow UI :5000 (run, plots, model)",
        "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000   # MLflow UI only",
        "  .venv/bin/dvc repro                  # re-run only what params.yaml changes made stale",
        "  .venv/bin/dvc exp show               # compare runs",
    ])


def format_markdown(summary: dict) -> str:
    """The Prefect run artifact: metrics table, registered version, links to MLflow."""
    auc = summary["roc_auc"]
    rows = [
        ("accuracy", f"{summary['accuracy']:.4f}"),
        ("balanced accuracy", f"{summary['balanced_accuracy']:.4f}"),
        ("ROC-AUC", f"{auc:.4f}" if auc is not None else "n/a"),
        ("test images", str(summary["n_test"])),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return "\n".join([
        f"# {summary['model_name']} version {summary['version']}",
        "",
        f"Aliases: **{', '.join(summary['aliases'])}**  ",
        f"DVC experiment: `{summary.get('dvc_experiment', 'workspace')}`",
        "",
        "| metric | value |",
        "|---|---|",
        table,
        "",
        f"- [MLflow run {summary['run_id']}]({summary['run_url']})",
        f"- [Registered model version]({summary['model_url']})",
    ])
