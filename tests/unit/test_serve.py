"""The deployments `make ui` serves, built without a server: defaults, limits, schedule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.serve import FLOWS, build_deployments, load_flow
from headswap.config import parse_params
from headswap.errors import ConfigError


def _train(**sections):
    deployments = {d.name: d for d in build_deployments(parse_params(sections))}
    return deployments["train"]


def test_train_form_carries_no_snapshot_of_params_yaml():
    """A default or scheduled run must train on params.yaml as it is when it runs."""
    train = _train(head={"C": 0.5, "type": "mlp"}, data={"split": {"seed": 3}})
    assert train.parameters == {"parameters": {}}
    assert train.enforce_parameter_schema is True


def test_train_runs_one_at_a_time_and_queues_the_rest():
    train = _train()
    assert train.concurrency_limit == 1
    assert train.concurrency_options.collision_strategy == "ENQUEUE"


def test_schedule_is_off_by_default_and_follows_params():
    assert _train().schedules == []
    scheduled = _train(schedule={"train_cron": "0 2 * * *", "timezone": "Europe/Berlin"})
    (only,) = scheduled.schedules
    assert (only.schedule.cron, only.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")


def test_bad_cron_is_a_config_error():
    with pytest.raises(ConfigError, match="schedule"):
        _train(schedule={"train_cron": "0 99 * * *"})
    with pytest.raises(ConfigError, match="5 cron fields"):
        parse_params({"schedule": {"train_cron": "nightly"}})


def test_every_listed_flow_is_served_or_reported_missing(capsys):
    served = {d.name for d in build_deployments(parse_params({}))}
    missing = {name for name, target in FLOWS.items() if load_flow(target) is None}
    out = capsys.readouterr().out
    assert served | missing == set(FLOWS) and "train" in served
    assert all(f"'{name}' not served" in out for name in missing)


def test_unknown_schedule_key_is_refused():
    with pytest.raises((ConfigError, ValidationError)):
        parse_params({"schedule": {"train_cron": None, "every": "day"}})


def test_ui_waits_for_every_served_deployment():
    from headswap.ui import SERVED_DEPLOYMENTS

    assert set(SERVED_DEPLOYMENTS) == set(FLOWS)
