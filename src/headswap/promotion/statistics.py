"""The promotion gate's statistics: two versions scored on one test set, compared.

The gate passes when the challenger is not worse than the champion beyond ``registry.gate``
tolerances on accuracy, ROC-AUC, every class's recall and ECE (``gate_checks``); McNemar's exact
test and paired bootstrap intervals are reported beside it. Pure numpy and scipy: no MLflow, no
files, so every rule can be tested on made-up scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headswap.config import PromotionGateConfig
from headswap.errors import PromotionError
from headswap.metrics import percentile_bootstrap


@dataclass(frozen=True)
class Scores:
    """One model's predictions on the test set and the metrics computed from them."""

    version: str
    classes: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    predictions: np.ndarray
    metrics: dict


def mcnemar(champion_correct: np.ndarray, challenger_correct: np.ndarray) -> dict:
    """McNemar's exact test on the discordant pairs (binomial, two-sided)."""
    from scipy.stats import binomtest

    only_champion = int((champion_correct & ~challenger_correct).sum())
    only_challenger = int((~champion_correct & challenger_correct).sum())
    discordant = only_champion + only_challenger
    p_value = binomtest(only_champion, discordant, 0.5).pvalue if discordant else 1.0
    return {
        "only_champion_correct": only_champion,
        "only_challenger_correct": only_challenger,
        "p_value": float(p_value),
    }


def rank_auc(probabilities: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC-AUC as evaluate.roc_auc defines it, from ranks (Mann-Whitney U), without sklearn's
    per-call validation: the bootstrap calls it thousands of times."""
    from scipy.stats import rankdata

    present = np.unique(labels)
    n_classes = probabilities.shape[1]
    if len(present) < 2 or (n_classes > 2 and len(present) < n_classes):
        return None
    columns = [1] if n_classes == 2 else range(n_classes)
    aucs = []
    for k in columns:
        positive = labels == k
        ranks = rankdata(probabilities[:, k])
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def paired_bootstrap(champion: Scores, challenger: Scores, rounds: int, seed: int = 0) -> dict:
    """95% percentile intervals of accuracy and ROC-AUC for both models and their difference.

    Both models are scored on the *same* resampled test sets, so the difference's interval
    reflects how much they disagree, not the test set's own sampling noise twice over.
    """
    rng = np.random.default_rng(seed)
    labels = champion.labels  # both scored the same test set: one set of labels
    out: dict[str, dict] = {}
    for metric, score in (("accuracy", _accuracy), ("roc_auc", _auc)):

        def difference(sample: np.ndarray, score=score) -> float | None:
            a, b = score(champion, labels, sample), score(challenger, labels, sample)
            return None if a is None or b is None else b - a

        out[metric] = percentile_bootstrap(
            len(labels),
            {
                "champion": lambda sample, score=score: score(champion, labels, sample),
                "challenger": lambda sample, score=score: score(challenger, labels, sample),
                "difference": difference,
            },
            rounds,
            rng,
        )
    return out


def _accuracy(scores: Scores, labels: np.ndarray, sample: np.ndarray) -> float:
    return float((scores.predictions[sample] == labels[sample]).mean())


def _auc(scores: Scores, labels: np.ndarray, sample: np.ndarray) -> float | None:
    return rank_auc(scores.probabilities[sample], labels[sample])


@dataclass(frozen=True)
class GateCheck:
    """One rule of the gate: the two values, the rule in words, and whether it held."""

    name: str
    champion: float | None
    challenger: float | None
    rule: str
    passed: bool


def _not_worse(
    name: str,
    champion: float | None,
    challenger: float | None,
    tolerance: float,
    higher_is_better: bool = True,
) -> GateCheck:
    if champion is None or challenger is None:
        return GateCheck(name, champion, challenger, "undefined on this test set: not gated", True)
    if higher_is_better:
        rule, passed = f">= champion-{tolerance:g}", challenger >= champion - tolerance - 1e-12
    else:
        rule, passed = f"<= champion+{tolerance:g}", challenger <= champion + tolerance + 1e-12
    return GateCheck(name, champion, challenger, rule, bool(passed))


def gate_checks(champion: dict, challenger: dict, gate: PromotionGateConfig) -> list[GateCheck]:
    """The default gate over two ``evaluate.core_metrics`` dicts."""
    checks = [
        _not_worse(
            "accuracy", champion["accuracy"], challenger["accuracy"], gate.accuracy_tolerance
        ),
        _not_worse("roc_auc", champion["roc_auc"], challenger["roc_auc"], gate.roc_auc_tolerance),
    ]
    for name, values in champion["per_class"].items():
        theirs = challenger["per_class"].get(name, {}).get("recall")
        checks.append(_not_worse(f"recall.{name}", values["recall"], theirs, gate.recall_tolerance))
    checks.append(
        _not_worse(
            "ece", champion["ece"], challenger["ece"], gate.ece_tolerance, higher_is_better=False
        )
    )
    return checks


@dataclass(frozen=True)
class Comparison:
    """Challenger against champion on one test set: the gate's checks and the statistics."""

    champion: Scores
    challenger: Scores
    checks: list[GateCheck]
    mcnemar: dict
    bootstrap: dict
    new_to_champion: int | None = None  # test images not in the champion's own test split

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]

    def table_rows(self) -> list[dict[str, str]]:
        """Side-by-side rows (also the Prefect table artifact)."""
        rows = [_row(c, self.bootstrap.get(c.name)) for c in self.checks]
        m = self.mcnemar
        rows.append(
            {
                "metric": "McNemar p (exact)",
                "champion": str(m["only_champion_correct"]),
                "challenger": str(m["only_challenger_correct"]),
                "delta": f"{m['p_value']:.4f}",
                "95% CI delta": "",
                "rule": "reported: discordant pairs, p-value",
                "result": "info",
            }
        )
        if self.new_to_champion is not None:
            rows.append(
                {
                    "metric": "test images new to champion",
                    "champion": f"{self.new_to_champion} of {len(self.champion.labels)}",
                    "challenger": "",
                    "delta": "",
                    "95% CI delta": "",
                    "rule": "reported: never in the champion's own test split",
                    "result": "info",
                }
            )
        return rows

    def audit_summary(self) -> dict:
        """A compact record of the decision for the audit history (kept under 5000 characters)."""
        return {
            "passed": self.passed,
            "failed": self.failed,
            "n": int(len(self.champion.labels)),
            "mcnemar_p": round(self.mcnemar["p_value"], 6),
            "values": {c.name: [_round(c.champion), _round(c.challenger)] for c in self.checks},
            "ci95_difference": {k: v["difference"] for k, v in self.bootstrap.items()},
            "new_to_champion": self.new_to_champion,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_ci(interval: list[float] | None) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def _row(check: GateCheck, ci: dict | None) -> dict[str, str]:
    delta = (
        None
        if check.champion is None or check.challenger is None
        else check.challenger - check.champion
    )
    ci = ci or {}
    diff = ci.get("difference")
    return {
        "metric": check.name,
        "champion": _fmt(check.champion) + _fmt_ci(ci.get("champion")),
        "challenger": _fmt(check.challenger) + _fmt_ci(ci.get("challenger")),
        "delta": "n/a" if delta is None else f"{delta:+.4f}",
        "95% CI delta": f"[{diff[0]:+.4f}, {diff[1]:+.4f}]" if diff else "",
        "rule": check.rule,
        "result": "pass" if check.passed else "FAIL",
    }


def compare(
    champion: Scores,
    challenger: Scores,
    gate: PromotionGateConfig,
    new_to_champion: int | None = None,
) -> Comparison:
    """Gate the challenger against the champion; both must have scored the same test set.

    ``new_to_champion`` (how many test images the champion was never scored on) is reported.
    """
    if champion.classes != challenger.classes:
        raise PromotionError(
            f"v{champion.version} and v{challenger.version} predict different "
            f"classes ({champion.classes} vs {challenger.classes})"
        )
    return Comparison(
        champion,
        challenger,
        gate_checks(champion.metrics, challenger.metrics, gate),
        mcnemar(
            champion.predictions == champion.labels, challenger.predictions == challenger.labels
        ),
        paired_bootstrap(champion, challenger, gate.bootstrap) if gate.bootstrap else {},
        new_to_champion,
    )
