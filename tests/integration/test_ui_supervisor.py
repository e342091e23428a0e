"""`headswap ui`'s process handling with real processes: start, health, reuse only what it
started, stop the group."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from headswap.ui import (
    Service,
    UiConfig,
    UiError,
    _start_unless_running,
    free_port,
    healthy,
    port_in_use,
    start,
    stop,
    wait_until_healthy,
)


def _web_server(port: int, name: str = "web", pid_file=None) -> Service:
    """A real HTTP server; optionally with a background grandchild that records its pid."""
    serve = f"exec {sys.executable} -m http.server {port} --bind 127.0.0.1"
    script = f"sleep 300 & echo $! > {pid_file}; {serve}" if pid_file else serve
    return Service(name, ["bash", "-c", script], f"http://127.0.0.1:{port}/")


@contextlib.contextmanager
def _foreign_server(port: int, name: str, cwd: Path) -> Iterator[Service]:
    """A healthy web server on ``port`` that no ``headswap ui`` started; stopped afterwards."""
    server = _web_server(port, name)
    start(server, cwd=cwd)
    try:
        wait_until_healthy(server, timeout_s=60)
        yield server
    finally:
        stop(server, timeout_s=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is already dead
        return stat.read().split()[2] != "Z"


def test_stop_ends_the_whole_process_group(tmp_path):
    port, pid_file = free_port(), tmp_path / "grandchild.pid"
    service = _web_server(port, pid_file=pid_file)
    start(service, cwd=tmp_path)
    try:
        wait_until_healthy(service, timeout_s=60)
        grandchild = int(pid_file.read_text())
        assert healthy(service.health_url) and _alive(grandchild)
    finally:
        stop(service, timeout_s=10)
    assert service.process.poll() is not None
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(grandchild)
    assert not port_in_use("127.0.0.1", port)
    assert (tmp_path / ".headswap/ui/web.log").is_file()


def test_a_server_that_headswap_ui_started_here_is_reused_and_left_running(tmp_path):
    port = free_port()
    config = UiConfig(root=tmp_path)
    first = _web_server(port, "prefect-server")
    try:
        assert _start_unless_running(first, first.health_url, port, config) is True
        record = json.loads((tmp_path / ".headswap/ui/prefect-server.json").read_text())
        assert record["pid"] == first.process.pid and record["port"] == port
        # A later `headswap ui` in the same workspace (the first one was killed, say).
        again = _web_server(port, "prefect-server")
        assert _start_unless_running(again, again.health_url, port, config) is False
        assert again.process is None
        assert healthy(first.health_url)
    finally:
        stop(first, timeout_s=10)


def test_a_healthy_server_it_did_not_start_is_refused_unless_attach(tmp_path):
    port = free_port()
    with _foreign_server(port, "theirs", tmp_path) as theirs:
        ours = _web_server(port, "prefect-server")
        with pytest.raises(UiError, match=f"port {port} .* did not start .* pass --attach"):
            _start_unless_running(ours, ours.health_url, port, UiConfig(root=tmp_path))
        attach = UiConfig(root=tmp_path, attach=True)
        assert _start_unless_running(ours, ours.health_url, port, attach) is False
        assert ours.process is None
        assert healthy(theirs.health_url)


def test_a_record_is_trusted_only_if_its_live_process_carries_the_token(tmp_path):
    """A record naming a process that lacks its token (a forged record, a reused pid) or a
    process that is gone does not make a foreign server ours."""
    port = free_port()
    record = tmp_path / ".headswap/ui/prefect-server.json"
    with _foreign_server(port, "theirs", tmp_path) as theirs:
        ours = _web_server(port, "prefect-server")
        for pid in (theirs.process.pid, 2**22 + 1):  # alive without the token; no such process
            fields = {"pid": pid, "host": "127.0.0.1", "port": port}
            record.write_text(json.dumps({**fields, "token": "forged", "auth": None}))
            with pytest.raises(UiError, match="did not start"):
                _start_unless_running(ours, ours.health_url, port, UiConfig(root=tmp_path))


def test_a_server_started_with_other_credentials_is_not_reused(tmp_path):
    port = free_port()
    first = _web_server(port, "prefect-server")
    try:
        _start_unless_running(first, first.health_url, port, UiConfig(root=tmp_path), "key-a")
        again = _web_server(port, "prefect-server")
        with pytest.raises(UiError, match="another --auth setting or password"):
            _start_unless_running(again, again.health_url, port, UiConfig(root=tmp_path), None)
    finally:
        stop(first, timeout_s=10)


def test_a_port_taken_by_something_else_is_an_error(tmp_path):
    port = free_port()
    with _foreign_server(port, "blocker", tmp_path):
        other = Service("prefect-server", ["true"], f"http://127.0.0.1:{port}/api/health")
        with pytest.raises(UiError, match=f"port {port} .* not prefect-server"):
            _start_unless_running(other, "x", port, UiConfig(root=tmp_path))


def test_a_service_that_dies_at_startup_is_reported_with_its_log(tmp_path):
    service = Service("broken", ["bash", "-c", "echo boom; exit 3"], "http://127.0.0.1:9/")
    start(service, cwd=tmp_path)
    with pytest.raises(UiError, match=r"broken exited with status 3; see .headswap/ui/broken.log"):
        wait_until_healthy(service, timeout_s=30)
    assert "boom" in (tmp_path / ".headswap/ui/broken.log").read_text()
