"""``headswap ui`` / ``make ui``: the Prefect UI, the MLflow UI and the served deployments.

Each server is started only if nothing answers on its port yet, bound to 127.0.0.1, in its own
process group with its log under ``.headswap/ui/``. Ctrl-C (or SIGTERM) stops exactly the
processes this command started, newest first, and leaves anything that was already running.

Trust: a server already on a port is used only if an earlier ``headswap ui`` in this workspace
started it (its record in ``.headswap/ui/`` names a live process that carries the record's random
token), or with ``--attach``; otherwise the deployments could land on another local user's server.
A non-loopback ``--host`` needs ``--auth``: Prefect's basic-auth string and MLflow's basic-auth
app, with one user and password generated once into ``.headswap/auth/credentials.json`` (0600).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from headswap.errors import HeadswapError
from headswap.paths import UI_AUTH_DIR, UI_LOG_DIR
from headswap.workspace import executable

CREDENTIALS_FILE = UI_AUTH_DIR / "credentials.json"
MLFLOW_AUTH_DB = "mlflow-auth.db"
AUTH_USERNAME = "headswap"
# Set in the environment of each server this command starts; see started_here().
INSTANCE_ENV = "HEADSWAP_UI_INSTANCE"
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
    health_auth: str | None = None  # an Authorization header, for health URLs behind auth

    @property
    def log_path(self) -> Path:
        return UI_LOG_DIR / f"{self.name}.log"


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


def healthy(url: str, authorization: str | None = None) -> bool:
    """True if ``url`` answers HTTP 200 (sending ``authorization`` as the header, if given)."""
    request = urllib.request.Request(url)
    if authorization:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - our server
            return response.status == 200
    except OSError:
        return False


def start(service: Service, cwd: Path = Path(".")) -> subprocess.Popen:
    """Start ``service`` in its own process group (so Ctrl-C reaches only this supervisor)."""
    (cwd / UI_LOG_DIR).mkdir(parents=True, exist_ok=True)
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
        if service.health_url is None or healthy(service.health_url, service.health_auth):
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
    """Where the servers listen, which store MLflow serves, and how far to trust what is there.

    ``auth`` turns on both servers' basic auth; ``attach`` lets the deployments use a healthy
    server on the port that this workspace's ``headswap ui`` did not start.
    """

    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    root: Path = Path(".")
    auth: bool = False
    attach: bool = False

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"


@dataclass(frozen=True)
class Credentials:
    """The one user and password both servers accept when auth is on."""

    username: str
    password: str
    secret_key: str  # MLflow's CSRF key: it must stay the same across restarts

    @property
    def auth_string(self) -> str:
        """Prefect's ``user:password`` form (the UI's login asks for exactly this)."""
        return f"{self.username}:{self.password}"

    @property
    def header(self) -> str:
        """The HTTP ``Authorization`` header value both servers accept."""
        return "Basic " + base64.b64encode(self.auth_string.encode()).decode()

    @property
    def fingerprint(self) -> str:
        """A short non-secret id, recorded with a started server to match it later."""
        return hashlib.sha256(self.auth_string.encode()).hexdigest()[:16]


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is reachable only from this machine."""
    try:
        infos = socket.getaddrinfo(host, None)
        return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
    except (OSError, ValueError):
        return False


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable and writable by its owner only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)  # explicitly: never the umask's or the old file's mode
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_credentials(root: Path) -> tuple[Credentials, bool]:
    """The workspace's UI credentials, generated on first use.

    Returns:
        The credentials, and True if this call generated them (so they are shown once).

    Raises:
        UiError: the file is readable by other users, or is not a credentials file.
    """
    path = root / CREDENTIALS_FILE
    if not path.exists():
        return _create_credentials(root), True
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UiError(
            f"{path}: mode {mode:04o} lets other users read the UI password; "
            f"run `chmod 600 {path}` and start again"
        )
    try:
        return Credentials(**json.loads(path.read_text())), False
    except (ValueError, TypeError) as error:
        raise UiError(
            f"{path}: not a headswap credentials file ({error}); delete it to generate new ones"
        ) from None


def _create_credentials(root: Path) -> Credentials:
    credentials = Credentials(AUTH_USERNAME, secrets.token_urlsafe(24), secrets.token_urlsafe(32))
    auth_dir = root / UI_AUTH_DIR
    auth_dir.mkdir(parents=True, exist_ok=True)
    auth_dir.chmod(0o700)  # MLflow's user store (password hashes) lives here too
    # MLflow ignores a configured admin password once its admin exists: new credentials need a
    # new user store, or the printed password would not open the MLflow UI.
    (auth_dir / MLFLOW_AUTH_DB).unlink(missing_ok=True)
    write_private(root / CREDENTIALS_FILE, json.dumps(asdict(credentials), indent=2) + "\n")
    return credentials


def _credentials_for(config: UiConfig) -> Credentials | None:
    """None without ``--auth``; else the credentials, printed the first time only."""
    if not config.auth:
        return None
    if importlib.util.find_spec("flask_wtf") is None:
        raise UiError(
            "--auth needs MLflow's basic-auth app (the mlflow[auth] extra), and its Flask-WTF "
            "is not installed in this environment; run `make install` and start again"
        )
    return ensure_credentials(config.root)


def ensure_credentials(root: Path) -> Credentials:
    """The workspace's UI credentials; on first use they are generated and printed, once."""
    credentials, created = load_credentials(root)
    if created:
        print(
            f"  auth on: user {credentials.username}, password {credentials.password} "
            f"(saved in {root / CREDENTIALS_FILE}, mode 0600; shown only this once). "
            f"The Prefect UI asks for {credentials.username}:<password>."
        )
    return credentials


def mlflow_auth_config(root: Path, credentials: Credentials) -> Path:
    """Write MLflow's basic-auth config (its user store beside it); return the file's path."""
    auth_dir = (root / UI_AUTH_DIR).resolve()
    path = auth_dir / "mlflow-auth.ini"
    lines = [
        "[mlflow]",
        # Users the admin adds may read everything; the admin's password comes from the
        # environment (MLFLOW_AUTH_ADMIN_PASSWORD), so it is in one file only.
        "default_permission = READ",
        f"database_uri = sqlite:///{auth_dir / MLFLOW_AUTH_DB}",
        f"admin_username = {credentials.username}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
    ]
    write_private(path, "\n".join(lines) + "\n")
    return path


def prefect_server(config: UiConfig, credentials: Credentials | None = None) -> Service:
    """``prefect server start`` on loopback, telemetry off (it locks a fresh SQLite DB)."""
    auth = {"PREFECT_SERVER_API_AUTH_STRING": credentials.auth_string} if credentials else {}
    return Service(
        "prefect-server",
        [
            executable("prefect"),
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
            **auth,
        },
    )


def mlflow_server(config: UiConfig, credentials: Credentials | None = None) -> Service:
    """The MLflow UI over the same embedded store as ``make run`` (tracking.tracking_uri).

    With ``credentials``, MLflow's basic-auth app guards every page and API but ``/health``.
    """
    from headswap.tracking import tracking_uri

    artifacts = (config.root.resolve() / "mlartifacts").as_uri()
    auth_args, auth_env = [], {}
    if credentials:
        auth_args = ["--app-name", "basic-auth"]
        auth_env = {
            "MLFLOW_AUTH_CONFIG_PATH": str(mlflow_auth_config(config.root, credentials)),
            "MLFLOW_AUTH_ADMIN_USERNAME": credentials.username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials.secret_key,
        }
    return Service(
        "mlflow-server",
        [
            executable("mlflow"),
            "server",
            "--backend-store-uri",
            tracking_uri(config.root),
            "--artifacts-destination",
            artifacts,
            "--host",
            config.host,
            "--port",
            str(config.mlflow_port),
            *auth_args,
        ],
        f"{config.mlflow_url}/health",
        env=auth_env,
    )


def deployments(config: UiConfig, credentials: Credentials | None = None) -> Service:
    """``python -m flows.serve``: the train, promote and predict deployments."""
    auth = {"PREFECT_API_AUTH_STRING": credentials.auth_string} if credentials else {}
    return Service(
        "deployments",
        [sys.executable, "-m", "flows.serve"],
        None,
        env={
            "PREFECT_API_URL": f"{config.prefect_url}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HEADSWAP_MLFLOW_UI_URL": config.mlflow_url,
            **auth,
        },
        health_auth=credentials.header if credentials else None,
    )


def _record_path(service: Service, root: Path) -> Path:
    return root / UI_LOG_DIR / f"{service.name}.json"


def _remember(service: Service, port: int, config: UiConfig, token: str, auth: str | None) -> None:
    """Record a server this command started, so a later ``headswap ui`` here may reuse it."""
    record = {"pid": service.process.pid, "host": config.host, "port": port}
    record |= {"token": token, "auth": auth}
    write_private(_record_path(service, config.root), json.dumps(record) + "\n")


def _forget(service: Service, root: Path) -> None:
    _record_path(service, root).unlink(missing_ok=True)


def started_here(service: Service, port: int, config: UiConfig) -> dict | None:
    """The record of ``service`` on ``port`` if a ``headswap ui`` in this workspace started it.

    The record alone is not trusted: its process must still be alive and carry the record's
    random token in its environment, which /proc shows to the process's owner only.
    """
    try:
        record = json.loads(_record_path(service, config.root).read_text())
        if (record["host"], record["port"]) != (config.host, port):
            return None
        environ = Path(f"/proc/{int(record['pid'])}/environ").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no record, a broken one, a dead process or someone else's
    return record if f"{INSTANCE_ENV}={record['token']}".encode() in environ.split(b"\0") else None


def _check_reusable(service: Service, url: str, port: int, auth: str | None, config: UiConfig):
    """Accept the server already on ``port`` as ours, or say why not.

    Raises:
        UiError: it is not ``service``, was started with other auth, or was not started by
            ``headswap ui`` here and ``config.attach`` is off.
    """
    if not (service.health_url and healthy(service.health_url)):
        raise UiError(
            f"port {port} on {config.host} is taken by something that is not "
            f"{service.name}; stop it or pick another port"
        )
    record = started_here(service, port, config)
    if record is not None and record["auth"] == auth:
        print(
            f"  {service.name}: already running at {url}, started by `headswap ui` here "
            f"(pid {record['pid']}; left as it is)"
        )
    elif record is not None:
        raise UiError(
            f"{service.name} at {url} (pid {record['pid']}) was started by `headswap ui` here "
            f"with another --auth setting or password; stop it (kill {record['pid']}) and "
            "start again"
        )
    elif config.attach:
        print(
            f"  {service.name}: attaching to {url}, which `headswap ui` did not start "
            "(--attach; left as it is)"
        )
    else:
        raise UiError(
            f"port {port} on {config.host} has a {service.name} that `headswap ui` did not "
            "start here (another user's would see your deployments and runs); stop it, pick "
            "another port, or pass --attach to use it anyway"
        )


def _start_unless_running(
    service: Service, url: str, port: int, config: UiConfig, auth: str | None = None
) -> bool:
    """Start ``service`` if its port is free; else reuse it if ``_check_reusable`` allows.

    Args:
        auth: the credentials' fingerprint when auth is on, recorded to match the server later.

    Returns:
        True if this call started it (so it must stop it too).

    Raises:
        UiError: the server on the port may not be used, or the one started did not come up.
    """
    if port_in_use(config.host, port):
        _check_reusable(service, url, port, auth, config)
        return False
    token = secrets.token_hex(16)
    service.env[INSTANCE_ENV] = token
    start(service, config.root)
    _remember(service, port, config, token, auth)
    try:
        wait_until_healthy(service)
    except BaseException:  # incl. Ctrl-C: a half-started server must not outlive this command
        stop(service)
        _forget(service, config.root)
        raise
    print(f"  {service.name}: started at {url} (log {service.log_path})")
    return True


def run_ui(config: UiConfig = UiConfig()) -> int:
    """Start what is missing, print the URLs, and wait; Ctrl-C stops what this call started.

    Returns:
        0 after Ctrl-C/SIGTERM, 1 if a started process died on its own.

    Raises:
        UiError: a non-loopback host without auth, a server could not start, or a port is taken
            by something else or by a server this command may not use.
    """
    if not (config.auth or is_loopback(config.host)):
        raise UiError(
            f"--host {config.host} lets other machines reach servers that accept anyone; add "
            f"--auth (basic auth on both, credentials generated into {CREDENTIALS_FILE}) or "
            "bind 127.0.0.1"
        )
    if not (config.root / "flows" / "serve.py").is_file():
        raise UiError(
            f"{config.root.resolve()}: flows/serve.py not found; run from the project root"
        )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started: list[Service] = []
    try:
        print("starting headswap UI (Ctrl-C stops everything started here)")
        credentials = _credentials_for(config)
        auth = credentials.fingerprint if credentials else None
        for service, url, port in (
            (prefect_server(config, credentials), config.prefect_url, config.prefect_port),
            (mlflow_server(config, credentials), config.mlflow_url, config.mlflow_port),
        ):
            if _start_unless_running(service, url, port, config, auth):
                started.append(service)
        served = deployments(config, credentials)
        start(served, config.root)
        started.append(served)
        wait_for_deployments(served, f"{config.prefect_url}/api")
        _print_urls(config, credentials)
        return _watch(started)
    except KeyboardInterrupt:
        return 0
    finally:
        for service in reversed(started):
            print(f"  stopping {service.name}")
            stop(service)
            _forget(service, config.root)


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


def _print_urls(config: UiConfig, credentials: Credentials | None = None) -> None:
    lines = [
        "",
        f"Prefect UI   {config.prefect_url}/deployments   (deployments: Run > Custom run)",
        f"MLflow UI    {config.mlflow_url}   (runs, plots, registered models and aliases)",
    ]
    if credentials:
        lines.append(
            f"Sign in as {credentials.username} (Prefect: {credentials.username}:<password>); "
            f"the password is in {config.root / CREDENTIALS_FILE}"
        )
    print("\n".join([*lines, "Ctrl-C stops the servers started here."]), flush=True)
