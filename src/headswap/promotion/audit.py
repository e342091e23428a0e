"""The audit history: every decision on a model's ``@champion``, and the moves it does not record.

Every decision (promoted, refused, rolled back, first champion) is appended as a registered-model
tag ``headswap.audit.<seq>`` (JSON), visible in the MLflow UI. Sequence numbers are claimed by
creating ``<model>.audit-seq.<seq>`` (``claim_seq``), so they are unique even between writers the
lock failed to keep apart.

A champion moved outside headswap (the MLflow UI's alias pencil) is recognised: ``audit_view``
shows such moves between audited ones, and ``champion_provenance`` is the one-line warning that
``predict`` and ``history`` print when the champion was never gated.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from headswap.config import RegistryConfig
from headswap.errors import PromotionError
from headswap.promotion.lock import HeldLock, current_user
from headswap.tracking import (
    CHAMPION,
    alias_version,
    client,
    is_name_taken,
    tracking_call,
    tracking_error,
    unreachable_reason,
)

AUDIT_PREFIX = "headswap.audit."
SEQ_INFIX = ".audit-seq."  # <model>.audit-seq.<seq>: held while audit entry <seq> is written
SEQ_DESCRIPTION = "Claims one headswap audit sequence number while its entry is written."
MAX_SEQ_PROBES = 1000
# registered-model tag values are a 5000-character column in MLflow's SQL stores
MAX_TAG_CHARS = 5000
PROMOTED, REFUSED, ROLLED_BACK, INITIAL = "promoted", "refused", "rolled_back", "initial"
MOVES = (PROMOTED, ROLLED_BACK, INITIAL)


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
            if not is_name_taken(error):
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


def audit_entry(
    action: str, outcome: str, old: str | None, new: str | None, reason: str, **extra
) -> dict:
    """An audit record of one decision, stamped with the time and the user (before ``seq``)."""
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


# --- moves the history does not record -----------------------------------------------------


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
    (``champion_provenance``).
    """
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


# --- was the champion gated? ---------------------------------------------------------------
# ``@champion`` moves only through the promotion gate, and every such move (a promotion, a
# rollback, a model's first version) is appended to the audit history. A person can still move
# the alias with the pencil in the MLflow UI, bypassing both: that shows as a champion other than
# the one the last audited move set, or as a champion with no audited move at all.


@dataclass(frozen=True)
class OutOfBandChampion:
    """A champion no audited move explains.

    Attributes:
        current: the version ``@champion`` names now.
        audited: the version the last audited move set, or None when no move was ever audited.
        audited_at: when that move happened (ISO 8601, UTC): the hand-made move came after it.
    """

    current: str
    audited: str | None
    audited_at: str | None

    def message(self, name: str) -> str:
        """One line for a person: which version, since when as far as can be told, what to do."""
        if self.audited is None:
            since = "no promotion, rollback or first registration in its audit history set it"
        else:
            since = (
                f"the last audited move set v{self.audited} at {self.audited_at}, so it was "
                "moved by hand (e.g. in the MLflow UI) after that"
            )
        return (
            f"{name}@champion is v{self.current}, which was never gated: {since}. "
            f"`headswap promote --version {self.current}` gates it, or `headswap history` "
            "shows the audited moves"
        )


def out_of_band_champion(mlflow_client, name: str) -> OutOfBandChampion | None:
    """The champion of model ``name`` if no audited move explains it, else None.

    Returns None too when the model has no champion. A move is an entry whose outcome is in
    ``MOVES``.
    """
    current = alias_version(mlflow_client, name, CHAMPION)
    if current is None:
        return None
    moves = [entry for entry in read_history(mlflow_client, name) if entry.get("outcome") in MOVES]
    last = moves[-1] if moves else {}
    audited = last.get("new_version")
    if audited is not None and str(audited) == current:
        return None
    return OutOfBandChampion(current, None if audited is None else str(audited), last.get("time"))


def champion_provenance(mlflow_client, name: str) -> str | None:
    """A one-line warning when ``name``'s champion was moved outside the gate, else None."""
    found = out_of_band_champion(mlflow_client, name)
    return None if found is None else found.message(name)
