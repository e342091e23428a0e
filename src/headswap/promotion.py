"""Champion/challenger promotion: a statistical gate, an audit history and rollback, in MLflow.

``promote_version`` downloads the challenger and the champion ONNX models from the registry and
re-scores both with ONNX Runtime on the workspace's test split (the manifest's ``test`` rows); it
never trusts stored numbers. The gate passes when the challenger is not worse than the champion
beyond ``registry.gate`` tolerances on accuracy, ROC-AUC, every class's recall and ECE; McNemar's
exact test and paired bootstrap intervals are reported beside it. Only a passing gate moves the
``champion`` alias, unless a person overrides it (``force``, with a reason; audited).

Fairness after growth. An image's split depends only on its content and the split settings, so
the test split only grows as images arrive. Comparing two versions on today's test split is fair
when none of today's test images was in either version's train or val split; each version's
manifest (its run artifact ``data/manifest.csv``) says which images those were. ``split_conflicts``
checks that, and the split settings, labels and class lists; a conflict refuses the comparison
unless a person allows it (``allow_split_conflict``, with a reason; audited).

Every decision (promoted, refused, rolled back, first champion) is appended to an audit history
kept as registered-model tags ``headswap.audit.<seq>`` (JSON), visible in the MLflow UI.

Concurrency. Reading the champion, scoring, moving the alias and appending the audit entry happen
inside one critical section guarded by a lock that lives in MLflow itself, so it holds across
machines that share a tracking server: the lock is a registered model named
``<model>.promotion-lock``. Creating a registered model is atomic in every MLflow backend (a
unique name constraint; the second create fails with RESOURCE_ALREADY_EXISTS), and deleting it
releases the lock. A second promotion therefore waits (``registry.lock_wait_s``), then re-reads the
champion and compares against *that*, so two promotions can never both compare against the same
old champion (no lost update), and audit sequence numbers are unique. A lock whose holder died is
broken after ``registry.lock_stale_s``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from headswap.config import PromotionGateConfig, RegistryConfig, SplitConfig
from headswap.errors import HeadswapError, RegistryError
from headswap.registry import (
    CHALLENGER,
    CHAMPION,
    SPLIT_TAGS,
    alias_version,
    content_column,
    split_tags,
    test_fingerprint,
    tracking_uri,
)

AUDIT_PREFIX = "headswap.audit."
LOCK_SUFFIX = ".promotion-lock"
MAX_TAG_CHARS = (
    5000  # registered-model tag values are a 5000-character column in MLflow's SQL stores
)
TRAINING_SPLITS = ("train", "val")  # what a model has learned from (val: calibration, stopping)
PROMOTED, REFUSED, ROLLED_BACK, INITIAL = "promoted", "refused", "rolled_back", "initial"
MOVES = (PROMOTED, ROLLED_BACK, INITIAL)


class PromotionError(HeadswapError):
    """A promotion or rollback cannot be carried out (nothing to promote, nothing to roll back)."""


class PromotionLockedError(PromotionError):
    """Another promotion holds the lock for longer than ``registry.lock_wait_s``."""


@dataclass(frozen=True)
class PromotionFiles:
    """The workspace files whose test split both models are re-scored on."""

    manifest: Path = Path("data/prepared/manifest.csv")
    raw_dir: Path = Path("data/raw")


# --- scoring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestSet:
    """The workspace's test images, and every manifest row (to check the split against)."""

    files: list[Path]
    labels: list[str]
    fingerprint: str
    rows: list[dict] = field(default_factory=list)


def load_test_set(files: PromotionFiles) -> TestSet:
    """The manifest's test rows, their fingerprint, and all rows of the manifest."""
    from headswap.data import read_manifest

    if not files.manifest.is_file():
        raise PromotionError(
            f"{files.manifest} not found: promotion re-scores both models on the "
            "workspace's test split; run `dvc repro prepare` first"
        )
    rows = read_manifest(files.manifest)
    test = [row for row in rows if row["split"] == "test"]
    if not test:
        raise PromotionError(f"{files.manifest} has no test rows to compare the models on")
    return TestSet(
        [files.raw_dir / r["path"] for r in test],
        [r["label"] for r in test],
        test_fingerprint(rows),
        rows,
    )


@dataclass(frozen=True)
class Scores:
    """One model's predictions on the test set and the metrics computed from them."""

    version: str
    classes: list[str]
    labels: np.ndarray
    probabilities: np.ndarray
    predictions: np.ndarray
    metrics: dict


def score_model(model_path: Path, version: str, test_set: TestSet, batch_size: int = 32) -> Scores:
    """Run the ONNX model over the test images (decoded as the features stage decodes them)."""
    from headswap.evaluate import core_metrics
    from headswap.predict import OnnxClassifier

    model = OnnxClassifier.load(model_path)
    unknown = sorted(set(test_set.labels) - set(model.classes))
    if unknown:
        raise PromotionError(
            f"version {version} does not know the test labels {unknown} "
            f"(its classes: {model.classes})"
        )
    labels = np.array([model.classes.index(label) for label in test_set.labels])
    outputs = [
        model.run(np.stack([model.load_pixels(p) for p in test_set.files[i : i + batch_size]]))
        for i in range(0, len(test_set.files), batch_size)
    ]
    probabilities = np.concatenate([o[0] for o in outputs])
    predictions = np.concatenate([o[1] for o in outputs])
    metrics = core_metrics(probabilities, labels, predictions, model.classes)
    return Scores(version, model.classes, labels, probabilities, predictions, metrics)


def score_version(name: str, version: str, test_set: TestSet) -> Scores:
    """Download ``models:/<name>/<version>`` from the registry and score it."""
    from headswap.predict import download_model

    with tempfile.TemporaryDirectory(prefix="headswap-promote-") as tmp:
        return score_model(
            download_model(f"models:/{name}/{version}", Path(tmp)), version, test_set
        )


# --- statistics and the gate ---------------------------------------------------------------


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


def _interval(values: list[float]) -> list[float] | None:
    return (
        [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None
    )


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
    labels = champion.labels
    out: dict[str, dict] = {}
    for metric in ("accuracy", "roc_auc"):
        series: dict[str, list[float]] = {"champion": [], "challenger": [], "difference": []}
        for _ in range(rounds):
            idx = rng.integers(0, len(labels), len(labels))
            if metric == "accuracy":
                a = float((champion.predictions[idx] == labels[idx]).mean())
                b = float((challenger.predictions[idx] == labels[idx]).mean())
            else:
                a, b = (
                    rank_auc(champion.probabilities[idx], labels[idx]),
                    rank_auc(challenger.probabilities[idx], labels[idx]),
                )
                if a is None or b is None:
                    continue
            series["champion"].append(a)
            series["challenger"].append(b)
            series["difference"].append(b - a)
        out[metric] = {key: _interval(values) for key, values in series.items()}
    return out


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


# --- is the comparison fair? ---------------------------------------------------------------


def split_conflicts(
    version: str,
    manifest: list[dict] | None,
    tags: dict[str, str],
    current_rows: list[dict],
    current_split: dict[str, str],
) -> list[str]:
    """Why scoring ``version`` on the workspace's test split would not be fair; [] if it is.

    Args:
        version: the version's number, for the messages.
        manifest: the rows the version was trained on (its ``data/manifest.csv``), or None.
        tags: the version's tags (``split_*`` as ``registry.split_tags`` writes them).
        current_rows: the workspace's manifest rows.
        current_split: ``registry.split_tags`` of the workspace's split settings.
    """
    if manifest is None:
        return [f"v{version} has no recorded split (registered before split records)"]
    conflicts = [
        f"v{version} was split with {key}={tags.get(key, 'unrecorded')}, the workspace with "
        f"{key}={current_split[key]}"
        for key in SPLIT_TAGS
        if tags.get(key) != current_split[key]
    ]
    key = content_column(manifest, current_rows)
    theirs = {row[key]: row for row in manifest}
    test = [row for row in current_rows if row["split"] == "test"]
    learned = [r for r in test if theirs.get(r[key], {}).get("split") in TRAINING_SPLITS]
    if learned:
        conflicts.append(
            f"{len(learned)} current test image(s) were in v{version}'s train/val split "
            f"(e.g. {learned[0]['path']})"
        )
    relabelled = [
        r for r in current_rows if r[key] in theirs and theirs[r[key]]["label"] != r["label"]
    ]
    if relabelled:
        first = relabelled[0]
        conflicts.append(
            f"{len(relabelled)} image(s) have another label than in v{version}'s data (e.g. "
            f"{first['path']}: {theirs[first[key]]['label']} -> {first['label']})"
        )
    return conflicts


def class_conflict(champion: tuple[str, dict], challenger: tuple[str, dict]) -> list[str]:
    """A conflict when the two (version, tags) record different class lists; [] otherwise."""
    (old, old_tags), (new, new_tags) = champion, challenger
    old_classes, new_classes = old_tags.get("classes"), new_tags.get("classes")
    if old_classes and new_classes and json.loads(old_classes) != json.loads(new_classes):
        return [f"v{old} predicts {old_classes}, v{new} predicts {new_classes}"]
    return []


def new_test_images(manifest: list[dict] | None, current_rows: list[dict]) -> int | None:
    """How many of the workspace's test images are not in ``manifest``'s test split."""
    if manifest is None:
        return None
    key = content_column(manifest, current_rows)
    seen = {row[key] for row in manifest if row["split"] == "test"}
    return sum(1 for row in current_rows if row["split"] == "test" and row[key] not in seen)


# --- the lock and the audit history --------------------------------------------------------


def client():
    """An MlflowClient on the project's tracking URI (``MLFLOW_TRACKING_URI`` or embedded)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


def current_user() -> str:
    return os.environ.get("HEADSWAP_USER") or getpass.getuser()


def _already_exists(error: Exception) -> bool:
    return (
        getattr(error, "error_code", "") == "RESOURCE_ALREADY_EXISTS"
        or "already exists" in str(error).lower()
    )


def _try_lock(mlflow_client, lock: str, token: str) -> bool:
    """One atomic attempt: create the lock model; False if someone else holds it."""
    try:
        mlflow_client.create_registered_model(
            lock,
            tags={
                "token": token,
                "holder": f"{current_user()}@{socket.gethostname()}",
                "acquired": str(time.time()),
            },
            description="Held while a headswap promotion runs; deleted when it ends.",
        )
        return True
    except Exception as error:  # noqa: BLE001 - MLflow raises many types
        if _already_exists(error) or "locked" in str(error).lower():
            return False  # held, or sqlite busy with a concurrent writer: wait and retry
        raise RegistryError(
            f"cannot take the promotion lock {lock} at {tracking_uri()}: {error}"
        ) from None


def _holder(mlflow_client, lock: str) -> dict[str, str]:
    try:
        return dict(mlflow_client.get_registered_model(lock).tags)
    except Exception:  # noqa: BLE001 - released between our create and this read
        return {}


def _break_if_stale(mlflow_client, lock: str, stale_s: float) -> None:
    holder = _holder(mlflow_client, lock)
    stale = bool(holder) and time.time() - float(holder.get("acquired", "inf")) > stale_s
    # Re-read just before deleting so we only ever delete the stale holder's lock.
    if stale and _holder(mlflow_client, lock).get("token") == holder.get("token"):
        with contextlib.suppress(Exception):
            mlflow_client.delete_registered_model(lock)


@contextlib.contextmanager
def promotion_lock(mlflow_client, registry: RegistryConfig) -> Iterator[str]:
    """Hold ``<model>.promotion-lock`` for the block; wait up to ``registry.lock_wait_s``."""
    lock, token = f"{registry.model_name}{LOCK_SUFFIX}", uuid.uuid4().hex
    deadline = time.monotonic() + registry.lock_wait_s
    while not _try_lock(mlflow_client, lock, token):
        _break_if_stale(mlflow_client, lock, registry.lock_stale_s)
        if time.monotonic() > deadline:
            holder = _holder(mlflow_client, lock)
            raise PromotionLockedError(
                f"another promotion of {registry.model_name} ({holder.get('holder', 'unknown')}) "
                f"holds the lock {lock}; waited {registry.lock_wait_s:g}s. Try again when it "
                f"ends (a lock older than registry.lock_stale_s={registry.lock_stale_s:g}s is "
                "broken automatically)."
            )
        time.sleep(0.2 + random.random() * 0.5)
    try:
        yield token
    finally:
        # Only release our own lock: had ours been broken as stale, the lock is someone else's.
        if _holder(mlflow_client, lock).get("token") == token:
            with contextlib.suppress(Exception):
                mlflow_client.delete_registered_model(lock)


def read_history(mlflow_client, name: str) -> list[dict]:
    """Every audit entry of model ``name``, oldest first."""
    from headswap.registry import with_retries

    model = with_retries(lambda: mlflow_client.get_registered_model(name), "reading the model")
    entries = [
        json.loads(value) for key, value in model.tags.items() if key.startswith(AUDIT_PREFIX)
    ]
    return sorted(entries, key=lambda entry: entry["seq"])


def append_audit(mlflow_client, name: str, entry: dict) -> dict:
    """Add ``entry`` with the next sequence number; call only while holding the lock."""
    history = read_history(mlflow_client, name)
    entry = {"seq": (history[-1]["seq"] + 1) if history else 1, **entry}
    text = json.dumps(entry, separators=(",", ":"))
    if len(text) > MAX_TAG_CHARS and entry.get("gate"):
        # Many classes: keep the verdict and the failed checks, drop the per-check values.
        entry["gate"] = {k: v for k, v in entry["gate"].items() if k != "values"}
        text = json.dumps(entry, separators=(",", ":"))
    mlflow_client.set_registered_model_tag(name, f"{AUDIT_PREFIX}{entry['seq']:06d}", text)
    return entry


def _entry(
    action: str, outcome: str, old: str | None, new: str | None, reason: str, **extra
) -> dict:
    return {
        "action": action,
        "outcome": outcome,
        "old_version": old,
        "new_version": new,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "user": current_user(),
        "reason": reason,
        **extra,
    }


def _move_champion(mlflow_client, name: str, version: str) -> None:
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    # Read back: the alias is the single source of truth, so the audit must match it.
    if alias_version(mlflow_client, name, CHAMPION) != version:
        raise RegistryError(f"moved {name}@{CHAMPION} to v{version}, but it reads back otherwise")


def _move_and_record(mlflow_client, name: str, old: str, new: str, record: dict) -> dict:
    """Move the alias and append its audit entry; undo the move if the entry cannot be written,
    so the registry never shows a champion that the history does not explain."""
    from headswap.registry import with_retries

    _move_champion(mlflow_client, name, new)
    try:
        return with_retries(lambda: append_audit(mlflow_client, name, record), "writing the audit")
    except Exception:
        with contextlib.suppress(Exception):
            mlflow_client.set_registered_model_alias(name, CHAMPION, old)
        raise


def record_initial_champion(mlflow_client, registry: RegistryConfig, version: str) -> bool:
    """Make ``version`` champion if the model has none yet (its first version); audited."""
    name = registry.model_name
    with promotion_lock(mlflow_client, registry):
        if alias_version(mlflow_client, name, CHAMPION):
            return False
        _move_champion(mlflow_client, name, version)
        append_audit(
            mlflow_client,
            name,
            _entry("register", INITIAL, None, version, "first version of the model"),
        )
        return True


# --- promote and rollback ------------------------------------------------------------------


@dataclass
class PromotionOutcome:
    """What ``promote_version`` decided; ``entry`` is the audit entry ({} when nothing to do)."""

    promoted: bool
    message: str
    entry: dict = field(default_factory=dict)
    comparison: Comparison | None = None

    def summary(self) -> str:
        return self.message

    def markdown(self) -> str:
        """The decision and the side-by-side table, for a Prefect artifact."""
        lines = [f"**{'PROMOTED' if self.promoted else 'NOT PROMOTED'}**: {self.message}", ""]
        if self.comparison is not None:
            rows = self.comparison.table_rows()
            lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(row.values()) + " |" for row in rows]
        return "\n".join(lines)


@dataclass(frozen=True)
class SplitReview:
    """Whether champion and challenger can be compared fairly on the workspace's test split."""

    conflicts: list[str]
    new_to_champion: int | None


def _recorded_split(mlflow_client, name: str, version: str) -> tuple[dict, list[dict] | None]:
    """A version's tags and the manifest it was trained on (None if it recorded none)."""
    from headswap.registry import version_manifest, with_retries

    tags = with_retries(
        lambda: mlflow_client.get_model_version(name, version).tags, "reading the version"
    )
    manifest = with_retries(
        lambda: version_manifest(mlflow_client, name, version), "reading its data/manifest.csv"
    )
    return dict(tags), manifest


def review_split(
    mlflow_client, name: str, champion: str, challenger: str, test_set: TestSet, split: SplitConfig
) -> SplitReview:
    """Check both versions' recorded splits against the workspace's test split."""
    current = split_tags(split)
    recorded = {v: _recorded_split(mlflow_client, name, v) for v in (champion, challenger)}
    conflicts = [
        conflict
        for version, (tags, manifest) in recorded.items()
        for conflict in split_conflicts(version, manifest, tags, test_set.rows, current)
    ]
    conflicts += class_conflict(
        (champion, recorded[champion][0]), (challenger, recorded[challenger][0])
    )
    return SplitReview(conflicts, new_test_images(recorded[champion][1], test_set.rows))


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
        PromotionError: nothing to promote, an override without a reason, or the lock stayed busy.
    """
    _require_reason(force, allow_split_conflict, reason)
    mlflow_client, name = client(), registry.model_name
    test_set = load_test_set(files)
    with promotion_lock(mlflow_client, registry):
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
            _move_champion(mlflow_client, name, challenger)
            entry = append_audit(
                mlflow_client,
                name,
                _entry(
                    "promote",
                    PROMOTED,
                    None,
                    challenger,
                    reason or "no champion to compare against",
                ),
            )
            return PromotionOutcome(True, f"v{challenger} is champion (there was none)", entry)
        review = review_split(mlflow_client, name, champion, challenger, test_set, split)
        if review.conflicts and not allow_split_conflict:
            return _refuse_split(mlflow_client, name, champion, challenger, reason, review)
        overrides = Overrides(force, review.conflicts)
        return _gate_and_move(
            mlflow_client, registry, champion, challenger, test_set, overrides, reason, review
        )


def _require_version(mlflow_client, name: str, version: str) -> None:
    try:
        mlflow_client.get_model_version(name, version)
    except Exception:  # noqa: BLE001 - RestException / MlflowException
        raise PromotionError(f"{name} has no version {version}") from None


def _refuse_split(
    mlflow_client, name: str, champion: str, challenger: str, reason: str, review: SplitReview
) -> PromotionOutcome:
    problem = "; ".join(review.conflicts)
    entry = append_audit(
        mlflow_client,
        name,
        _entry(
            "promote",
            REFUSED,
            champion,
            challenger,
            reason,
            refusal=f"split conflict: {problem}"[:1000],
            forced=False,
        ),
    )
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
    mlflow_client,
    registry: RegistryConfig,
    champion: str,
    challenger: str,
    test_set: TestSet,
    overrides: Overrides,
    reason: str,
    review: SplitReview,
) -> PromotionOutcome:
    name = registry.model_name
    comparison = compare(
        score_version(name, champion, test_set),
        score_version(name, challenger, test_set),
        registry.gate,
        review.new_to_champion,
    )
    taken = overrides.taken(comparison.passed)
    promoted = comparison.passed or overrides.force
    record = _entry(
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
        entry = _move_and_record(mlflow_client, name, champion, challenger, record)
    else:
        entry = append_audit(mlflow_client, name, record)
    return PromotionOutcome(
        promoted, _decision(champion, challenger, comparison, taken), entry, comparison
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


def champion_stack(history: list[dict], current: str | None) -> list[str]:
    """The champions in order, replaying moves: promotions push, rollbacks pop.

    A champion set outside headswap (e.g. by moving the alias in the MLflow UI) is pushed too,
    so a rollback returns to the last champion headswap knew about.
    """
    stack: list[str] = []
    for entry in history:
        if entry["outcome"] in (PROMOTED, INITIAL):
            if not stack and entry.get("old_version"):
                stack.append(entry["old_version"])
            stack.append(entry["new_version"])
        elif entry["outcome"] == ROLLED_BACK and stack:
            stack.pop()
    if current and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def rollback(registry: RegistryConfig, reason: str = "") -> dict:
    """Move ``champion`` back to the previous champion; returns the audit entry.

    Raises:
        PromotionError: there is no earlier champion in the history.
    """
    mlflow_client, name = client(), registry.model_name
    with promotion_lock(mlflow_client, registry):
        current = alias_version(mlflow_client, name, CHAMPION)
        stack = champion_stack(read_history(mlflow_client, name), current)
        if len(stack) < 2:
            raise PromotionError(
                f"{name} has no previous champion to roll back to "
                f"(current: v{current}); `headswap history` shows the moves"
            )
        target = stack[-2]
        _require_version(mlflow_client, name, target)
        record = _entry("rollback", ROLLED_BACK, current, target, reason or "rollback")
        return _move_and_record(mlflow_client, name, current, target, record)


def history(registry: RegistryConfig) -> list[dict]:
    """The audit history of ``registry.model_name``, oldest first."""
    return read_history(client(), registry.model_name)
