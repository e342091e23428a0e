"""Serve the ``train``, ``promote`` and ``predict`` deployments to a Prefect server.

``make ui`` starts the servers and runs this; it needs ``PREFECT_API_URL``. The train form's
fields start as None, meaning "as in params.yaml when the run starts"; the train deployment runs one
at a time (runs share this workspace, so a second trigger waits in the queue), and retrains on
``schedule.train_cron`` if set.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
"""

from __future__ import annotations

import importlib
import os
import sys

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from headswap.config import Params, ScheduleConfig, load_params
from headswap.errors import ConfigError, HeadswapError

# Deployment name -> "module:flow". Adding a flow to the UI is one line here.
FLOWS = {
    "train": "flows.pipeline:train",
    "promote": "flows.promote:promote",
    "predict": "flows.predict:predict",
}


def load_flow(target: str):
    """The flow object at ``module:attribute``, or None if that module is not in this checkout."""
    module_name, attribute = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return None
    return getattr(module, attribute)


def train_schedules(schedule: ScheduleConfig) -> list:
    """The nightly-retrain schedule from params.yaml, or none (the default).

    Raises:
        ConfigError: ``schedule.train_cron`` is not a valid cron expression.
    """
    if schedule.train_cron is None:
        return []
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return [CronSchedule(cron=schedule.train_cron, timezone=schedule.timezone)]
    except ValueError as error:
        raise ConfigError(f"params.yaml: invalid value for 'schedule': {error}") from None


def build_deployments(params: Params) -> list:
    """One deployment per flow in FLOWS that exists; train's schedule comes from ``params``."""
    built = []
    for name, target in FLOWS.items():
        flow = load_flow(target)
        if flow is None:
            print(f"  {target.split(':')[0].replace('.', '/')}.py not found: '{name}' not served")
            continue
        options = _train_options(params) if name == "train" else {}
        built.append(flow.to_deployment(name=name, tags=["headswap"], **options))
    return built


def _train_options(params: Params) -> dict:
    return {
        # Empty overrides: a default or scheduled run trains on params.yaml as it is then.
        "parameters": {"parameters": {}},
        "description": "Train a head on a frozen body: every dvc.yaml stage as a task, recorded "
        "as a DVC experiment and an MLflow run. Leave a field None to use params.yaml's value "
        "at run time; a value you fill in is written into params.yaml, like `dvc exp run -S`.",
        "concurrency_limit": ConcurrencyLimitConfig(
            limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        "schedules": train_schedules(params.schedule),
        "enforce_parameter_schema": True,
    }


def main() -> int:
    """Build the deployments from ./params.yaml and serve them until interrupted."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        deployments = build_deployments(load_params())
    except HeadswapError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    serve(*deployments, print_starting_message=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
