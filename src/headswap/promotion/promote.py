"""Promote, roll back, and the first champion: the only code that moves ``@champion``.

``promote_version`` re-scores the challenger and the champion on the workspace's test split
(``scoring``; each image once per model: ``score_cache``), checks that the comparison is fair
(``fairness``) and gates the challenger (``statistics``). Only a passing gate moves the
``champion`` alias, unless a person overrides it (``force``, with a reason; audited).
Everything from reading the champion to writing the audit entry happens under the promotion
lock (``lock``), and every move is recorded (``audit``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from headswap.config import RegistryConfig, SplitConfig
from headswap.errors import PromotionError, RegistryError
from headswap.io import markdown_table
from headswap.promotion.audit import (
    INITIAL,
    PROMOTED,
    REFUSED,
    ROLLED_BACK,
    append_audit,
    audit_entry,
    champion_stack,
    out_of_band_champion,
    read_history,
)
from headswap.promotion.fairness import SplitReview, review_split
from headswap.promotion.lock import HeldLock, promotion_lock
from headswap.promotion.scoring import (
    PromotionFiles,
    ScoringTally,
    TestSet,
    load_test_set,
    score_version,
)
from headswap.promotion.statistics import Comparison, compare
from headswap.tracking import (
    CHALLENGER,
    CHAMPION,
    alias_version,
    client,
    tracking_call,
    tracking_error,
    unreachable_reason,
)


@dataclass
class PromotionOutcome:
    """What ``promote_version`` decided; ``entry`` is the audit entry ({} when nothing to do)."""

    promoted: bool
    message: str
    entry: dict = field(default_factory=dict)
    comparison: Comparison | None = None
    note: str = ""  # e.g. the champion gated against was moved outside headswap
    # role ("champion", "challenger") -> how its test scores were obtained; {} when not scored
    scoring: dict[str, ScoringTally] = field(default_factory=dict)

    def scoring_lines(self) -> list[str]:
        """One line per model: images scored now and images whose scores came from the cache."""
        return [tally.line(role) for role, tally in self.scoring.items()]

    def summary(self) -> str:
        return "\n".join([*self.scoring_lines(), *([self.note] if self.note else []), self.message])

    def markdown(self) -> str:
        """The decision and the side-by-side table, for a Prefect artifact."""
        lines = [f"**{'PROMOTED' if self.promoted else 'NOT PROMOTED'}**: {self.message}", ""]
        lines += [f"Note: {self.note}", ""] if self.note else []
        lines += [f"- {line}" for line in self.scoring_lines()] + [""] if self.scoring else []
        if self.comparison is not None:
            rows = self.comparison.table_rows()
            lines.append(markdown_table(list(rows[0]), [list(row.values()) for row in rows]))
        return "\n".join(lines)


def _require_reason(force: bool, allow_split_conflict: bool, reason: str) -> None:
    flags = [
        name
        for name, on in (("--force", force), ("--allow-split-conflict", allow_split_conflict))
        if on
    ]
    if flags and not reason.strip():
        raise PromotionError(
            f"{' and '.join(flags)}: also pass --reason TEXT saying why; every override is "
            "recorded in the audit history"
        )


def promote_version(
    registry: RegistryConfig,
    files: PromotionFiles,
    version: int | None = None,
    force: bool = False,
    reason: str = "",
    *,
    split: SplitConfig,
    allow_split_conflict: bool = False,
) -> PromotionOutcome:
    """Gate ``version`` (default: the challenger) against the champion; move the alias if it passes.

    The champion gated against is the one ``@champion`` names now, read under the lock, even if
    it was moved by hand outside headswap (the outcome's ``note`` says so).

    Args:
        registry: the model and the gate's tolerances.
        files: the workspace manifest and images both versions are scored on.
        version: the version to promote; default the one with the ``challenger`` alias.
        force: promote even if gate rules fail (needs ``reason``; audited as an override).
        reason: why, for the audit history.
        split: the workspace's split settings (``data.split``), checked against each version's.
        allow_split_conflict: compare even though the test split is not fair to a version
            (needs ``reason``; audited as an override).

    Raises:
        PromotionError: nothing to promote, an override without a reason, the lock stayed busy,
            or the lock was lost before the promotion's writes (nothing moved then).
    """
    _require_reason(force, allow_split_conflict, reason)
    mlflow_client, name = client(), registry.model_name
    test_set = load_test_set(files)
    with promotion_lock(mlflow_client, registry) as held:
        champion = alias_version(mlflow_client, name, CHAMPION)
        challenger = (
            str(version) if version is not None else alias_version(mlflow_client, name, CHALLENGER)
        )
        if challenger is None:
            raise PromotionError(f"{name} has no @{CHALLENGER} version; pass --version N")
        _require_version(mlflow_client, name, challenger)
        if champion == challenger:
            return PromotionOutcome(False, f"v{challenger} is already the champion: nothing to do")
        if champion is None:
            return _first_champion(held, name, challenger, reason)
        note = _out_of_band_note(mlflow_client, name)
        review = review_split(mlflow_client, name, champion, challenger, test_set, split)
        if review.conflicts and not allow_split_conflict:
            outcome = _refuse_split(held, name, champion, challenger, reason, review)
        else:
            overrides = Overrides(force, review.conflicts)
            outcome = _gate_and_move(
                held, registry, champion, challenger, test_set, overrides, reason, review
            )
        outcome.note = note
        return outcome


def _first_champion(held: HeldLock, name: str, challenger: str, reason: str) -> PromotionOutcome:
    """No champion yet: the challenger becomes the first one, audited as such (not gated)."""
    record = audit_entry(
        "promote", INITIAL, None, challenger, reason or "no champion yet: nothing to gate against"
    )
    entry = move_and_record(held, name, None, challenger, record)
    return PromotionOutcome(
        True,
        f"no champion yet: v{challenger} becomes the first champion, nothing to gate against",
        entry,
    )


def _out_of_band_note(mlflow_client, name: str) -> str:
    """A line when the champion about to be gated against was moved outside headswap."""
    found = out_of_band_champion(mlflow_client, name)
    if found is None:
        return ""
    return (
        f"@champion v{found.current} was set outside headswap (no audited move made it "
        "champion); the challenger is gated against it as it is now"
    )


def _require_version(mlflow_client, name: str, version: str) -> None:
    try:
        mlflow_client.get_model_version(name, version)
    except Exception as error:  # noqa: BLE001 - RestException / MlflowException
        if unreachable_reason(error) is not None:
            raise tracking_error(error, f"reading {name} v{version}") from None
        raise PromotionError(f"{name} has no version {version}") from None


def _refuse_split(
    held: HeldLock, name: str, champion: str, challenger: str, reason: str, review: SplitReview
) -> PromotionOutcome:
    problem = "; ".join(review.conflicts)
    record = audit_entry(
        "promote",
        REFUSED,
        champion,
        challenger,
        reason,
        refusal=f"split conflict: {problem}"[:1000],
        forced=False,
    )
    entry = append_audit(held.client, name, record, held)
    return PromotionOutcome(
        False,
        f"refused: split conflict: {problem}. Pass --allow-split-conflict --reason TEXT to "
        "compare anyway (the override is recorded).",
        entry,
    )


@dataclass(frozen=True)
class Overrides:
    """What a person allowed: a failing gate (``force``) and the split conflicts found."""

    force: bool
    split_conflicts: list[str]

    def taken(self, gate_passed: bool) -> list[str]:
        """The rules the decision overrides: ``split`` and/or ``gate``."""
        return (["split"] if self.split_conflicts else []) + (
            ["gate"] if self.force and not gate_passed else []
        )


def _gate_and_move(
    held: HeldLock,
    registry: RegistryConfig,
    champion: str,
    challenger: str,
    test_set: TestSet,
    overrides: Overrides,
    reason: str,
    review: SplitReview,
) -> PromotionOutcome:
    name = registry.model_name
    # One after the other: each model's session is gone before the next model is downloaded.
    champion_scores, champion_tally = score_version(name, champion, test_set)
    challenger_scores, challenger_tally = score_version(name, challenger, test_set)
    comparison = compare(champion_scores, challenger_scores, registry.gate, review.new_to_champion)
    taken = overrides.taken(comparison.passed)
    promoted = comparison.passed or overrides.force
    record = audit_entry(
        "promote",
        PROMOTED if promoted else REFUSED,
        champion,
        challenger,
        reason,
        forced=bool(taken),
        override="+".join(taken) or None,
        failed_rules=comparison.failed,
        split_conflicts=[c[:300] for c in overrides.split_conflicts[:5]],
        gate=comparison.audit_summary(),
        test_fingerprint=test_set.fingerprint,
    )
    if promoted:
        entry = move_and_record(held, name, champion, challenger, record)
    else:
        entry = append_audit(held.client, name, record, held)
    return PromotionOutcome(
        promoted,
        _decision(champion, challenger, comparison, taken),
        entry,
        comparison,
        scoring={"champion": champion_tally, "challenger": challenger_tally},
    )


def _decision(champion: str, challenger: str, comparison: Comparison, taken: list[str]) -> str:
    failed = ", ".join(comparison.failed)
    override = f" (override: {'+'.join(taken)})" if taken else ""
    if comparison.passed:
        return f"v{challenger} promoted to champion (was v{champion}){override}"
    if "gate" in taken:
        return (
            f"v{challenger} promoted to champion (was v{champion}) by override although it is "
            f"worse on {failed}{override}"
        )
    return (
        f"refused: v{challenger} is worse than champion v{champion} on {failed}; "
        "--force --reason TEXT promotes it anyway (the override is recorded)"
    )


def rollback(registry: RegistryConfig, reason: str = "") -> dict:
    """Move ``champion`` back to the previous champion; returns the audit entry.

    Raises:
        PromotionError: there is no earlier champion in the history, or the lock was lost.
    """
    mlflow_client, name = client(), registry.model_name
    with promotion_lock(mlflow_client, registry) as held:
        current = alias_version(mlflow_client, name, CHAMPION)
        stack = champion_stack(read_history(mlflow_client, name), current)
        if len(stack) < 2:
            raise PromotionError(
                f"{name} has no previous champion to roll back to "
                f"(current: v{current}); `headswap history` shows the moves"
            )
        target = stack[-2]
        _require_version(mlflow_client, name, target)
        record = audit_entry("rollback", ROLLED_BACK, current, target, reason or "rollback")
        return move_and_record(held, name, current, target, record)


# --- moving the alias ----------------------------------------------------------------------


def _set_champion(mlflow_client, name: str, version: str | None) -> None:
    if version is None:
        mlflow_client.delete_registered_model_alias(name, CHAMPION)
        return
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    # Read back: the alias is the single source of truth, so the audit must match it.
    if alias_version(mlflow_client, name, CHAMPION) != version:
        raise RegistryError(f"moved {name}@{CHAMPION} to v{version}, but it reads back otherwise")


def move_and_record(held: HeldLock, name: str, old: str | None, new: str, record: dict) -> dict:
    """Move the alias and append its audit entry, both fenced by the lock.

    If the lock turns out lost after the move, or the entry cannot be written, the move is
    undone (when the alias still names ``new``: a promotion that took the lock since may have
    moved it again), so the registry never shows a champion the history does not explain.
    """
    mlflow_client = held.client
    held.require(f"to move {name}@{CHAMPION} to v{new}")
    tracking_call(lambda: _set_champion(mlflow_client, name, new), f"moving {name}@{CHAMPION}")
    try:
        held.require(f"to record the move to v{new}")
        return append_audit(mlflow_client, name, record, held)
    except Exception:
        with contextlib.suppress(Exception):
            if alias_version(mlflow_client, name, CHAMPION) == new:
                _set_champion(mlflow_client, name, old)
        raise


def record_initial_champion(mlflow_client, registry: RegistryConfig, version: str) -> bool:
    """Make ``version`` champion if the model has none yet (its first version); audited."""
    name = registry.model_name
    with promotion_lock(mlflow_client, registry) as held:
        if alias_version(mlflow_client, name, CHAMPION):
            return False
        record = audit_entry("register", INITIAL, None, version, "first version of the model")
        move_and_record(held, name, None, version, record)
        return True
