"""The registry's parity gate: a model whose ONNX parity failed is never registered."""

from __future__ import annotations

import json

import pytest

from headswap.errors import RegistryError
from headswap.register import gate_tags


def test_passed_parity_becomes_version_tags(tmp_path):
    parity = tmp_path / "export_parity.json"
    parity.write_text(json.dumps({"passed": True, "max_abs_diff": 2.5e-7, "atol": 1e-4}))
    tags = gate_tags(parity, {"skipped": [{"path": "a/b.png", "reason": "empty file"}]})
    assert tags == {
        "parity_passed": "true",
        "parity_max_abs_diff": "2.500e-07",
        "skipped_files": "1",
    }


@pytest.mark.parametrize("report", [{"passed": False, "max_abs_diff": 0.2, "atol": 1e-4}, None])
def test_failed_or_missing_parity_is_refused(tmp_path, report):
    parity = tmp_path / "export_parity.json"
    if report is not None:
        parity.write_text(json.dumps(report))
    with pytest.raises(RegistryError, match="parity check did not pass"):
        gate_tags(parity, {"skipped": []})


def test_after_logging_mlflow_follows_the_tracking_uri_variable_again(monkeypatch):
    """The fluent API's process-wide URI outranks MLFLOW_TRACKING_URI while it is set; left set,
    a later command in the same process would talk to the previous store."""
    import mlflow

    from headswap.tracking import fluent_tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///first.db")
    with fluent_tracking_uri("sqlite:///logging.db"):
        assert mlflow.get_tracking_uri() == "sqlite:///logging.db"
    assert mlflow.get_tracking_uri() == "sqlite:///first.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///later.db")
    assert mlflow.get_tracking_uri() == "sqlite:///later.db"
