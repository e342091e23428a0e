"""When a waiting promoter may break the promotion lock: only once its heartbeat has stopped.

``StalenessWatch`` is pure (the times are passed in), so the rules are checked here with hours
of simulated time; tests/unit/test_lock_fencing.py checks the lock itself on a real store.
"""

from __future__ import annotations

from headswap.promotion.lock import LockState, StalenessWatch, heartbeat_interval

STALE_S = 60.0
BEAT_S = heartbeat_interval(STALE_S)


def lock(beat: int, updated_s: float, token: str = "holder") -> LockState:
    return LockState(token, "someone@host", str(beat), int(updated_s * 1000), BEAT_S)


def test_a_lock_whose_heartbeat_moves_is_never_stale_however_long_it_is_held():
    """A promotion that scores for hours keeps its lock (judged by age it was broken at 60 s)."""
    watch = StalenessWatch(STALE_S)
    start = 1_000_000.0
    for step in range(int(3 * 3600 / BEAT_S)):
        now = step * BEAT_S
        assert not watch.is_stale(lock(step, start + now), start + now, now)


def test_a_lock_whose_heartbeat_stopped_is_stale_after_lock_stale_s_of_watching():
    watch = StalenessWatch(STALE_S)
    state = lock(7, 5_000.0)
    wall = 5_000.0  # the store's time of the last beat is "now": no help from clocks
    assert not watch.is_stale(state, wall, 0.0)
    assert not watch.is_stale(state, wall, STALE_S - 1)
    assert watch.is_stale(state, wall, STALE_S)


def test_a_long_dead_lock_is_stale_after_a_few_missed_beats():
    """Left by a process that died an hour ago: the store's time says so, three beats confirm."""
    watch = StalenessWatch(STALE_S)
    state = lock(3, 1_000.0)
    wall = 1_000.0 + 3600
    assert not watch.is_stale(state, wall, 0.0)
    assert not watch.is_stale(state, wall, 2 * BEAT_S)
    assert watch.is_stale(state, wall, 3 * BEAT_S)


def test_a_store_clock_far_behind_never_breaks_a_live_lock():
    """Skew makes every heartbeat look an hour old; the beats still move, so it is not stale."""
    watch = StalenessWatch(STALE_S)
    for step in range(200):
        now = step * BEAT_S
        assert not watch.is_stale(lock(step, now - 3600), now, now)


def test_a_new_holder_resets_the_watch():
    watch = StalenessWatch(STALE_S)
    assert not watch.is_stale(lock(0, 0.0, "first"), 3600.0, 0.0)
    assert not watch.is_stale(lock(0, 0.0, "second"), 3600.0, STALE_S + 1)
    assert watch.is_stale(lock(0, 0.0, "second"), 3600.0, 2 * STALE_S + 1)


def test_a_lock_from_before_heartbeats_uses_the_waiters_interval():
    watch = StalenessWatch(STALE_S)
    old = LockState("dead", "unknown", "", 0, 0.0)
    assert not watch.is_stale(old, 10_000.0, 0.0)
    assert watch.is_stale(old, 10_000.0, 3 * BEAT_S)


def test_heartbeats_fit_several_times_in_lock_stale_s():
    assert heartbeat_interval(900) == 10.0
    assert heartbeat_interval(60) == 10.0
    assert heartbeat_interval(1.5) == 0.25
    assert heartbeat_interval(0.1) == 0.2
