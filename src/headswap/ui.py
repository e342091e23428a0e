"""``headswap ui`` / ``make ui``: the Prefect UI, the MLflow UI and the served deployments.

Each server is started only if nothing answers on its port yet, bound to 127.0.0.1, in its own
process group with its log under ``.headswap/ui/``. Ctrl-C (or SIGTERM) stops exactly the
processes this command started, newest first, and leaves anything that was already running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from headswap.errors import HeadswapError

LOG_DIR = Path(".headswap/ui")
STARTUP_TIMEOUT_S = 180.0  # a cold Prefect server on a busy 2-core machine takes a minute
STOP_TIMEOUT_S = 20.0
# What flows/serve.py serves (its FLOWS keys; tests/unit/test_serve.py keeps the two in step).
SERVED_DEPLOYMENTS = ("train", "promote", "predict")


class UiError(HeadswapError):
    """A server of ``headswap ui`` could not be started or died."""


@dataclass
class Service:
    """One long-running process: how to start it and how to tell that it is up."""

    name: str
    command: list[str]
    health_url: str | None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return LOG_DIR / f"{self.name}.log"


def port_in_use(host: str, port: int) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and side-by-side servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def healthy(url: str) -> bool:
    """True if ``url`` answers HTTP 200."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URL
            return response.status == 200
    except OSError:
        return False


def start(service: Service, cwd: Path = Path(".")) -> subprocess.Popen:
    """Start ``service`` in its own process group (so Ctrl-C reaches only this supervisor)."""
    (cwd / LOG_DIR).mkdir(parents=True, exist_ok=True)
    log = (cwd / service.log_path).open("ab")
    service.process = subprocess.Popen(
        service.command,
        cwd=cwd,
        env={**os.environ, **service.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    log.close()
    return service.process


def _default_sigint() -> None:
    # A shell's background job inherits SIGINT as ignored; stop() relies on SIGINT working.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until_healthy(service: Service, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Block until the service answers its health URL.

    Raises:
        UiError: the process exited first, or did not answer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process is not None and service.process.poll() is not None:
            raise UiError(
                f"{service.name} exited with status {service.process.returncode}; "
                f"see {service.log_path}"
            )
        if service.health_url is None or healthy(service.health_url):
            return
        time.sleep(1.0)
    raise UiError(
        f"{service.name} did not answer {service.health_url} within {timeout_s:.0f} s; "
        f"see {service.log_path}"
    )


def wait_for_deployments(service: Service, api_url: str) -> None:
    """Block until every deployment in SERVED_DEPLOYMENTS exists on the server at ``api_url``.

    ``prefect.serve`` registers deployments one at a time, so the first one answering does not
    mean the form for the last one is there yet.

    Raises:
        UiError: the serving process exited first, or a deployment did not appear in time.
    """
    for name in SERVED_DEPLOYMENTS:
        service.health_url = f"{api_url}/deployments/name/{name}/{name}"
        wait_until_healthy(service)


def stop(service: Service, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop a started service and everything in its process group.

    SIGINT first (what Ctrl-C would send: servers shut down cleanly), then SIGTERM, then SIGKILL;
    whatever outlived the group leader (server workers, flow-run subprocesses) is killed last.
    """
    process = service.process
    if process is None:
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        _signal_group(process.pid, sig)
        try:
            process.wait(timeout=timeout_s / 2)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(process.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass(frozen=True)
class UiConfig:
    """Where the servers listen and which store MLflow serves."""

    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    root: Path = Path(".")

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"


def prefect_server(config: UiConfig) -> Service:
    """``prefect server start`` on loopback, telemetry off (it locks a fresh SQLite DB)."""
    return Service(
        "prefect-server",
        [
            _tool("prefect"),
            "server",
            "start",
            "--host",
            config.host,
            "--port",
            str(config.prefect_port),
        ],
        f"{config.prefect_url}/api/health",
        env={
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            # The UI calls the API at this address; it defaults to :4200 whatever the port.
            "PREFECT_UI_API_URL": f"{config.prefect_url}/api",
        },
    )


def mlflow_server(config: UiConfig) -> Service:
    """The MLflow UI over the same embedded store as ``make run`` (registry.tracking_uri)."""
    from headswap.registry import tracking_uri

    artifacts = (config.root.resolve() / "mlartifacts").as_uri()
    return Service(
        "mlflow-server",
        [
            _tool("mlflow"),
            "server",
            "--backend-store-uri",
            tracking_uri(config.root),
            "--artifacts-destination",
            artifacts,
            "--host",
            config.host,
            "--port",
            str(config.mlflow_port),
        ],
        f"{config.mlflow_url}/health",
    )


def deployments(config: UiConfig) -> Service:
    """``python -m flows.serve``: the train, promote and predict deployments."""
    return Service(
        "deployments",
        [sys.executable, "-m", "flows.serve"],
        None,
        env={
            "PREFECT_API_URL": f"{config.prefect_url}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HEADSWAP_MLFLOW_UI_URL": config.mlflow_url,
        },
    )


def _tool(name: str) -> str:
    """The console script installed beside this interpreter (the project's .venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _start_unless_running(service: Service, url: str, port: int, config: UiConfig) -> bool:
    """Start ``service`` if its port is free; reuse a healthy one already there.

    Returns:
        True if this call started it (so it must stop it too).
    """
    if port_in_use(config.host, port):
        if service.health_url and healthy(service.health_url):
            print(f"  {service.name}: already running at {url} (left as it is)")
            return False
        raise UiError(
            f"port {port} on {config.host} is taken by something that is not "
            f"{service.name}; stop it or pick another port"
        )
    start(service, config.root)
    wait_until_healthy(service)
    print(f"  {service.name}: started at {url} (log {service.log_path})")
    return True


def run_ui(config: UiConfig = UiConfig()) -> int:
    """Start what is missing, print the URLs, and wait; Ctrl-C stops what this call started.

    Returns:
        0 after Ctrl-C/SIGTERM, 1 if a started process died on its own.

    Raises:
        UiError: a server could not start, or a port is taken by something else.
    """
    if not (config.root / "flows" / "serve.py").is_file():
        raise UiError(
            f"{config.root.resolve()}: flows/serve.py not found; run from the project root"
        )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started: list[Service] = []
    try:
        print("starting headswap UI (Ctrl-C stops everything started here)")
        for service, url, port in (
            (prefect_server(config), config.prefect_url, config.prefect_port),
            (mlflow_server(config), config.mlflow_url, config.mlflow_port),
        ):
            if _start_unless_running(service, url, port, config):
                started.append(service)
        served = deployments(config)
        start(served, config.root)
        started.append(served)
        wait_for_deployments(served, f"{config.prefect_url}/api")
        _print_urls(config)
        return _watch(started)
    except KeyboardInterrupt:
        return 0
    finally:
        for service in reversed(started):
            print(f"  stopping {service.name}")
            stop(service)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _watch(started: list[Service]) -> int:
    """Sleep until Ctrl-C; return 1 if a started process exits by itself."""
    while True:
        for service in started:
            if service.process is not None and service.process.poll() is not None:
                print(
                    f"{service.name} exited with status {service.process.returncode}; "
                    f"see {service.log_path}",
                    file=sys.stderr,
                )
                return 1
        time.sleep(2.0)


def _print_urls(config: UiConfig) -> None:
    print(
        "\n".join(
            [
                "",
                f"Prefect UI   {config.prefect_url}/deployments   (deployments: Run > Custom run)",
                f"MLflow UI    {config.mlflow_url}   (runs, plots, registered models and aliases)",
                "Ctrl-C stops the servers started here.",
            ]
        ),
        flush=True,
    )
