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
kept as registered-model tags ``headswap.audit.<seq>`` (JSON), visible in the MLflow UI. A
champion moved outside headswap (the MLflow UI's alias pencil) is recognised: ``audit_view``
shows such moves between audited ones, and ``promote`` gates against the champion as it is now.

Concurrency. Reading the champion, scoring, moving the alias and appending the audit entry happen
inside one critical section guarded by a lock that lives in MLflow itself, so it holds across
machines that share a tracking server: the lock is a registered model named
``<model>.promotion-lock``, created atomically (a unique name: the second create fails with
RESOURCE_ALREADY_EXISTS). A second promotion waits (``registry.lock_wait_s``), then re-reads the
champion and compares against *that*, so two promotions never both compare against the same old
champion. The holder renews a heartbeat on the lock while it scores; a waiter breaks the lock
only after its heartbeat stopped for ``registry.lock_stale_s``, however long the promotion runs.
Breaking is a compare-and-delete (``remove_lock``), and every write a promotion makes is fenced
by its lock's token (``HeldLock.require``), so a promoter whose lock was broken moves nothing.
Audit sequence numbers are claimed by creating ``<model>.audit-seq.<seq>`` (``claim_seq``), so
they are unique even between writers the lock failed to keep apart.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import random
import socket
import sys
import tempfile
import threading
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
    tracking_call,
    tracking_error,
    tracking_uri,
    unreachable_reason,
)

AUDIT_PREFIX = "headswap.audit."
LOCK_SUFFIX = ".promotion-lock"
ASIDE_INFIX = ".removing-"  # <lock>.removing-<token>: where remove_lock moves a lock to look at it
SEQ_INFIX = ".audit-seq."  # <model>.audit-seq.<seq>: held while audit entry <seq> is written
SEQ_DESCRIPTION = "Claims one headswap audit sequence number while its entry is written."
MAX_SEQ_PROBES = 1000
HEARTBEAT_MAX_S = 10.0
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


# --- the lock -------------------------------------------------------------------------------
#
# MLflow has no compare-and-set, so the lock is built from the two atomic operations every store
# has: creating a registered model (a unique name) and renaming one (the row moves, or the call
# fails). The holder renews a heartbeat while it works; a waiter judges staleness from that
# heartbeat, not from anyone's start time; breaking moves the lock aside by rename and deletes it
# only if what moved is the lock judged stale. A holder that lost its lock anyway (it paused for
# longer than registry.lock_stale_s) is stopped by the fence: every write it makes is preceded by
# a check that the lock still holds its token, and an alias it moved is moved back if the lock
# turns out lost right after.


class PromotionLockLostError(PromotionError):
    """This promotion's lock was broken (it looked stale) before it could finish its writes."""


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


def _name_taken(error: Exception) -> bool:
    """True when creating a registered model failed because the name is (or just was) taken.

    MLflow's SQL store answers a duplicate name by reading the existing model; if its holder
    deleted it in between, that read fails with "not found": the name was taken a moment ago.
    sqlite may also be busy with another writer ("locked"). Either way: try again later.
    """
    from headswap.registry import _is_missing

    if unreachable_reason(error) is not None:
        return False
    return _already_exists(error) or _is_missing(error) or "locked" in str(error).lower()


def heartbeat_interval(stale_s: float) -> float:
    """How often a holder renews its lock: several beats fit in ``stale_s``, at most 10 s apart."""
    return max(0.2, min(HEARTBEAT_MAX_S, stale_s / 6))


@dataclass(frozen=True)
class LockState:
    """What the lock model says: whose it is and when its holder last renewed it.

    Attributes:
        token: the holder's unique id for this hold.
        beat: the heartbeat tag, rewritten by the holder every ``interval_s``.
        updated_ms: the store's own time of the lock's last update (its last heartbeat).
        interval_s: the holder's heartbeat interval (0 for a lock from before heartbeats).
    """

    token: str
    holder: str
    beat: str
    updated_ms: int
    interval_s: float


def read_lock(mlflow_client, lock: str) -> LockState | None:
    """The lock's state, or None when nobody holds it."""
    from headswap.registry import _is_missing

    try:
        model = mlflow_client.get_registered_model(lock)
    except Exception as error:  # noqa: BLE001 - RestException / MlflowException
        if _is_missing(error) and unreachable_reason(error) is None:
            return None
        raise tracking_error(error, f"reading the promotion lock {lock}") from None
    tags = dict(model.tags)
    return LockState(
        tags.get("token", ""),
        tags.get("holder", "unknown"),
        tags.get("heartbeat", ""),
        int(model.last_updated_timestamp or 0),
        float(tags.get("heartbeat_s") or 0),
    )


@dataclass
class StalenessWatch:
    """A waiter's view of someone else's lock: stale once its heartbeat has stopped.

    Stale when the waiter itself has watched the lock not change for ``stale_s`` (its own
    monotonic clock: no two clocks compared), or, sooner, when it has watched it not change for
    three of the holder's heartbeat intervals and the store's time of the last heartbeat is
    ``stale_s`` older than the waiter's clock (a lock left by a process long dead). A holder that
    is alive renews within one interval, so clock skew alone never makes its lock look stale.
    """

    stale_s: float
    seen: tuple | None = None
    since: float = 0.0

    def is_stale(self, state: LockState, wall_s: float, monotonic_s: float) -> bool:
        key = (state.token, state.beat, state.updated_ms)
        if key != self.seen:
            self.seen, self.since = key, monotonic_s
            return False
        watched = monotonic_s - self.since
        interval = state.interval_s or heartbeat_interval(self.stale_s)
        age = wall_s - state.updated_ms / 1000
        return watched >= self.stale_s or (watched >= 3 * interval and age >= self.stale_s)


def _try_lock(mlflow_client, lock: str, token: str, interval_s: float) -> bool:
    """One atomic attempt: create the lock model; False if someone else holds it."""
    try:
        mlflow_client.create_registered_model(
            lock,
            tags={
                "token": token,
                "holder": f"{current_user()}@{socket.gethostname()} pid {os.getpid()}",
                "acquired": datetime.now(UTC).isoformat(timespec="seconds"),
                "heartbeat": "0",
                "heartbeat_s": f"{interval_s:g}",
            },
            description="Held while a headswap promotion runs; deleted when it ends.",
        )
        return True
    except Exception as error:  # noqa: BLE001 - MLflow raises many types
        if _name_taken(error):
            return False  # held: wait, and watch its heartbeat
        raise tracking_error(error, f"taking the promotion lock {lock}") from None


def remove_lock(mlflow_client, lock: str, token: str, by: str) -> bool:
    """Compare-and-delete: remove the lock only if it holds ``token``; True if it did.

    The lock is renamed aside to a name only this caller uses (atomic: what is renamed is
    whatever holds the name at that instant), then what moved is read. It is deleted if it is
    the lock meant; otherwise (released and taken again meanwhile) it is renamed back, and if
    the name was taken yet again in between, its holder's fence stops it.
    """
    aside = f"{lock}{ASIDE_INFIX}{by}"
    try:
        mlflow_client.rename_registered_model(lock, aside)
    except Exception as error:  # noqa: BLE001 - released meanwhile: nothing to remove
        if unreachable_reason(error) is not None:
            raise tracking_error(error, f"removing the promotion lock {lock}") from None
        return False
    moved = read_lock(mlflow_client, aside)
    if moved is not None and moved.token == token:
        mlflow_client.delete_registered_model(aside)
        return True
    try:
        mlflow_client.rename_registered_model(aside, lock)
    except Exception:  # noqa: BLE001 - the name was taken again: that holder keeps it
        mlflow_client.delete_registered_model(aside)
    return False


class Heartbeat:
    """A thread that renews the lock every ``interval_s`` while its holder works.

    Each beat checks the token first, so it never renews a lock that is no longer ours, and
    records the loss (``lost``) for the fence. It rewrites the ``heartbeat`` tag and the lock's
    description; the latter makes the store stamp its own time on the lock.
    """

    def __init__(self, mlflow_client, lock: str, token: str, interval_s: float):
        self.client, self.lock, self.token, self.interval_s = mlflow_client, lock, token, interval_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat {lock}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _run(self) -> None:
        beat = 0
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                self.beat(beat)
            except Exception:  # noqa: BLE001, S112 - a missed beat; stale_s spans several
                continue
            if self.lost:
                return

    def beat(self, beat: int) -> None:
        """One renewal (or, if the lock is no longer ours, the note that it was lost)."""
        state = read_lock(self.client, self.lock)
        if state is None or state.token != self.token:
            self.lost = True
            return
        self.client.set_registered_model_tag(self.lock, "heartbeat", f"{beat} {time.time():.3f}")
        self.client.update_registered_model(
            self.lock, description=f"Held by a headswap promotion; heartbeat {beat}."
        )


@dataclass
class HeldLock:
    """The promotion lock while we hold it: the fence every write of the promotion goes through."""

    client: object
    lock: str
    token: str
    heartbeat: Heartbeat

    def require(self, doing: str) -> None:
        """Raise unless the lock still holds our token; call right before each write.

        Raises:
            PromotionLockLostError: the lock was broken (and perhaps taken by another promotion).
        """
        state = read_lock(self.client, self.lock)
        if self.heartbeat.lost or state is None or state.token != self.token:
            now = "nobody" if state is None else state.holder
            raise PromotionLockLostError(
                f"the promotion lock {self.lock} was broken while this promotion ran (it looked "
                f"stale: no heartbeat for registry.lock_stale_s; held now by {now}), so it did "
                f"not go on {doing}; nothing was moved by it. Run the command again."
            )


@contextlib.contextmanager
def promotion_lock(mlflow_client, registry: RegistryConfig) -> Iterator[HeldLock]:
    """Hold ``<model>.promotion-lock`` for the block, renewed by a heartbeat.

    Waits up to ``registry.lock_wait_s``; a lock whose heartbeat stopped for
    ``registry.lock_stale_s`` is broken on the way (``StalenessWatch``, ``remove_lock``).
    """
    lock, token = f"{registry.model_name}{LOCK_SUFFIX}", uuid.uuid4().hex
    interval = heartbeat_interval(registry.lock_stale_s)
    _acquire(mlflow_client, registry, lock, token, interval)
    held = HeldLock(mlflow_client, lock, token, Heartbeat(mlflow_client, lock, token, interval))
    held.heartbeat.start()
    try:
        yield held
    finally:
        held.heartbeat.stop()
        # Only our own lock is released: had ours been broken, the lock is someone else's.
        with contextlib.suppress(Exception):
            remove_lock(mlflow_client, lock, token, by=token)


def _acquire(mlflow_client, registry: RegistryConfig, lock: str, token: str, interval: float):
    deadline = time.monotonic() + registry.lock_wait_s
    watch = StalenessWatch(registry.lock_stale_s)
    while not _try_lock(mlflow_client, lock, token, interval):
        state = read_lock(mlflow_client, lock)
        if state is not None and watch.is_stale(state, time.time(), time.monotonic()):
            if remove_lock(mlflow_client, lock, state.token, by=token):
                print(
                    f"broke the promotion lock {lock} of {state.holder}: its heartbeat stopped "
                    f"for registry.lock_stale_s={registry.lock_stale_s:g}s",
                    file=sys.stderr,
                )
            continue
        if time.monotonic() > deadline:
            holder = "unknown" if state is None else state.holder
            raise PromotionLockedError(
                f"another promotion of {registry.model_name} ({holder}) holds the lock {lock}; "
                f"waited registry.lock_wait_s={registry.lock_wait_s:g}s. Try again when it ends "
                f"(a lock whose heartbeat stops for registry.lock_stale_s="
                f"{registry.lock_stale_s:g}s is broken automatically)."
            )
        time.sleep(0.2 + random.random() * 0.5)


# --- the audit history ----------------------------------------------------------------------


def read_history(mlflow_client, name: str) -> list[dict]:
    """Every audit entry of model ``name``, oldest first."""
    model = tracking_call(lambda: mlflow_client.get_registered_model(name), "reading the model")
    entries = [
        json.loads(value) for key, value in model.tags.items() if key.startswith(AUDIT_PREFIX)
    ]
    return sorted(entries, key=lambda entry: entry["seq"])


def _audit_key(seq: int) -> str:
    return f"{AUDIT_PREFIX}{seq:06d}"


def claim_seq(mlflow_client, name: str) -> tuple[int, str]:
    """Claim the next free audit sequence number; returns it and the claim to release.

    A number is claimed by creating the registered model ``<name>.audit-seq.<seq>``: creation
    is atomic, so two writers never hold one number, lock or no lock. The claim is kept until
    the entry is written, and a number whose entry exists already is passed over, so a number
    whose claim was released is never reused either.
    """
    history = read_history(mlflow_client, name)
    seq = history[-1]["seq"] + 1 if history else 1
    for _ in range(MAX_SEQ_PROBES):
        claim = f"{name}{SEQ_INFIX}{seq:06d}"
        try:
            mlflow_client.create_registered_model(claim, description=SEQ_DESCRIPTION)
        except Exception as error:  # noqa: BLE001 - RestException / MlflowException
            if not _name_taken(error):
                raise tracking_error(error, f"claiming audit entry {seq} of {name}") from None
            seq += 1
            continue
        tags = tracking_call(lambda: mlflow_client.get_registered_model(name).tags, "reading")
        if _audit_key(seq) not in tags:
            return seq, claim
        _release_claim(mlflow_client, claim)
        seq += 1
    raise PromotionError(f"no free audit sequence number for {name} after {MAX_SEQ_PROBES} tries")


def _release_claim(mlflow_client, claim: str) -> None:
    # A claim left behind (a writer killed mid-write) costs only a skipped number.
    with contextlib.suppress(Exception):
        mlflow_client.delete_registered_model(claim)


def append_audit(mlflow_client, name: str, entry: dict, held: HeldLock | None = None) -> dict:
    """Add ``entry`` under a sequence number of its own (``claim_seq``); returns it with ``seq``.

    With ``held``, the write is fenced: refused if the lock was lost meanwhile.
    """
    seq, claim = claim_seq(mlflow_client, name)
    try:
        entry = {"seq": seq, **entry}
        text = json.dumps(entry, separators=(",", ":"))
        if len(text) > MAX_TAG_CHARS and entry.get("gate"):
            # Many classes: keep the verdict and the failed checks, drop the per-check values.
            entry["gate"] = {k: v for k, v in entry["gate"].items() if k != "values"}
            text = json.dumps(entry, separators=(",", ":"))
        if held is not None:
            held.require(f"to write audit entry {seq}")
        tracking_call(
            lambda: mlflow_client.set_registered_model_tag(name, _audit_key(seq), text),
            "writing the audit entry",
        )
    finally:
        _release_claim(mlflow_client, claim)
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


def _set_champion(mlflow_client, name: str, version: str | None) -> None:
    if version is None:
        mlflow_client.delete_registered_model_alias(name, CHAMPION)
        return
    mlflow_client.set_registered_model_alias(name, CHAMPION, version)
    # Read back: the alias is the single source of truth, so the audit must match it.
    if alias_version(mlflow_client, name, CHAMPION) != version:
        raise RegistryError(f"moved {name}@{CHAMPION} to v{version}, but it reads back otherwise")


def _move_and_record(held: HeldLock, name: str, old: str | None, new: str, record: dict) -> dict:
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
        record = _entry("register", INITIAL, None, version, "first version of the model")
        _move_and_record(held, name, None, version, record)
        return True


# --- promote and rollback ------------------------------------------------------------------


@dataclass
class PromotionOutcome:
    """What ``promote_version`` decided; ``entry`` is the audit entry ({} when nothing to do)."""

    promoted: bool
    message: str
    entry: dict = field(default_factory=dict)
    comparison: Comparison | None = None
    note: str = ""  # e.g. the champion gated against was moved outside headswap

    def summary(self) -> str:
        return f"{self.note}\n{self.message}" if self.note else self.message

    def markdown(self) -> str:
        """The decision and the side-by-side table, for a Prefect artifact."""
        lines = [f"**{'PROMOTED' if self.promoted else 'NOT PROMOTED'}**: {self.message}", ""]
        lines += [f"Note: {self.note}", ""] if self.note else []
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
    from headswap.registry import version_manifest

    tags = tracking_call(
        lambda: mlflow_client.get_model_version(name, version).tags, "reading the version"
    )
    manifest = tracking_call(
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
    record = _entry(
        "promote", INITIAL, None, challenger, reason or "no champion yet: nothing to gate against"
    )
    entry = _move_and_record(held, name, None, challenger, record)
    return PromotionOutcome(
        True,
        f"no champion yet: v{challenger} becomes the first champion, nothing to gate against",
        entry,
    )


def _out_of_band_note(mlflow_client, name: str) -> str:
    """A line when the champion about to be gated against was moved outside headswap."""
    from headswap.predict import out_of_band_champion

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
    record = _entry(
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
        entry = _move_and_record(held, name, champion, challenger, record)
    else:
        entry = append_audit(held.client, name, record, held)
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
    whether it is still champion or an audited move later replaced it (that move's
    ``old_version``), so a rollback returns to the champion the last move replaced.
    """
    stack: list[str] = []
    for entry in history:
        if entry["outcome"] in (PROMOTED, INITIAL):
            old = entry.get("old_version")
            if old and (not stack or stack[-1] != old):
                stack.append(old)
            stack.append(entry["new_version"])
        elif entry["outcome"] == ROLLED_BACK and stack:
            stack.pop()
    if current and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


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
        record = _entry("rollback", ROLLED_BACK, current, target, reason or "rollback")
        return _move_and_record(held, name, current, target, record)


# --- the history, and moves it does not record ---------------------------------------------


@dataclass(frozen=True)
class OutOfBandMove:
    """A move of ``@champion`` that no audit entry records (e.g. the MLflow UI's alias pencil).

    MLflow stamps no time on an alias move, so when it happened is known only as a window:
    after ``after`` (the audit entry before it, or the version's registration if later) and
    before ``before`` (the audit entry that first shows it; None while it is the champion now).

    Attributes:
        position: how many audit entries precede it.
    """

    old: str | None
    new: str | None  # None: the alias was removed
    after: str | None
    before: str | None
    position: int


def out_of_band_moves(
    entries: list[dict], current: str | None, registered: dict[str, str] | None = None
) -> list[OutOfBandMove]:
    """The champion moves the audit chain implies but does not record.

    Every entry's ``old_version`` is the champion when it was written, so an entry whose
    ``old_version`` differs from the champion the entries before it leave shows a move made
    outside headswap between the two; a ``current`` champion that differs from the last one
    shows one since the last entry.

    Args:
        entries: the audit history, oldest first.
        current: the version ``@champion`` names now (None: no champion).
        registered: version -> when it was registered (ISO), to narrow the window.
    """
    registered = registered or {}
    moves: list[OutOfBandMove] = []
    expected: str | None = None  # the champion the entries so far leave
    last_time: str | None = None
    checkpoints = [(entry.get("old_version"), entry) for entry in entries] + [(current, None)]
    for position, (seen, entry) in enumerate(checkpoints):
        seen = None if seen is None else str(seen)
        if seen != expected:
            after = max(filter(None, (last_time, registered.get(seen or ""))), default=None)
            before = None if entry is None else entry.get("time")
            moves.append(OutOfBandMove(expected, seen, after, before, position))
        if entry is not None:
            expected = str(entry["new_version"]) if entry.get("outcome") in MOVES else seen
            last_time = entry.get("time")
    return moves


def _registered_at(mlflow_client, name: str, versions: set[str]) -> dict[str, str]:
    """When each version was registered (ISO, UTC), for the versions that still exist."""
    times = {}
    for version in versions:
        try:
            created = mlflow_client.get_model_version(name, version).creation_timestamp
        except Exception as error:  # noqa: BLE001 - a deleted version: no time to add
            if unreachable_reason(error) is not None:
                raise tracking_error(error, f"reading {name} v{version}") from None
            continue
        stamp = datetime.fromtimestamp(created / 1000, UTC)
        times[version] = stamp.isoformat(timespec="seconds")
    return times


@dataclass
class AuditView:
    """The audit history, the moves it does not record, and a warning about the champion now."""

    entries: list[dict]
    out_of_band: list[OutOfBandMove]
    warning: str | None


def audit_view(registry: RegistryConfig) -> AuditView:
    """The audit history of ``registry.model_name`` with the out-of-band moves between entries.

    ``warning`` is the one line ``predict`` also prints when the champion was never gated
    (``predict.champion_provenance``).
    """
    from headswap.predict import champion_provenance

    mlflow_client, name = client(), registry.model_name
    entries = read_history(mlflow_client, name)
    current = alias_version(mlflow_client, name, CHAMPION)
    found = out_of_band_moves(entries, current)
    times = _registered_at(mlflow_client, name, {m.new for m in found if m.new})
    return AuditView(
        entries,
        out_of_band_moves(entries, current, times),
        champion_provenance(mlflow_client, name) if current else None,
    )


def history(registry: RegistryConfig) -> list[dict]:
    """The audit history of ``registry.model_name``, oldest first."""
    return read_history(client(), registry.model_name)
