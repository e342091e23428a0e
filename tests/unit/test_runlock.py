"""One run at a time per workspace: a second driver waits and says who holds the workspace."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from headswap import runlock

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from headswap.runlock import workspace_lock
    with workspace_lock("make run (test holder)", Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _hold(lock: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_driver_waits_names_the_holder_then_runs(tmp_path, capsys):
    lock = tmp_path / ".headswap" / "run.lock"
    holder = _hold(lock, 1.5)
    started = time.monotonic()
    with runlock.workspace_lock("headswap repro", lock):
        waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited > 0.5, "the second driver did not wait for the first"
    message = capsys.readouterr().err
    assert "in use by make run (test holder)" in message and f"pid {holder.pid}" in message


def test_waiting_gives_up_with_one_line_naming_the_holder(tmp_path, monkeypatch):
    lock = tmp_path / "run.lock"
    holder = _hold(lock, 30)
    monkeypatch.setenv(runlock.WAIT_ENV, "0.5")
    try:
        busy = pytest.raises(runlock.WorkspaceBusyError, match=r"make run \(test holder\).*after")
        with busy, runlock.workspace_lock("headswap repro", lock):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    lock = tmp_path / "run.lock"
    holder = _hold(lock, 30)
    holder.kill()
    holder.wait()
    with runlock.workspace_lock("make run", lock):
        assert runlock.read_holder(lock)["driver"] == "make run"
    assert runlock.read_holder(lock) == {}


def test_stage_commands_refuse_only_outside_the_holders_run(tmp_path, monkeypatch):
    lock = tmp_path / "run.lock"
    runlock.refuse_if_held(lock)  # no lock file: a hand-run `dvc repro` on its own
    with runlock.workspace_lock("Prefect flow run abc", lock) as token:
        monkeypatch.setenv(runlock.TOKEN_ENV, token)
        runlock.refuse_if_held(lock)  # started by the holder itself
    runlock.refuse_if_held(lock)  # released
    holder = _hold(lock, 30)
    try:
        monkeypatch.delenv(runlock.TOKEN_ENV)
        with pytest.raises(runlock.WorkspaceBusyError, match="make repro"):
            runlock.refuse_if_held(lock)
    finally:
        holder.kill()
        holder.wait()
