"""Promotion, rollback, audit, concurrency and prediction on the embedded sqlite default.

The cwd is a tmp workspace and MLFLOW_TRACKING_URI is unset, so headswap uses its default
``sqlite:///<cwd>/mlflow.db`` store; the models are tiny real ONNX graphs (see conftest).
"""

from __future__ import annotations

import csv
import threading

import pytest

from registry_gate.conftest import GOOD, INVERTED, WORSE


def champion(reg) -> str | None:
    from headswap.tracking import alias_version, client

    return alias_version(client(), reg.registry.model_name, "champion")


def audit(reg) -> list[dict]:
    from headswap.promotion.audit import history

    return history(reg.registry)


def test_embedded_default_store_is_the_workspace_sqlite(tiny_registry):
    from headswap.tracking import tracking_uri

    tiny_registry.register(*GOOD)
    assert tracking_uri() == f"sqlite:///{tiny_registry.root.resolve() / 'mlflow.db'}"
    assert (tiny_registry.root / "mlflow.db").is_file()


def test_first_version_becomes_champion_and_is_audited(tiny_registry):
    first = tiny_registry.register(*GOOD)
    second = tiny_registry.register(*GOOD)
    assert champion(tiny_registry) == first
    entries = audit(tiny_registry)
    assert [(e["outcome"], e["old_version"], e["new_version"]) for e in entries] == [
        ("initial", None, first)
    ]
    assert second != first


def test_worse_challenger_is_refused_and_the_refusal_is_audited(tiny_registry):

    good = tiny_registry.register(*GOOD)
    worse = tiny_registry.register(*WORSE)
    outcome = tiny_registry.promote(reason="try worse")

    assert not outcome.promoted
    assert champion(tiny_registry) == good
    assert "accuracy" in outcome.comparison.failed and "recall.bright" in outcome.comparison.failed
    assert (
        outcome.comparison.challenger.metrics["accuracy"]
        < outcome.comparison.champion.metrics["accuracy"]
    )
    last = audit(tiny_registry)[-1]
    assert (last["outcome"], last["old_version"], last["new_version"]) == ("refused", good, worse)
    assert last["reason"] == "try worse" and last["gate"]["passed"] is False
    assert 0 <= last["gate"]["mcnemar_p"] <= 1


def test_better_challenger_is_promoted_and_rollback_restores_the_old_champion(tiny_registry):
    from headswap.promotion.promote import rollback

    worse = tiny_registry.register(*INVERTED)
    better = tiny_registry.register(*GOOD)
    outcome = tiny_registry.promote(reason="better")
    assert outcome.promoted and outcome.comparison.passed
    assert champion(tiny_registry) == better
    rows = {row["metric"]: row for row in outcome.comparison.table_rows()}
    assert rows["accuracy"]["result"] == "pass"
    assert rows["accuracy"]["95% CI delta"].startswith("[")  # paired bootstrap interval

    entry = rollback(tiny_registry.registry, reason="incident 42")
    assert champion(tiny_registry) == worse
    assert (entry["outcome"], entry["old_version"], entry["new_version"]) == (
        "rolled_back",
        better,
        worse,
    )
    assert [e["outcome"] for e in audit(tiny_registry)] == ["initial", "promoted", "rolled_back"]


def test_rollback_without_a_previous_champion_is_an_error(tiny_registry):
    from headswap.errors import PromotionError
    from headswap.promotion.promote import rollback

    tiny_registry.register(*GOOD)
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(tiny_registry.registry)


def test_two_concurrent_promotions_leave_one_consistent_champion(tiny_registry):
    """Two equally good challengers promoted at once: the lock serialises them, so the second
    compares against the first's result and the audit chain has no lost update."""

    tiny_registry.register(*INVERTED)
    first, second = tiny_registry.register(*GOOD), tiny_registry.register(*GOOD)
    results, errors = {}, []

    def attempt(version: str) -> None:
        try:
            results[version] = tiny_registry.promote(version=int(version), reason=f"race {version}")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=attempt, args=(v,)) for v in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not errors
    moves = [e for e in audit(tiny_registry) if e["outcome"] in ("initial", "promoted")]
    assert len(moves) == 3 and {m["new_version"] for m in moves[1:]} == {first, second}
    for before, after in zip(moves, moves[1:], strict=False):
        assert after["old_version"] == before["new_version"]  # each compared against the latest
    assert champion(tiny_registry) == moves[-1]["new_version"]


def test_a_held_lock_makes_a_second_promotion_wait_then_refuse(tiny_registry):
    from headswap.promotion.lock import PromotionLockedError, promotion_lock
    from headswap.promotion.promote import promote_version
    from headswap.tracking import client

    tiny_registry.register(*GOOD)
    tiny_registry.register(*GOOD)
    impatient = tiny_registry.registry.model_copy(update={"lock_wait_s": 1.0})
    held = promotion_lock(client(), tiny_registry.registry)
    with held, pytest.raises(PromotionLockedError, match="holds the lock"):
        promote_version(impatient, tiny_registry.files, split=tiny_registry.split)
    assert promote_version(
        impatient, tiny_registry.files, split=tiny_registry.split
    ).promoted  # released afterwards


def test_a_stale_lock_from_a_dead_process_is_broken(tiny_registry):
    from headswap.promotion.lock import LOCK_SUFFIX
    from headswap.promotion.promote import promote_version
    from headswap.tracking import client

    tiny_registry.register(*GOOD)
    tiny_registry.register(*GOOD)
    client().create_registered_model(
        f"{tiny_registry.registry.model_name}{LOCK_SUFFIX}", tags={"token": "dead", "acquired": "0"}
    )
    # No heartbeat since it was made: broken once it has been still for lock_stale_s.
    quick = tiny_registry.registry.model_copy(update={"lock_wait_s": 30.0, "lock_stale_s": 1.5})
    assert promote_version(quick, tiny_registry.files, split=tiny_registry.split).promoted


def test_the_champion_loads_and_predicts_with_a_row_per_image(tiny_registry, tmp_path):
    from headswap.predict import champion_uri, predict_images

    tiny_registry.register(*GOOD)
    folder = tiny_registry.root / "data" / "raw"
    bad = folder / "bright" / "zz-broken.png"
    bad.write_bytes(b"not a png")
    try:
        result = predict_images(
            champion_uri(tiny_registry.registry), [folder], tmp_path / "p.csv", batch_size=7
        )
    finally:
        bad.unlink()
    with open(tmp_path / "p.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result.rows == len(tiny_registry.rows) + 1
    broken = next(row for row in rows if row["path"] == "bright/zz-broken.png")
    assert broken["predicted"] == "" and "not an image" in broken["error"]
    good_rows = [row for row in rows if not row["error"]]
    assert all(row["predicted"] in ("dark", "bright") for row in good_rows)
    accuracy = sum(row["path"].split("/")[0] == row["predicted"] for row in good_rows) / len(
        good_rows
    )
    assert accuracy > 0.7  # the brightness model is good, not random, on these images
    assert result.errors == 1 and sum(result.class_counts.values()) == len(good_rows)


@pytest.mark.slow  # starts an ephemeral Prefect server
def test_prefect_promote_and_predict_flows(tiny_registry, tmp_path):
    """The thin flows publish their artifacts and return what the CLI would have printed."""
    import json
    import subprocess
    import sys

    import yaml

    from tests.helpers.workspace import tool_env

    tiny_registry.register(*GOOD)
    tiny_registry.register(*INVERTED)
    params = {
        "registry": {"model_name": tiny_registry.registry.model_name, "gate": {"bootstrap": 100}}
    }
    (tiny_registry.root / "params.yaml").write_text(yaml.safe_dump(params))
    script = (
        "import json; from flows.promote import promote; from flows.predict import predict\n"
        "entry = promote(reason='flow')\n"
        # the served flow writes only under predict.out_dir (predictions/ by default)
        "result = predict('data/raw', 'flow.csv')\n"
        "print('RESULT', json.dumps({'entry': entry, 'predict': result}))\n"
    )
    env = tool_env(PREFECT_HOME=str(tmp_path / "prefect"))
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tiny_registry.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["entry"]["outcome"] == "refused" and result["entry"]["new_version"] == "2"
    assert champion(tiny_registry) == "1"
    assert result["predict"]["rows"] == len(tiny_registry.rows) == 40
    assert sum(result["predict"]["class_counts"].values()) == 40
    written = tiny_registry.root / "predictions" / "flow.csv"
    assert len(written.read_text().splitlines()) == 41
