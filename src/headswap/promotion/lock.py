"""The promotion lock: one promotion of a model at a time, across every machine sharing a store.

Reading the champion, scoring, moving the alias and appending the audit entry happen inside one
critical section guarded by a lock that lives in MLflow itself: the lock is a registered model
named ``<model>.promotion-lock``, created atomically (a unique name: the second create fails
with RESOURCE_ALREADY_EXISTS). A second promotion waits (``registry.lock_wait_s``), then re-reads
the champion and compares against *that*, so two promotions never both compare against the same
old champion.

MLflow has no compare-and-set, so the lock is built from the two atomic operations every store
has: creating a registered model (a unique name) and renaming one (the row moves, or the call
fails). The holder renews a heartbeat while it works; a waiter judges staleness from that
heartbeat, not from anyone's start time, and breaks the lock only after its heartbeat stopped
for ``registry.lock_stale_s``, however long the promotion runs. Breaking moves the lock aside by
rename and deletes it only if what moved is the lock judged stale (``remove_lock``). A holder
that lost its lock anyway (it paused for longer than registry.lock_stale_s) is stopped by the
fence: every write it makes is preceded by a check that the lock still holds its token
(``HeldLock.require``).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from headswap.config import RegistryConfig
from headswap.errors import PromotionError
from headswap.tracking import is_missing, is_name_taken, tracking_error, unreachable_reason

LOCK_SUFFIX = ".promotion-lock"
ASIDE_INFIX = ".removing-"  # <lock>.removing-<token>: where remove_lock moves a lock to look at it
HEARTBEAT_MAX_S = 10.0


class PromotionLockedError(PromotionError):
    """Another promotion holds the lock for longer than ``registry.lock_wait_s``."""


class PromotionLockLostError(PromotionError):
    """This promotion's lock was broken (it looked stale) before it could finish its writes."""


def current_user() -> str:
    """Who is promoting: ``HEADSWAP_USER`` if set (a service acting for someone), else the login."""
    return os.environ.get("HEADSWAP_USER") or getpass.getuser()


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
    try:
        model = mlflow_client.get_registered_model(lock)
    except Exception as error:  # noqa: BLE001 - RestException / MlflowException
        if is_missing(error):
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


def try_lock(mlflow_client, lock: str, token: str, interval_s: float) -> bool:
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
        if is_name_taken(error):
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
    while not try_lock(mlflow_client, lock, token, interval):
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
