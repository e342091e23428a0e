"""The ``train`` flow: version the data, then run every dvc.yaml stage as its own Prefect task.

DVC decides what is stale, exactly as ``dvc repro`` would; the flow adds typed parameters, retries
on I/O, artifacts and the links between the Prefect run, the DVC experiment and the MLflow run.

    python -m flows.pipeline        # ephemeral Prefect, no server needed
    make ui                         # the served `train` deployment, triggered from the UI
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from headswap import runlock, workspace
from headswap import summary as summaries
from headswap.flow_params import TrainParameters, parse_train_parameters

# What each dvc.yaml stage does, as the task-run name a person reads in the UI.
STAGE_TITLES = {
    "ingest": "ingest: sync data.source into data/raw",
    "prepare": "prepare: validate images, split",
    "features": "features: embed with the frozen body",
    "train": "train: fit the head",
    "evaluate": "evaluate: test metrics and plots",
    "export": "export: ONNX model + parity check",
    "register": "register: MLflow run and model version",
}


@task(name="dvc stage", task_run_name="{stage}")
def run_stage(stage: str, env: dict[str, str]) -> dict:
    return asdict(workspace.repro_stage(stage, env))


@task(
    name="push data",
    task_run_name="push data/raw to the DVC remote",
    retries=2,
    retry_delay_seconds=5,
)
def push_data(env: dict[str, str]) -> None:
    workspace.push_data(env)


@task(
    name="save DVC experiment",
    task_run_name="save DVC experiment {name}",
    retries=2,
    retry_delay_seconds=2,
)
def save_experiment(name: str, message: str) -> str:
    workspace.save_experiment(name, message)
    return workspace.experiment_rev(name)


# No task retries on the MLflow tasks: MLflow's HTTP client retries (tracking.HTTP_RETRY_POLICY).
@task(
    name="link MLflow run",
    task_run_name="link MLflow run to the DVC experiment",
)
def link_mlflow_run(result: dict, links: dict[str, str]) -> None:
    from headswap.tracking import apply_http_retry_policy

    # This process makes its own MLflow client here: the same one retry policy applies to it.
    apply_http_retry_policy(result["tracking_uri"])
    summaries.tag_mlflow_run(result, links)
    summaries.log_timings(result)


@task(
    name="read aliases",
    task_run_name="read the model version's aliases from the tracking store",
)
def read_aliases(result: dict) -> list[str]:
    return summaries.live_aliases(result)


@flow(name="train", log_prints=True, validate_parameters=False)
def train(parameters: TrainParameters | None = None) -> dict:
    """Train a head on a frozen body: every dvc.yaml stage, recorded in DVC and MLflow.

    Args:
        parameters: params.yaml keys to override, like `dvc exp run -S`; a field left None
            keeps params.yaml's value as it is when the run starts. An invalid value fails the
            run before anything is written. None runs params.yaml exactly as it is.
    """
    # Validated here (not by Prefect) so a bad value fails with one line per field.
    overrides = parse_train_parameters(parameters or {}).overrides()
    run_id = flow_run.get_id() or ""
    experiment = f"train-{run_id[:8] or time.strftime('%Y%m%d-%H%M%S')}"
    driver = f"Prefect flow run {run_id}" if run_id else "the train flow"
    started, cpu, started_at = time.perf_counter(), _cpu_seconds(), time.time()
    with runlock.workspace_lock(driver) as token:
        _, changes = workspace.apply_overrides(overrides)
        for change in changes:
            print(f"params.yaml: {change.key} {change.old!r} -> {change.new!r} (flow parameter)")
        env = {
            "HEADSWAP_DVC_EXPERIMENT": experiment,
            "HEADSWAP_PREFECT_FLOW_RUN_ID": run_id,
            runlock.TOKEN_ENV: token,
        }
        previous_run = summaries.registered_run_id()
        stage_runs = []
        for stage in workspace.pipeline_stages():
            # No task retries: compute stages fail fast, and register's MLflow calls retry
            # inside MLflow's HTTP client (tracking.HTTP_RETRY_POLICY); a task retry on top
            # multiplied the wait for a tracking server that is down to over 7 minutes.
            task_run = run_stage.with_options(task_run_name=STAGE_TITLES.get(stage, stage))
            stage_runs.append(task_run(stage, env))
            if stage == "ingest":
                push_data(env)
        result = summaries.run_summary()
        result["param_changes"] = {c.key: [c.old, c.new] for c in changes}
        message = (
            f"{experiment}: MLflow run {result['run_id']}, Prefect flow run {run_id or 'none'}"
        )
        result["dvc_experiment"] = experiment
        result["dvc_experiment_rev"] = save_experiment(experiment, message)
        result["prefect_flow_run_url"] = flow_run.get_flow_run_ui_url() or ""
        # `register` leaves an unchanged model's registration alone; its MLflow run keeps the
        # links of the run that registered it.
        result["registered_now"] = result["run_id"] != previous_run
        result["aliases"] = read_aliases(result)
        # Up to here: the MLflow run gets the same figures as the summary.
        result["timings"] = summaries.stage_timings(
            stage_runs, time.perf_counter() - started, _cpu_seconds() - cpu
        )
        # For `python -m flows.pipeline` to tell what came before the flow (main's _startup).
        result["timings"].update(flow_started_at=started_at, startup_cpu_seconds=cpu)
        if result["registered_now"]:
            link_mlflow_run(result, summaries.lineage_links(result))
    _publish(result)
    return result


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the stages' DVC processes)."""
    return sum(os.times()[:4])


def _publish(result: dict) -> None:
    create_table_artifact(
        key="train-metrics",
        table=summaries.metrics_table(result),
        description=f"Test-split metrics of {result['model_name']} version {result['version']}",
    )
    create_markdown_artifact(
        key="train-summary",
        markdown=summaries.format_markdown(result),
        description="Metrics, registered version and aliases, links to MLflow",
    )


def main() -> int:
    """`python -m flows.pipeline`: one run with params.yaml as it is, in ephemeral mode."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from headswap.errors import HeadswapError

    try:
        outcome = train()
    except HeadswapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    outcome["timings"].update(_startup(outcome["timings"]))
    print(summaries.format_summary(outcome))
    return 0


def _startup(timings: dict) -> dict[str, float]:
    """What came before the flow's first line: the interpreter, imports, Prefect's server.

    Its CPU (recorded by the flow as it started) is this process's own: the ephemeral server is
    a child process that has not exited yet.
    """
    import psutil  # a dependency of DVC

    return {"startup_seconds": timings["flow_started_at"] - psutil.Process().create_time()}


if __name__ == "__main__":
    sys.exit(main())
