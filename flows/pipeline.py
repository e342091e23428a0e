"""The ``train`` flow: version the data, then run every dvc.yaml stage as its own Prefect task.

DVC decides what is stale, exactly as ``dvc repro`` would; the flow adds typed parameters, retries
on I/O, artifacts and the links between the Prefect run, the DVC experiment and the MLflow run.

    python -m flows.pipeline        # ephemeral Prefect, no server needed
"""

from __future__ import annotations

import os
import sys
import time

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from headswap import summary as summaries
from headswap import workspace
from headswap.flow_params import TrainParameters

# Stages that talk to a server get retries; the others fail fast on a real error.
RETRIED_STAGES = {"register": 3}


@task(name="version data (dvc add + push)", retries=2, retry_delay_seconds=5)
def version_data(params) -> str:
    return workspace.version_data(params)


@task(task_run_name="dvc stage: {stage}")
def run_stage(stage: str, env: dict[str, str]) -> bool:
    return workspace.repro_stage(stage, env)


@task(name="save DVC experiment", retries=2, retry_delay_seconds=2)
def save_experiment(name: str) -> None:
    workspace.save_experiment(name)


@flow(name="train", log_prints=True)
def train(parameters: TrainParameters | None = None) -> dict:
    """Run the whole pipeline; `parameters` override params.yaml like `dvc exp run -S`."""
    params = workspace.apply_overrides(parameters.overrides() if parameters else {})
    run_id = flow_run.get_id() or ""
    experiment = f"train-{run_id[:8] or time.strftime('%Y%m%d-%H%M%S')}"
    env = {"HEADSWAP_DVC_EXPERIMENT": experiment, "HEADSWAP_PREFECT_FLOW_RUN_ID": run_id}

    version_data(params)
    for stage in workspace.pipeline_stages():
        retries = RETRIED_STAGES.get(stage, 0)
        run_stage.with_options(retries=retries, retry_delay_seconds=5)(stage, env)
    save_experiment(experiment)

    result = summaries.run_summary()
    result["dvc_experiment"] = experiment
    _publish(result)
    return result


def _publish(result: dict) -> None:
    create_table_artifact(
        key="metrics",
        table=[{"metric": k, "value": result[k]} for k in ("accuracy", "balanced_accuracy", "roc_auc")],
        description="Test-split metrics of this run",
    )
    create_markdown_artifact(key="run-summary", markdown=summaries.format_markdown(result))


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from headswap.errors import HeadswapError

    try:
        outcome = train()
    except HeadswapError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(summaries.format_summary(outcome))
