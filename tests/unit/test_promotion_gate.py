"""The promotion gate's rules and statistics, on hand-made predictions (no registry needed)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from headswap.config import PromotionGateConfig
from headswap.evaluate import core_metrics
from headswap.promotion.audit import champion_stack, out_of_band_moves
from headswap.promotion.statistics import (
    Scores,
    compare,
    gate_checks,
    mcnemar,
    paired_bootstrap,
    rank_auc,
)

CLASSES = ["functional", "defective"]
GATE = PromotionGateConfig(
    accuracy_tolerance=0.01,
    roc_auc_tolerance=0.01,
    recall_tolerance=0.05,
    ece_tolerance=0.02,
    bootstrap=300,
)


def scores(version: str, labels: np.ndarray, p_defective: np.ndarray) -> Scores:
    probabilities = np.stack([1 - p_defective, p_defective], axis=1)
    predictions = (p_defective >= 0.5).astype(np.int64)
    return Scores(
        version,
        CLASSES,
        labels,
        probabilities,
        predictions,
        core_metrics(probabilities, labels, predictions, CLASSES),
    )


@pytest.fixture
def labels() -> np.ndarray:
    return np.array([0] * 50 + [1] * 50)


def confident(labels: np.ndarray, wrong: list[int], rng_seed: int = 0) -> np.ndarray:
    """Probabilities that get every item right except the indices in ``wrong``."""
    rng = np.random.default_rng(rng_seed)
    p = np.where(
        labels == 1, rng.uniform(0.7, 0.95, len(labels)), rng.uniform(0.05, 0.3, len(labels))
    )
    p[wrong] = 1 - p[wrong]
    return p


def test_identical_models_pass_with_a_zero_width_difference_interval(labels):
    p = confident(labels, [1, 2, 60])
    result = compare(scores("1", labels, p), scores("2", labels, p), GATE)
    assert result.passed and result.failed == []
    assert result.mcnemar == {
        "only_champion_correct": 0,
        "only_challenger_correct": 0,
        "p_value": 1.0,
    }
    assert result.bootstrap["accuracy"]["difference"] == [0.0, 0.0]


def test_a_worse_challenger_fails_on_accuracy_and_the_recall_of_the_class_it_misses(labels):
    champion = scores("1", labels, confident(labels, [1]))
    challenger = scores("2", labels, confident(labels, [1, *range(50, 62)]))  # misses 12 defects
    result = compare(champion, challenger, GATE)
    assert not result.passed
    assert {"accuracy", "recall.defective"} <= set(result.failed)
    assert "recall.functional" not in result.failed
    assert result.mcnemar["only_champion_correct"] == 12
    low, high = result.bootstrap["accuracy"]["difference"]
    assert low <= -0.12 + 0.1 and high < 0  # the paired interval excludes "no difference"


def test_tolerances_allow_a_small_drop_and_refuse_a_larger_one():
    champion = {
        "accuracy": 0.90,
        "roc_auc": 0.95,
        "ece": 0.05,
        "per_class": {"a": {"recall": 0.9}, "b": {"recall": 0.9}},
    }
    within = {
        "accuracy": 0.895,
        "roc_auc": 0.945,
        "ece": 0.065,
        "per_class": {"a": {"recall": 0.86}, "b": {"recall": 0.95}},
    }
    beyond = {
        "accuracy": 0.88,
        "roc_auc": 0.93,
        "ece": 0.08,
        "per_class": {"a": {"recall": 0.84}, "b": {"recall": 0.95}},
    }
    assert all(check.passed for check in gate_checks(champion, within, GATE))
    failed = {check.name for check in gate_checks(champion, beyond, GATE) if not check.passed}
    assert failed == {"accuracy", "roc_auc", "ece", "recall.a"}


def test_undefined_roc_auc_is_reported_but_not_gated():
    metrics = {"accuracy": 1.0, "roc_auc": None, "ece": 0.0, "per_class": {"a": {"recall": 1.0}}}
    auc = next(c for c in gate_checks(metrics, metrics, GATE) if c.name == "roc_auc")
    assert auc.passed and "not gated" in auc.rule


def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs():
    champion_correct = np.array([True] * 5 + [False] * 1 + [True] * 10)
    challenger_correct = np.array([False] * 5 + [True] * 1 + [True] * 10)
    result = mcnemar(champion_correct, challenger_correct)
    assert (result["only_champion_correct"], result["only_challenger_correct"]) == (5, 1)
    assert result["p_value"] == pytest.approx(14 / 64)  # 2 * P(X <= 1), X ~ Bin(6, 1/2)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_rank_auc_equals_sklearn_with_ties(n_classes):
    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, 200)
    probabilities = rng.multinomial(10, [1 / n_classes] * n_classes, 200) / 10  # many ties
    expected = (
        roc_auc_score(labels, probabilities[:, 1])
        if n_classes == 2
        else roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    )
    assert rank_auc(probabilities, labels) == pytest.approx(expected, abs=1e-12)
    assert rank_auc(probabilities, np.zeros(200, dtype=int)) is None


def test_bootstrap_intervals_contain_the_observed_values(labels):
    champion = scores("1", labels, confident(labels, [1, 2, 3]))
    challenger = scores("2", labels, confident(labels, [4, 70], rng_seed=1))
    ci = paired_bootstrap(champion, challenger, rounds=300)
    for model, observed in ((champion, "champion"), (challenger, "challenger")):
        low, high = ci["accuracy"][observed]
        assert low <= model.metrics["accuracy"] <= high
    assert ci["roc_auc"]["difference"][0] <= ci["roc_auc"]["difference"][1]


def entry(outcome: str, old: str | None, new: str, time: str = "") -> dict:
    return {"outcome": outcome, "old_version": old, "new_version": new, "time": time}


# v1 first, v2 promoted over it, v3 refused: the start of the histories below
AUDITED = [entry("initial", None, "1"), entry("promoted", "1", "2"), entry("refused", "2", "3")]


def test_champion_stack_replays_promotions_and_rollbacks():
    history = [*AUDITED, entry("promoted", "2", "4"), entry("rolled_back", "4", "2")]
    assert champion_stack(history, "2") == ["1", "2"]
    assert champion_stack(history + [entry("rolled_back", "2", "1")], "1") == ["1"]


def test_a_champion_moved_outside_headswap_is_rolled_back_from():
    history = [entry("initial", None, "1"), entry("promoted", "1", "2")]
    assert champion_stack(history, "5") == ["1", "2", "5"]  # rollback from 5 returns to 2


def test_a_champion_moved_by_hand_then_replaced_is_where_a_rollback_returns():
    """v1 audited, v3 set by hand, then v4 promoted over v3: rolling back returns to v3."""
    history = [entry("initial", None, "1"), entry("promoted", "3", "4")]
    assert champion_stack(history, "4") == ["1", "3", "4"]


def test_out_of_band_moves_are_found_between_audit_entries_and_since_the_last():
    history = [
        entry("initial", None, "1", "2026-01-01T00:00:00+00:00"),
        entry("refused", "3", "4", "2026-01-03T00:00:00+00:00"),  # v3 was champion by then
        entry("promoted", "3", "5", "2026-01-04T00:00:00+00:00"),
    ]
    registered = {"3": "2026-01-02T00:00:00+00:00", "6": "2026-01-05T00:00:00+00:00"}
    moves = out_of_band_moves(history, "6", registered)
    assert [(m.old, m.new, m.after, m.before, m.position) for m in moves] == [
        # after v1's audited move and after v3 was registered; before the refusal saw it
        ("1", "3", "2026-01-02T00:00:00+00:00", "2026-01-03T00:00:00+00:00", 1),
        # after the last entry (v6 was registered later still), and it is the champion now
        ("5", "6", "2026-01-05T00:00:00+00:00", None, 3),
    ]


def test_an_audit_chain_that_explains_the_champion_has_no_out_of_band_moves():
    history = [*AUDITED, entry("rolled_back", "2", "1")]
    assert out_of_band_moves(history, "1") == []
    removed = out_of_band_moves(history, None)  # the alias deleted by hand
    assert [(m.old, m.new, m.position) for m in removed] == [("1", None, 4)]
