"""The promotion gate after the data grew: fair comparisons go ahead, split conflicts refuse.

Real MLflow (the embedded sqlite store), real tiny ONNX models and real images (see conftest).
Each version records the manifest it was trained on; the workspace manifest is today's.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from registry_gate.conftest import GOOD, NO_MANIFEST, WORSE, write_manifest


def split_of(index: int, old: bool) -> str:
    """Images 0-9 of each class were there before (4 test, 2 val, 4 train); 10-19 arrived
    later (3 test, 1 val, 6 train). A split never changes once given."""
    if old:
        return "test" if index < 4 else "val" if index < 6 else "train"
    return "test" if index < 13 else "val" if index < 14 else "train"


def manifests(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(before, after): the champion's data and today's, which adds images 10-19 per class."""
    before, after = [], []
    for row in rows:
        index = int(row["path"][-7:-4])
        placed = {**row, "split": split_of(index, old=index < 10)}
        after.append(placed)
        if index < 10:
            before.append(placed)
    return before, after


@pytest.fixture
def grown(tiny_registry, tmp_path):
    """Today's manifest (written to a temp file the promotion reads) and the champion's."""
    from headswap.promotion.scoring import PromotionFiles

    before, after = manifests(tiny_registry.rows)
    write_manifest(tmp_path / "manifest.csv", after)
    files = PromotionFiles(tmp_path / "manifest.csv", tiny_registry.root / "data" / "raw")
    return before, after, files


def champion(reg) -> str | None:
    from headswap.tracking import alias_version, client

    return alias_version(client(), reg.registry.model_name, "champion")


def audit(reg) -> list[dict]:
    from headswap.promotion.audit import history

    return history(reg.registry)


def test_after_growth_the_gate_compares_without_force_and_counts_new_test_images(
    tiny_registry, grown
):
    before, after, files = grown
    old = tiny_registry.register(*GOOD, manifest=before)
    new = tiny_registry.register(*GOOD, manifest=after)

    outcome = tiny_registry.promote(files, reason="retrained on grown data")

    assert outcome.promoted and champion(tiny_registry) == new != old
    comparison = outcome.comparison
    assert len(comparison.champion.labels) == 14  # 4 + 3 test images per class today
    assert comparison.new_to_champion == 6  # the 3 + 3 that arrived after the champion
    rows = {row["metric"]: row for row in comparison.table_rows()}
    assert rows["test images new to champion"]["champion"] == "6 of 14"
    last = audit(tiny_registry)[-1]
    assert last["outcome"] == "promoted" and last["forced"] is False and last["override"] is None
    assert last["gate"]["new_to_champion"] == 6


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("seed", "v{old} was split with split_seed=1, the workspace with split_seed=0"),
        ("label", "1 image(s) have another label than in v{old}'s data"),
        (
            "leak",
            "1 current test image(s) were in v{old}'s train/val split (e.g. dark/dark000.png)",
        ),
        ("unrecorded", "v{old} has no recorded split (registered before split records)"),
    ],
)
def test_a_split_conflict_refuses_with_one_line_naming_it_and_the_flag(
    tiny_registry, grown, change, expected
):
    before, after, files = grown
    tags = {"split_seed": "1"} if change == "seed" else None
    if change == "label":  # the champion saw dark001's pixels under the other class
        before = [
            {**r, "path": "bright/dark001.png", "label": "bright"}
            if r["path"] == "dark/dark001.png"
            else r
            for r in before
        ]
    if change == "leak":  # today's test image dark000 was in the champion's training data
        before = [{**r, "split": "train"} if r["path"] == "dark/dark000.png" else r for r in before]
    if change == "unrecorded":
        before = NO_MANIFEST
    old = tiny_registry.register(*GOOD, manifest=before, tags=tags)
    tiny_registry.register(*GOOD, manifest=after)

    refused = tiny_registry.promote(files)

    assert not refused.promoted and refused.comparison is None
    assert champion(tiny_registry) == old
    assert expected.format(old=old) in refused.message
    assert "--allow-split-conflict" in refused.message and "\n" not in refused.message
    last = audit(tiny_registry)[-1]
    assert last["outcome"] == "refused" and expected.format(old=old) in last["refusal"]


def test_allow_split_conflict_needs_a_reason_then_compares_and_is_recorded(tiny_registry, grown):
    from headswap.errors import PromotionError

    before, after, files = grown
    tiny_registry.register(*GOOD, manifest=before, tags={"split_seed": "1"})
    new = tiny_registry.register(*GOOD, manifest=after)

    with pytest.raises(PromotionError, match="--allow-split-conflict: also pass --reason"):
        tiny_registry.promote(files, allow_split_conflict=True)
    outcome = tiny_registry.promote(files, allow_split_conflict=True, reason="seed typo, checked")

    assert outcome.promoted and outcome.comparison is not None and champion(tiny_registry) == new
    last = audit(tiny_registry)[-1]
    assert (last["forced"], last["override"]) == (True, "split")
    assert "split_seed=1" in last["split_conflicts"][0]


def test_different_class_lists_are_a_split_conflict(tiny_registry):
    tiny_registry.register(*GOOD, tags={"classes": '["dark", "bright", "grey"]'})
    tiny_registry.register(*GOOD)
    refused = tiny_registry.promote()
    assert not refused.promoted
    assert 'predicts ["dark", "bright", "grey"]' in refused.message


def test_force_needs_a_reason_and_promotes_a_failing_challenger_with_the_override_audited(
    tiny_registry, tmp_path
):
    from headswap.cli import app
    from headswap.errors import PromotionError

    good = tiny_registry.register(*GOOD)
    worse = tiny_registry.register(*WORSE)
    refused = tiny_registry.promote()
    assert not refused.promoted and "--force --reason TEXT" in refused.message

    with pytest.raises(PromotionError, match="--force: also pass --reason"):
        tiny_registry.promote(force=True)
    params = tmp_path / "params.yaml"
    params.write_text(
        f"registry:\n  model_name: {tiny_registry.registry.model_name}\n"
        "  gate: {bootstrap: 100}\n"
    )
    runner = CliRunner()
    no_reason = runner.invoke(app, ["promote", "--params", str(params), "--force"])
    assert no_reason.exit_code == 1 and "also pass --reason" in no_reason.output
    assert "Traceback" not in no_reason.output and champion(tiny_registry) == good

    forced = runner.invoke(
        app, ["promote", "--params", str(params), "--force", "--reason", "hotfix for a bug"]
    )
    assert forced.exit_code == 0, forced.output
    assert champion(tiny_registry) == worse
    last = audit(tiny_registry)[-1]
    assert (last["outcome"], last["forced"], last["override"]) == ("promoted", True, "gate")
    assert {"accuracy", "recall.bright"} <= set(last["failed_rules"])
    assert last["reason"] == "hotfix for a bug" and last["gate"]["passed"] is False

    listing = runner.invoke(app, ["history", "--params", str(params)])
    assert listing.exit_code == 0 and "OVERRIDE gate: failed: accuracy" in listing.output
