"""A champion moved by hand, no champion at all, and a stored model that is not the one registered.

People move ``@champion`` with the alias pencil in the MLflow UI; here the test does what the
pencil does (``MlflowClient.set_registered_model_alias``) on the embedded sqlite store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from registry_gate.conftest import GOOD, INVERTED, REPO, tiny_model


def by_hand(reg, version: str | None) -> None:
    """Move (or, with None, remove) @champion the way the MLflow UI does, bypassing headswap."""
    from headswap.tracking import client

    name = reg.registry.model_name
    if version is None:
        client().delete_registered_model_alias(name, "champion")
    else:
        client().set_registered_model_alias(name, "champion", version)


def champion(reg) -> str | None:
    from headswap.tracking import alias_version, client

    return alias_version(client(), reg.registry.model_name, "champion")


def headswap(reg, *args: str) -> subprocess.CompletedProcess:
    """The real CLI in the tiny workspace, with a params file naming the test's model."""
    params = reg.root / f"params-{reg.registry.model_name}.yaml"
    params.write_text(
        yaml.safe_dump(
            {"registry": {"model_name": reg.registry.model_name, "gate": {"bootstrap": 200}}}
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [str(Path(sys.executable).parent / "headswap"), *args, "--params", str(params)],
        cwd=reg.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_history_shows_a_champion_moved_by_hand_as_out_of_band(tiny_registry):
    from headswap.promotion.audit import audit_view
    from headswap.tracking import client

    first = tiny_registry.register(*GOOD)
    moved = tiny_registry.register(*INVERTED)
    by_hand(tiny_registry, moved)

    view = audit_view(tiny_registry.registry)
    [initial] = view.entries
    [move] = view.out_of_band
    name = tiny_registry.registry.model_name
    registered = client().get_model_version(name, moved).creation_timestamp
    assert (move.old, move.new, move.before, move.position) == (first, moved, None, 1)
    assert move.after >= initial["time"] and move.after[:19] == _iso(registered)[:19]
    assert f"is v{moved}, which was never gated" in view.warning

    shown = headswap(tiny_registry, "history")
    assert shown.returncode == 0, shown.stderr
    out = " ".join(shown.stdout.split())
    assert "alias moved outside headswap" in out and "out-of-band" in out
    assert f"v{first} │ v{moved}" in out and "never gated" in out
    assert f"after {move.after}" in out
    assert "which was never gated" in shown.stderr


def _iso(millis: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")


def test_promote_gates_against_the_hand_moved_champion_and_rollback_returns_to_it(tiny_registry):
    from headswap.promotion.audit import audit_view
    from headswap.promotion.promote import rollback

    tiny_registry.register(*GOOD)
    moved = tiny_registry.register(*INVERTED)
    better = tiny_registry.register(*GOOD)
    by_hand(tiny_registry, moved)

    outcome = tiny_registry.promote(version=int(better), reason="better than the hand-set one")
    assert outcome.comparison.champion.version == moved  # the champion as it is now
    assert outcome.promoted and outcome.entry["old_version"] == moved
    assert f"@champion v{moved} was set outside headswap" in outcome.note
    view = audit_view(tiny_registry.registry)
    [move] = view.out_of_band  # still shown, now between two audited entries
    assert (move.new, move.before, move.position) == (moved, outcome.entry["time"], 1)
    assert view.warning is None  # the champion now is a gated one

    entry = rollback(tiny_registry.registry, reason="back")
    assert (entry["old_version"], entry["new_version"]) == (better, moved)
    assert champion(tiny_registry) == moved


def test_with_no_champion_promote_says_so_and_records_the_first_champion(tiny_registry):
    from headswap.promotion.audit import audit_view

    first = tiny_registry.register(*GOOD)
    second = tiny_registry.register(*GOOD)
    by_hand(tiny_registry, None)

    outcome = tiny_registry.promote(version=int(second))
    assert outcome.promoted and outcome.comparison is None
    assert outcome.message == (
        f"no champion yet: v{second} becomes the first champion, nothing to gate against"
    )
    assert champion(tiny_registry) == second
    view = audit_view(tiny_registry.registry)
    last = view.entries[-1]
    assert (last["action"], last["outcome"], last["old_version"], last["new_version"]) == (
        "promote",
        "initial",
        None,
        second,
    )
    assert [(m.old, m.new) for m in view.out_of_band] == [(first, None)]  # the alias removal


def _stored_file(reg, version: str) -> Path:
    """The artifact store's copy of a version's ONNX file (its logged model's folder)."""
    from headswap.tracking import client

    source = client().get_model_version(reg.registry.model_name, version).source
    model_id = source.removeprefix("models:/")  # the logged model behind the version
    [found] = (reg.root / "mlartifacts").rglob(f"{model_id}/artifacts/*.onnx")
    return found


def test_promote_refuses_a_stored_model_that_is_not_the_registered_one(tiny_registry):
    from headswap.errors import RegistryError
    from headswap.promotion.audit import audit_view

    first = tiny_registry.register(*GOOD)
    second = tiny_registry.register(*GOOD)
    stored = _stored_file(tiny_registry, second)
    swapped = tiny_model(tiny_registry.root / "swapped.onnx", *INVERTED)
    stored.write_bytes(swapped.read_bytes())  # someone replaced the file in the artifact store

    with pytest.raises(RegistryError, match="sha256"):
        tiny_registry.promote(version=int(second))
    refused = headswap(tiny_registry, "promote", "--version", second)
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sha256" in errors[0] and f"v{second}" in errors[0]
    assert "Traceback" not in refused.stderr
    assert champion(tiny_registry) == first
    assert [e["outcome"] for e in audit_view(tiny_registry.registry).entries] == ["initial"]


def test_versions_without_the_sha256_tag_are_scored_with_one_warning_each(tiny_registry, capfd):
    tiny_registry.register(*INVERTED, tags={"onnx_sha256": ""})
    second = tiny_registry.register(*GOOD, tags={"onnx_sha256": ""})
    capfd.readouterr()
    outcome = tiny_registry.promote(version=int(second))
    assert outcome.promoted
    warnings = [line for line in capfd.readouterr().err.splitlines() if "onnx_sha256" in line]
    assert len(warnings) == 2, warnings  # champion and challenger, one line each
