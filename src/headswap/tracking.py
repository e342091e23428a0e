"""Talking to the MLflow tracking store: its URI, a client, the one retry policy, and lookups.

Every MLflow client headswap makes is made with ``tracking_uri()`` (``client()``), which also
puts the retry policy in force. MLflow's HTTP client is the one layer that retries (urllib3's
Retry: exponential backoff, and a server's Retry-After is honoured); headswap adds no loop of its
own and Prefect retries no MLflow task, so the waits never multiply. ``tracking_call`` turns any
failure into one line for a person, telling "the store did not answer" (``unreachable_reason``,
from the exception types in the chain) from "the store answered, and said no".

What the store answered is read from MLflow's error code, never from the message text
(``is_missing``, ``is_name_taken``). This module imports no other part of headswap's registry
code: the register stage, the promotion gate and the predict tool all build on it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from headswap.errors import RegistryError
from headswap.io import parse_csv
from headswap.paths import EMBEDDED_TRACKING_DB

CHAMPION, CHALLENGER = "champion", "challenger"
MANIFEST_ARTIFACT = "data/manifest.csv"
TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"

# MLflow's HTTP client is the one layer that retries (urllib3's Retry: exponential backoff, and
# a server's Retry-After is honoured). headswap adds no loop of its own and Prefect retries no
# MLflow task, so the waits never multiply. With these defaults a tracking server that is not
# listening fails a command after about a minute (waits of 0, 4, 8, 16 and 32 s, plus up to 1 s
# of MLflow's jitter each), with a line per retry meanwhile. A user's own setting of any of these
# variables wins.
HTTP_RETRY_POLICY = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    # seconds per connect or read, not per request: a host that drops packets costs 6 x 20 s
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
# What a person can do about a tracking store that does not answer.
CHECK_SERVER = (
    "Check that the server is running and reachable at that address (or unset "
    "MLFLOW_TRACKING_URI to use the embedded store)"
)

# MLflow's error codes (``MlflowException.error_code``, also on a REST server's answer).
MISSING_CODE = "RESOURCE_DOES_NOT_EXIST"
EXISTS_CODE = "RESOURCE_ALREADY_EXISTS"
# The SQL store's answer when sqlite stays busy with another writer past its busy timeout.
BUSY_CODE = "TEMPORARILY_UNAVAILABLE"


def tracking_uri(project_root: Path = Path(".")) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded sqlite store at the project root.

    Every MLflow client headswap makes is made with this URI, so this is also where the one
    retry policy for talking to it is put in force (``apply_http_retry_policy``).
    """
    uri = os.environ.get(TRACKING_URI_VARIABLE) or (
        f"sqlite:///{project_root.resolve() / EMBEDDED_TRACKING_DB}"
    )
    apply_http_retry_policy(uri)
    return uri


def client():
    """An MlflowClient on the project's tracking URI (``MLFLOW_TRACKING_URI`` or embedded)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``start_run``, ``log_*``, ``register_model``) at uri for a block.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` so that
    subprocesses inherit it, and its process-wide value outranks that variable from then on. Left
    in place, a long-lived process (a served Prefect deployment, a test session) would carry one
    workspace's store into every later run and every ``dvc repro`` it starts. So on the way out
    MLflow's own value is cleared and the variable is put back as it was.
    """
    import mlflow

    before = os.environ.get(TRACKING_URI_VARIABLE)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        restore_tracking_uri_variable(before)


def restore_tracking_uri_variable(value: str | None) -> None:
    """Clear MLflow's process-wide tracking URI and set the variable back to ``value``."""
    import mlflow

    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: follow the variable again
    if value is None:
        os.environ.pop(TRACKING_URI_VARIABLE, None)
    else:
        os.environ[TRACKING_URI_VARIABLE] = value


def ensure_experiment(mlflow_client, name: str, root: Path = Path(".")) -> str:
    """The id of experiment ``name``, created if missing (artifacts beside an embedded store)."""
    existing = mlflow_client.get_experiment_by_name(name)
    if existing:
        return existing.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        # Embedded default: keep artifacts beside mlflow.db, not in whatever the cwd happens to be.
        location = (root.resolve() / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


# --- the one retry policy, and failures as one line ----------------------------------------


def apply_http_retry_policy(uri: str) -> None:
    """Give MLflow's HTTP client headswap's retry defaults (unless set) and retry progress lines.

    Idempotent and cheap: ``tracking_uri`` calls it, and every headswap MLflow client is made
    with that URI, so the policy is in force before any request is sent.
    """
    for key, value in HTTP_RETRY_POLICY.items():
        os.environ.setdefault(key, value)
    pool_log = logging.getLogger("urllib3.connectionpool")
    progress = next((f for f in pool_log.filters if isinstance(f, RetryProgress)), None)
    if progress is None:
        progress = RetryProgress()
        pool_log.addFilter(progress)
    progress.uri = uri


class RetryProgress:
    """A logging filter that turns urllib3's retry warning into one line a person can read.

    urllib3 logs ``Retrying (Retry(...)) after connection broken by ...`` as each retry starts,
    with the host in a dedicated ``extra`` field; the raw record is dropped, the line printed.
    """

    uri = ""

    def filter(self, record) -> bool:
        retry = getattr(record, "__urllib3-retry-warning", None)
        args = record.args if isinstance(record.args, tuple) else ()
        if retry is None or len(args) < 2 or not hasattr(args[0], "history"):
            return True
        attempt = len(args[0].history)
        remaining = args[0].total if isinstance(args[0].total, int) else 0
        host = retry.get("host", "?")
        where = (
            f"the MLflow tracking server at {self.uri}" if host == urlsplit_host(self.uri) else host
        )
        print(
            f"waiting for {where} ({unreachable_reason(args[1]) or 'no answer'}): "
            f"retry {attempt} of {attempt + remaining}",
            file=sys.stderr,
            flush=True,
        )
        return False


def urlsplit_host(uri: str) -> str | None:
    """The host name of ``uri`` (None for a sqlite path)."""
    return urlsplit(uri).hostname


def _causes(error: BaseException) -> list[BaseException]:
    """``error`` and what it wraps: causes, contexts and urllib3's ``reason``, without loops."""
    seen: list[BaseException] = []
    todo = [error]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        reason = getattr(current, "reason", None)
        todo += [current.__cause__, current.__context__]
        todo += [reason] if isinstance(reason, BaseException) else []
        todo += [a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]
    return seen


def unreachable_reason(error: BaseException) -> str | None:
    """Why the tracking store did not answer (``connection refused``...), or None when the
    failure is not about reaching it (the store answered, and said no)."""
    import requests
    import urllib3

    causes = _causes(error)
    for kind, reason in (
        (ConnectionRefusedError, "connection refused"),
        (socket.gaierror, "host name not found"),
        (ConnectionResetError, "connection reset"),
        (TimeoutError, "timed out"),
        # urllib3 files a failed connect under its TimeoutError too: checked before it
        (urllib3.exceptions.NewConnectionError, "cannot connect"),
        (urllib3.exceptions.TimeoutError, "timed out"),
        (urllib3.exceptions.ResponseError, "it answers with server errors"),
        (requests.exceptions.RetryError, "it answers with server errors"),
        (requests.exceptions.ConnectionError, "cannot connect"),
    ):
        if any(isinstance(cause, kind) for cause in causes):
            return reason
    return None


def tracking_error(error: BaseException, what: str, then: str = "re-run") -> RegistryError:
    """One line for a person: what failed, against which store, and what to check."""
    uri = tracking_uri()
    reason = unreachable_reason(error)
    if reason is None:
        text = " ".join(str(error).split())
        return RegistryError(f"{what} failed against {uri}: {text[:400]}")
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
    return RegistryError(
        f"{what}: the MLflow tracking server at {uri} did not answer ({reason}; gave up after "
        f"{retries} retries, MLFLOW_HTTP_REQUEST_MAX_RETRIES). {CHECK_SERVER}, then {then}."
    )


def tracking_call(action: Callable, what: str, then: str = "re-run"):
    """``action()``, with any failure as one RegistryError line (``tracking_error``).

    It does not retry: MLflow's HTTP client already did (``HTTP_RETRY_POLICY``).
    """
    try:
        return action()
    except RegistryError:
        raise
    except Exception as error:  # noqa: BLE001 - MLflow raises many types for one failure
        raise tracking_error(error, what, then) from None


def error_code(error: BaseException) -> str:
    """MLflow's error code for ``error`` (``RESOURCE_DOES_NOT_EXIST``...), "" when it has none."""
    return str(getattr(error, "error_code", "") or "")


def is_missing(error: BaseException) -> bool:
    """True when the store answered that the model, version or alias does not exist."""
    return unreachable_reason(error) is None and error_code(error) == MISSING_CODE


def is_name_taken(error: BaseException) -> bool:
    """True when creating a registered model failed because the name is (or just was) taken.

    MLflow's SQL store answers a duplicate name by reading the existing model; if its holder
    deleted it in between, that read answers "does not exist": the name was taken a moment ago.
    sqlite may also stay busy with another writer. Either way: try again later.
    """
    taken = error_code(error) in (EXISTS_CODE, MISSING_CODE, BUSY_CODE)
    return taken and unreachable_reason(error) is None


# --- reading what the store holds ----------------------------------------------------------


def alias_version(client, name: str, alias: str) -> str | None:
    """The version number behind ``name@alias``, or None if the alias (or model) is not set.

    Raises:
        RegistryError: the tracking store did not answer (never mistaken for "no alias").
    """
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as error:  # noqa: BLE001 - MLflow raises RestException/MlflowException
        if unreachable_reason(error) is not None:
            raise tracking_error(error, f"reading {name}@{alias}") from None
        return None


def find_version(client, name: str, version: str):
    """The store's ``name`` version ``version``, or None when it has no such model or version."""
    if not str(version).isdigit():
        return None
    try:
        return client.get_model_version(name, str(version))
    except Exception as error:  # noqa: BLE001 - RestException / MlflowException
        if is_missing(error):
            return None
        raise


def run_artifact_text(client, run_id: str, artifact: str) -> str | None:
    """The text of a run's artifact, or None when the run has no such artifact."""
    folder = str(Path(artifact).parent)
    if artifact not in {item.path for item in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory(prefix="headswap-artifact-") as tmp:
        return Path(client.download_artifacts(run_id, artifact, tmp)).read_text()


def version_manifest(client, name: str, version: str) -> list[dict[str, str]] | None:
    """The manifest version ``version`` was trained on, or None if it recorded none."""
    run_id = client.get_model_version(name, version).run_id
    text = run_artifact_text(client, run_id, MANIFEST_ARTIFACT) if run_id else None
    return None if text is None else parse_csv(text)
