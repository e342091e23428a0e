"""The promotion lock on a real MLflow store (embedded sqlite): heartbeat, compare-and-delete,
fencing, and audit sequence numbers that stay unique without it.

The versions are real registered model versions (no ONNX needed: nothing here is scored).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pytest

from headswap.config import RegistryConfig
from headswap.promotion.audit import append_audit, audit_entry, read_history
from headswap.promotion.lock import (
    LOCK_SUFFIX,
    HeldLock,
    PromotionLockedError,
    PromotionLockLostError,
    promotion_lock,
    read_lock,
    remove_lock,
    try_lock,
)
from headswap.promotion.promote import move_and_record
from headswap.tracking import alias_version


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("lock-store")
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture
def model(store) -> str:
    """A fresh model with versions 1 and 2, v1 champion."""
    name = f"lock-{uuid.uuid4().hex[:8]}"
    store.create_registered_model(name)
    for _ in range(2):
        store.create_model_version(name, source="file:///nowhere/model.onnx")
    store.set_registered_model_alias(name, "champion", "1")
    return name


def config(name: str, **values) -> RegistryConfig:
    return RegistryConfig(model_name=name, **values)


def test_a_holder_keeps_its_lock_past_lock_stale_s_by_its_heartbeat(store, model):
    """Held three times longer than lock_stale_s: a waiter waits and gives up, it breaks nothing.
    (Judged by the time it was taken, as before, the lock was broken after 1.5 s.)"""
    registry = config(model, lock_stale_s=1.5, lock_wait_s=3.5)
    waited: list[BaseException] = []

    def second_promoter() -> None:
        try:
            with promotion_lock(store, registry):
                pass
        except PromotionLockedError as error:
            waited.append(error)

    with promotion_lock(store, registry) as held:
        first_beat = read_lock(store, held.lock).beat
        waiter = threading.Thread(target=second_promoter)
        waiter.start()
        time.sleep(4.5)
        assert read_lock(store, held.lock).token == held.token
        assert read_lock(store, held.lock).beat != first_beat
        held.require("to check the fence")  # still ours
        waiter.join()
    assert len(waited) == 1 and "holds the lock" in str(waited[0])
    assert read_lock(store, f"{model}{LOCK_SUFFIX}") is None  # released at the end


def test_a_promoter_whose_lock_was_broken_moves_nothing_and_writes_no_audit(store, model):
    registry = config(model, lock_stale_s=60)
    lock = f"{model}{LOCK_SUFFIX}"
    with contextlib.ExitStack() as stack:
        held = stack.enter_context(promotion_lock(store, registry))
        # A waiter judged it stale (say this process was paused) and broke it; another took it.
        assert remove_lock(store, lock, held.token, by="waiter")
        other = stack.enter_context(promotion_lock(store, registry.model_copy()))
        record = audit_entry("promote", "promoted", "1", "2", "should not happen")
        with pytest.raises(PromotionLockLostError, match="was broken while this promotion ran"):
            move_and_record(held, model, "1", "2", record)
        with pytest.raises(PromotionLockLostError):
            append_audit(
                store, model, audit_entry("promote", "refused", "1", "2", "nor this"), held
            )
        assert alias_version(store, model, "champion") == "1"
        assert read_history(store, model) == []
        # The first holder's exit (the stack unwinds it last) must not release the new lock.
        stack.callback(lambda: assert_holder(store, lock, other.token))
    assert read_lock(store, lock) is None


def assert_holder(store, lock: str, token: str) -> None:
    assert read_lock(store, lock).token == token


class LostAfterFirstCheck(HeldLock):
    """The real lock, broken by a waiter right after the first fence check passed (the window
    between checking and moving the alias)."""

    def require(self, doing: str) -> None:
        super().require(doing)
        if not getattr(self, "broken", False):
            self.broken = True
            remove_lock(self.client, self.lock, self.token, by="waiter")


def test_an_alias_moved_just_before_the_lock_was_lost_is_moved_back(store, model):
    registry = config(model, lock_stale_s=60)
    with promotion_lock(store, registry) as held:
        racing = LostAfterFirstCheck(held.client, held.lock, held.token, held.heartbeat)
        record = audit_entry("promote", "promoted", "1", "2", "raced")
        with pytest.raises(PromotionLockLostError):
            move_and_record(racing, model, "1", "2", record)
    assert alias_version(store, model, "champion") == "1"
    assert read_history(store, model) == []


def test_remove_lock_deletes_only_the_lock_whose_token_it_was_given(store, model):
    lock = f"{model}{LOCK_SUFFIX}"
    assert try_lock(store, lock, "current", 1.0)
    before = dict(store.get_registered_model(lock).tags)
    assert not remove_lock(store, lock, "an-earlier-holder", by="waiter")
    assert dict(store.get_registered_model(lock).tags) == before  # put back as it was
    assert remove_lock(store, lock, "current", by="waiter")
    assert read_lock(store, lock) is None
    leftovers = store.search_registered_models(f"name LIKE '{lock}%'")
    assert leftovers == []


def test_audit_sequence_numbers_stay_unique_without_the_lock(store, model):
    """Four writers append at once with no lock at all: every entry keeps a number of its own."""
    errors: list[BaseException] = []

    def writer(who: int) -> None:
        try:
            for n in range(6):
                append_audit(
                    store, model, audit_entry("promote", "refused", "1", "2", f"{who}.{n}")
                )
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(who,)) for who in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    entries = read_history(store, model)
    assert sorted(e["reason"] for e in entries) == sorted(
        f"{w}.{n}" for w in range(4) for n in range(6)
    )
    assert sorted(e["seq"] for e in entries) == list(range(1, 25))
    assert store.search_registered_models(f"name LIKE '{model}.audit-seq.%'") == []
