"""One run at a time per workspace, whichever driver started it.

``make run``, ``make repro``, ``headswap repro`` and every Prefect run (UI, schedule) hold an
exclusive ``flock`` on ``.headswap/run.lock`` for the whole run: the params write, every stage,
register and the experiment save. A second driver waits and says who holds the workspace. The
kernel drops the lock when its holder dies, so a killed run never leaves a stale lock behind.

A bare ``dvc repro`` started by hand cannot wait here (it would hold DVC's own lock while the
running driver needs it), so its stage commands refuse at once instead (``refuse_if_held``).

Standard library only: every stage command imports this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from headswap.errors import HeadswapError
from headswap.paths import RUN_LOCK

# The holder hands its token to the stage commands it starts, so they know the lock is theirs.
TOKEN_ENV = "HEADSWAP_RUN_LOCK_TOKEN"
WAIT_ENV = "HEADSWAP_LOCK_WAIT_S"  # how long a second driver waits (default one hour)
POLL_S = 1.0


class WorkspaceBusyError(HeadswapError):
    """Another run holds this workspace."""


def _describe(holder: dict) -> str:
    if not holder:
        return "another run (holder unknown)"
    return (
        f"{holder.get('driver', 'a run')} (pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {holder.get('since', '?')})"
    )


def read_holder(path: Path = RUN_LOCK) -> dict:
    """What the current holder wrote about itself ({} when free or unreadable)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def workspace_lock(driver: str, path: Path = RUN_LOCK) -> Iterator[str]:
    """Hold the workspace for the block; yields the token to pass to stage commands.

    Args:
        driver: who is running, as a waiting driver will read it ("make run", "train flow ...").

    Raises:
        WorkspaceBusyError: the holder kept the workspace longer than ``$HEADSWAP_LOCK_WAIT_S``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _wait_for(fd, path, float(os.environ.get(WAIT_ENV, "3600")))
        token = uuid.uuid4().hex
        holder = {
            "driver": driver,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "token": token,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield token
        finally:
            os.ftruncate(fd, 0)  # a free lock file names nobody
    finally:
        os.close(fd)  # closing drops the flock


def _wait_for(fd: int, path: Path, wait_s: float) -> None:
    if _try_lock(fd):
        return
    print(
        f"waiting: this workspace is in use by {_describe(read_holder(path))}; "
        "one run at a time per workspace, this one starts when it ends",
        file=sys.stderr,
        flush=True,
    )
    deadline = time.monotonic() + wait_s
    while not _try_lock(fd):
        if time.monotonic() > deadline:
            raise WorkspaceBusyError(
                f"{path}: this workspace is in use by {_describe(read_holder(path))}, "
                f"still after {wait_s:g} s of waiting; set {WAIT_ENV} to wait longer, "
                "or stop that run"
            )
        time.sleep(POLL_S)


def refuse_if_held(path: Path = RUN_LOCK) -> None:
    """Stop a stage command that another driver's run did not start.

    Raises:
        WorkspaceBusyError: the workspace is held and the holder's token is not ours.
    """
    if not path.is_file():
        return
    holder = read_holder(path)
    if holder.get("token") and holder.get("token") == os.environ.get(TOKEN_ENV):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _try_lock(fd):
            return  # free: a hand-run `dvc repro` with nobody else in the workspace
    finally:
        os.close(fd)
    raise WorkspaceBusyError(
        f"this workspace is in use by {_describe(holder)}; run `make repro` (it waits for the "
        "workspace) or re-run when that run ends"
    )
