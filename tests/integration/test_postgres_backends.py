"""MLflow (backend store) and Prefect (server database) on a real PostgreSQL.

A throwaway cluster from Debian's postgresql package is initialised in a temp folder and started
on a free loopback port (as the ``postgres`` user when the tests run as root: PostgreSQL refuses
to run as root). A real ``mlflow server`` and ``prefect server`` use it; the train flow runs
twice through them (the second run changes head.C), and the registry's aliases are read back,
both through the servers and straight from the PostgreSQL tables.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from headswap.ui import free_port
from tests.helpers.servers import start_mlflow, stop, wait_for_http
from tests.helpers.workspace import make_pipeline_workspace, tool_env

pytestmark = pytest.mark.slow
DB_USER = "headswap"


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_db_owner(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def postgres():
    """(host, port) of a fresh PostgreSQL cluster with databases 'mlflow' and 'prefect'."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        if os.environ.get("HEADSWAP_REQUIRE_POSTGRES"):
            pytest.fail("PostgreSQL is not installed (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    # /tmp itself, not pytest's 0700 tmp folder: the postgres user must be able to reach it
    data = Path(tempfile.mkdtemp(prefix="headswap-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        _as_db_owner(
            [
                str(pg_bin / "initdb"),
                "-D",
                str(data / "db"),
                "-U",
                DB_USER,
                "--auth=trust",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_db_owner(
            [
                str(pg_bin / "pg_ctl"),
                "-D",
                str(data / "db"),
                "-o",
                options,
                "-l",
                str(data / "server.log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        for database in ("mlflow", "prefect"):
            subprocess.run(
                [
                    str(pg_bin / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    DB_USER,
                    database,
                ],
                check=True,
                capture_output=True,
            )
        yield "127.0.0.1", port
    finally:
        subprocess.run(
            _as_db_owner(
                [str(pg_bin / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop"]
            ),
            capture_output=True,
        )
        shutil.rmtree(data, ignore_errors=True)


def _sql(postgres, database: str, query: str) -> str:
    host, port = postgres
    result = subprocess.run(
        [
            str(_pg_bin() / "psql"),
            "-h",
            host,
            "-p",
            str(port),
            "-U",
            DB_USER,
            "-d",
            database,
            "-At",
            "-c",
            query,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


@pytest.fixture(scope="module")
def servers(postgres, tmp_path_factory):
    """A real MLflow server and a real Prefect server, both on the PostgreSQL cluster."""
    host, port = postgres
    root = tmp_path_factory.mktemp("pg-servers")
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow = start_mlflow(
        f"postgresql+psycopg2://{DB_USER}@{host}:{port}/mlflow",
        root / "artifacts",
        mlflow_port,
        root / "mlflow.log",
    )
    prefect_env = tool_env(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"postgresql+asyncpg://{DB_USER}@{host}:{port}/prefect",
    )
    with open(root / "prefect.log", "ab") as log:
        prefect = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
            ],
            env=prefect_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_http(f"http://127.0.0.1:{prefect_port}/api/health", prefect)
        yield {
            "mlflow": f"http://127.0.0.1:{mlflow_port}",
            "prefect": f"http://127.0.0.1:{prefect_port}/api",
            "root": root,
        }
    finally:
        stop(prefect)
        stop(mlflow)


def _train(work: Path, servers, *args: str) -> subprocess.CompletedProcess:
    env = tool_env(
        MLFLOW_TRACKING_URI=servers["mlflow"],
        PREFECT_API_URL=servers["prefect"],
        PREFECT_HOME=str(servers["root"] / "client-home"),
        HEADSWAP_CACHE_DIR=str(servers["root"] / "cache"),
    )
    # One form field set, as a person does in the UI; the rest stay as params.yaml holds them.
    code = (
        "import sys; from flows.pipeline import train; "
        "from headswap.flow_params import TrainParameters; "
        "p = TrainParameters(C=float(sys.argv[1])); "
        "print('RESULT', train(parameters=p)['version'])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def test_pipeline_and_promotion_on_postgres(servers, postgres, tmp_path):
    from mlflow import MlflowClient

    work = make_pipeline_workspace(tmp_path)
    first = _train(work, servers, "1.0")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = _train(work, servers, "0.1")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    client = MlflowClient(servers["mlflow"])
    model = client.get_registered_model("elpv-defects")
    # first version: champion (and challenger until the second run); second: challenger only
    assert model.aliases == {"champion": "1", "challenger": "2"}
    assert client.get_model_version("elpv-defects", "2").tags["parity_passed"] == "true"
    # ... and these rows live in PostgreSQL, not in a file store
    rows = _sql(
        postgres, "mlflow", "select alias, version from registered_model_aliases order by alias"
    )
    assert rows.splitlines() == ["challenger|2", "champion|1"]
    completed = _sql(
        postgres,
        "prefect",
        "select count(*) from flow_run f join flow "
        "on f.flow_id = flow.id where flow.name = 'train' and "
        "f.state_type = 'COMPLETED'",
    )
    assert completed == "2"
