"""The promotion lock across processes on a real `mlflow server` (127.0.0.1, free port).

Two promoter processes start together, each scoring for longer than ``registry.lock_stale_s``:
the holder's heartbeat keeps its lock, the second waits for it and gates against the first's
result. Two writer processes append audit entries at once with no lock at all: every entry
keeps a sequence number of its own. (Before the fix, a lock older than lock_stale_s was broken
while its holder still scored, and concurrent writers reused and overwrote numbers.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from registry_gate.conftest import GOOD, INVERTED, TinyRegistry, write_images, write_manifest

from headswap.ui import free_port
from tests.helpers.servers import start_mlflow, stop
from tests.helpers.workspace import REPO

pytestmark = pytest.mark.slow

PROMOTE = """
import json, sys
from headswap.config import RegistryConfig, SplitConfig
from headswap.promotion.promote import promote_version
from headswap.promotion.scoring import PromotionFiles
name, version, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
registry = RegistryConfig(
    model_name=name, lock_stale_s=2.0, lock_wait_s=400, gate={"bootstrap": 12000}
)
import time; time.sleep(max(0.0, start - time.time()))
outcome = promote_version(registry, PromotionFiles(), version=version, reason=f"race v{version}",
                          split=SplitConfig())
print("RESULT", json.dumps(outcome.entry))
"""

APPEND = """
import sys, time
from headswap.promotion.audit import append_audit, audit_entry
from headswap.tracking import client
name, who, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
mlflow_client = client()
time.sleep(max(0.0, start - time.time()))
for n in range(10):
    append_audit(mlflow_client, name, audit_entry("promote", "refused", "1", "2", f"{who}.{n}"))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock-server")
    port = free_port()
    process = start_mlflow(
        f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", port, root / "server.log"
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


@pytest.fixture
def workspace(server, tmp_path, monkeypatch):
    """Images + manifest (all test rows) in the cwd, the server as the tracking store."""
    from headswap.config import RegistryConfig, SplitConfig
    from headswap.promotion.scoring import PromotionFiles

    rows = write_images(tmp_path / "data" / "raw")
    write_manifest(tmp_path / "data" / "prepared" / "manifest.csv", rows)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HEADSWAP_CACHE_DIR", str(tmp_path / "cache"))  # the promoters inherit it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    name = f"lock-{uuid.uuid4().hex[:8]}"
    registry = RegistryConfig(model_name=name, gate={"bootstrap": 50})
    return TinyRegistry(tmp_path, rows, registry, PromotionFiles(), SplitConfig())


def start_all(script: str, cwd, *argument_lists: list[str]) -> list[subprocess.Popen]:
    """One process per argument list, all released at the same moment (8 s from now)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
        "HEADSWAP_USER": "race",
    }
    start = str(time.time() + 8)  # after every interpreter has imported what it needs
    return [
        subprocess.Popen(
            [sys.executable, "-c", script, *args, start],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in argument_lists
    ]


def finish(processes: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        outputs.append(out + err)
    return outputs


def audit(reg) -> list[dict]:
    from headswap.promotion.audit import history

    return history(reg.registry)


def test_two_long_promotions_are_serialised_by_the_heartbeat_not_broken(workspace):
    workspace.register(*INVERTED)  # v1: the first champion
    first, second = workspace.register(*GOOD), workspace.register(*GOOD)
    name = workspace.registry.model_name
    started = time.monotonic()
    outputs = finish(
        start_all(PROMOTE, workspace.root, [name, first], [name, second]),
    )
    took = time.monotonic() - started
    assert not any("broke the promotion lock" in output for output in outputs)
    entries = audit(workspace)
    print(f"\ntwo promotions, each scoring past lock_stale_s=2 s, done in {took:.0f} s")
    assert [e["seq"] for e in entries] == [1, 2, 3]
    moves = entries[1:]
    assert {m["new_version"] for m in moves} == {first, second}
    assert moves[0]["old_version"] == "1"
    assert moves[1]["old_version"] == moves[0]["new_version"]  # gated against the first's result
    assert all(m["outcome"] == "promoted" for m in moves)
    from headswap.tracking import alias_version, client

    assert alias_version(client(), name, "champion") == moves[1]["new_version"]
    assert client().search_registered_models(f"name LIKE '{name}.%'") == []  # lock, claims gone


def test_concurrent_audit_writers_never_share_or_lose_a_sequence_number(workspace):
    from headswap.tracking import client

    name = workspace.registry.model_name
    client().create_registered_model(name)
    finish(start_all(APPEND, workspace.root, [name, "a"], [name, "b"]))
    entries = audit(workspace)
    assert sorted(e["reason"] for e in entries) == sorted(
        f"{w}.{n}" for w in "ab" for n in range(10)
    )
    assert sorted(e["seq"] for e in entries) == list(range(1, 21))
    assert client().search_registered_models(f"name LIKE '{name}.audit-seq.%'") == []
