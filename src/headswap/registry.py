"""The register stage: one MLflow run per pipeline run, the ONNX model in the model registry.

Aliases, never stages: ``challenger`` marks every registered version that passed its gates
(export parity), ``champion`` moves only through the promotion gate, except that the very first
version of a model becomes champion so that ``models:/<name>@champion`` always resolves.

DVC runs this stage on every ``dvc repro`` (the registry lives outside the repository), so it
registers only when ``models/registry.json`` does not already describe this exact model, data
and tracking store. Every version carries its lineage (ONNX and data hashes, the split rule and
settings, the class list) and its manifest as the run artifact ``data/manifest.csv``: that is what
lets a later promotion check that a comparison on today's test split is fair.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

from headswap.config import Params, RegistryConfig, SplitConfig, flatten_params
from headswap.errors import RegistryError
from headswap.io import atomic_write_text, output_files, parse_csv

CHAMPION, CHALLENGER = "champion", "challenger"
MANIFEST_ARTIFACT = "data/manifest.csv"
CHANGES_ARTIFACT = "data/changes.json"
VALIDATION_ARTIFACT = "data/validation.json"
SPLIT_TAGS = ("split_rule", "split_seed", "split_test_size", "split_val_size")
RAW_DATA = "data/raw"


@dataclass(frozen=True)
class StageFiles:
    """The pipeline files the register stage reads, relative to the project root."""

    dvc_lock: Path = Path("dvc.lock")
    raw_dvc: Path = Path("data/raw.dvc")  # before the ingest stage: data/raw was `dvc add`-ed
    manifest: Path = Path("data/prepared/manifest.csv")
    validation: Path = Path("data/prepared/validation.json")
    features_info: Path = Path("data/features/features_info.json")
    head_weights: Path = Path("models/head.pt")
    head_meta: Path = Path("models/head.json")
    model: Path = Path("models/model.onnx")
    parity: Path = Path("reports/export_parity.json")
    metrics: Path = Path("reports/metrics.json")
    plots: Path = Path("reports/plots")


@dataclass(frozen=True)
class Registration:
    """What ``models/registry.json`` records about the version a register run stands for.

    Attributes:
        registered_at: UTC time the version was registered (ISO 8601).
        data_changes: what changed in the data since the champion's (``changes_since``).
        reused: True when registry.json already described this model in this store and nothing
            was registered; not written to the file.
    """

    model_name: str
    version: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    aliases: list[str]
    model_uri: str
    registered_at: str = ""
    onnx_sha256: str = ""
    data_md5: str = ""
    data_changes: dict = field(default_factory=dict)
    reused: bool = False

    def to_json(self) -> str:
        record = asdict(self)
        del record["reused"]
        return json.dumps(record, indent=2)

    @classmethod
    def from_record(cls, record: dict, reused: bool = False) -> Registration:
        """From a registry.json written by this or an earlier version (missing keys default)."""
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        return cls(**{**known, "reused": reused})


def tracking_uri(project_root: Path = Path(".")) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded sqlite store at the project root.

    Every MLflow client headswap makes is made with this URI, so this is also where the one
    retry policy for talking to it is put in force (``apply_http_retry_policy``).
    """
    uri = (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root.resolve() / 'mlflow.db'}"
    )
    apply_http_retry_policy(uri)
    return uri


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``start_run``, ``log_*``, ``register_model``) at uri for a block.

    ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI`` into ``os.environ`` so that
    subprocesses inherit it. Left in place, a long-lived process (a served Prefect deployment, a
    test session) would carry one workspace's store into every later run and every ``dvc repro``
    it starts, so the previous value is put back on the way out.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        # None clears both MLflow's global and the environment variable.
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of metrics.json as a dotted MLflow metric name."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int | float):
            flat[name] = float(value)
    return flat


def test_fingerprint(manifest_rows: list[dict]) -> str:
    """Hash of the sorted test-image sha256s (informational: the gate checks splits, not this)."""
    hashes = sorted(row["sha256"] for row in manifest_rows if row["split"] == "test")
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def data_md5(files: StageFiles) -> str:
    """The DVC md5 of data/raw: the ingest stage's output in dvc.lock, else data/raw.dvc.

    Returns ``"untracked"`` when neither records it (a workspace run without DVC).
    """
    if files.dvc_lock.is_file():
        lock = yaml.safe_load(files.dvc_lock.read_text()) or {}
        outs = (lock.get("stages") or {}).get("ingest", {}).get("outs") or []
        for out in outs:
            if out.get("path") == RAW_DATA and out.get("md5"):
                return str(out["md5"])
    if files.raw_dvc.is_file():
        raw = yaml.safe_load(files.raw_dvc.read_text()) or {}
        return str((raw.get("outs") or [{}])[0].get("md5", "untracked"))
    return "untracked"


def split_tags(split: SplitConfig) -> dict[str, str]:
    """The tags that say how a version's images were split; equal tags mean equal splits."""
    from headswap.data import SPLIT_RULE

    return {
        "split_rule": SPLIT_RULE,
        "split_seed": str(split.seed),
        "split_test_size": str(float(split.test_size)),
        "split_val_size": str(float(split.val_size)),
    }


def content_column(*manifests: list[dict]) -> str:
    """The manifest column that identifies an image's content in every one of ``manifests``.

    ``pixels_sha256`` (decoded pixels: a re-encoded copy is the same image) when all rows have
    it, else ``sha256`` (file bytes), so manifests written before the column still compare.
    """
    rows = [row for manifest in manifests for row in manifest]
    return "pixels_sha256" if rows and all(row.get("pixels_sha256") for row in rows) else "sha256"


def manifest_changes(old_rows: list[dict], new_rows: list[dict]) -> dict:
    """Per class, the images added, removed and changed from ``old_rows`` to ``new_rows``.

    Rows are keyed by path. ``changed`` counts a path whose content or label differs, and an
    image that moved to another class folder (same content under a new path and label), under
    its new class; an image merely renamed within its class counts as nothing.

    Returns:
        ``{"per_class": {class: {"added", "removed", "changed"}}, "total": {...}}``.
    """
    key = content_column(old_rows, new_rows)
    old = {row["path"]: row for row in old_rows}
    new = {row["path"]: row for row in new_rows}
    added = [new[path] for path in sorted(new.keys() - old.keys())]
    removed = [old[path] for path in sorted(old.keys() - new.keys())]
    gone = {row[key]: row for row in removed}
    moved = {row[key] for row in added} & gone.keys()
    counts = {label: {"added": 0, "removed": 0, "changed": 0} for label in _labels(new_rows)}
    for label in _labels(old_rows):
        counts.setdefault(label, {"added": 0, "removed": 0, "changed": 0})
    for path in sorted(new.keys() & old.keys()):
        if (new[path][key], new[path]["label"]) != (old[path][key], old[path]["label"]):
            counts[new[path]["label"]]["changed"] += 1
    for row in added:
        if row[key] not in moved:
            counts[row["label"]]["added"] += 1
        elif gone[row[key]]["label"] != row["label"]:
            counts[row["label"]]["changed"] += 1
    for row in removed:
        if row[key] not in moved:
            counts[row["label"]]["removed"] += 1
    total = {
        kind: sum(c[kind] for c in counts.values()) for kind in ("added", "removed", "changed")
    }
    return {"per_class": counts, "total": total}


def _labels(rows: list[dict]) -> list[str]:
    return sorted({row["label"] for row in rows})


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def lineage(
    files: StageFiles, manifest_rows: list[dict], split: SplitConfig, classes: list[str]
) -> dict[str, str]:
    """Tags that let anyone trace a model version back to its data, split, code and features."""
    features = json.loads(files.features_info.read_text())
    return {
        "onnx_sha256": file_sha256(files.model),
        "data_md5": data_md5(files),
        **split_tags(split),
        "classes": json.dumps(classes),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "backbone": features["identity"]["backbone"],
        "weights_sha256": features["identity"]["weights_sha256"],
        # Further bodies (backbone.ensemble), as name@size:weights-sha256 prefix; "" for none.
        "ensemble": ", ".join(
            f"{m['backbone']}@{m['preprocessing']['size']}:{m['weights_sha256'][:12]}"
            for m in features["identity"].get("ensemble", [])
        ),
        "feature_cache_key": features["cache_key"],
        "test_fingerprint": test_fingerprint(manifest_rows),
        "dvc_experiment": os.environ.get("HEADSWAP_DVC_EXPERIMENT", "workspace"),
        "prefect_flow_run_id": os.environ.get("HEADSWAP_PREFECT_FLOW_RUN_ID", ""),
        "registered_by": getpass.getuser(),
    }


# --- talking to the tracking store: one retry policy ---------------------------------------
#
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
REDO_STAGE = "re-run `dvc repro` (it redoes only this stage)"
# What a person can do about a tracking store that does not answer.
CHECK_SERVER = (
    "Check that the server is running and reachable at that address (or unset "
    "MLFLOW_TRACKING_URI to use the embedded store)"
)


def apply_http_retry_policy(uri: str) -> None:
    """Give MLflow's HTTP client headswap's retry defaults (unless set) and retry progress lines.

    Idempotent and cheap: ``tracking_uri`` calls it, and every headswap MLflow client is made
    with that URI, so the policy is in force before any request is sent.
    """
    for key, value in HTTP_RETRY_POLICY.items():
        os.environ.setdefault(key, value)
    import logging

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
    from urllib.parse import urlsplit

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


def gate_tags(parity_path: Path, validation: dict) -> dict[str, str]:
    """Tags recording the gates this model passed; refuses a model whose ONNX parity failed.

    Raises:
        RegistryError: the parity report is missing or says the check failed.
    """
    parity = json.loads(parity_path.read_text()) if parity_path.is_file() else {}
    if parity.get("passed") is not True:
        raise RegistryError(
            f"{parity_path}: the ONNX parity check did not pass (max |onnx - torch| "
            f"{parity.get('max_abs_diff', 'unknown')}, export.parity_atol "
            f"{parity.get('atol', 'unknown')}); refusing to register or alias this model. "
            "Re-run `dvc repro export` and fix the export first."
        )
    return {
        "parity_passed": "true",
        "parity_max_abs_diff": f"{parity['max_abs_diff']:.3e}",
        "skipped_files": str(len(validation.get("skipped", []))),
    }


def _signature(size: int, n_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), "pixels")]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, n_classes), "probabilities"),
                TensorSpec(np.dtype(np.int64), (-1,), "label"),
            ]
        ),
    )


def _ensure_experiment(client, name: str, root: Path) -> str:
    existing = client.get_experiment_by_name(name)
    if existing:
        return existing.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        # Embedded default: keep artifacts beside mlflow.db, not in whatever the cwd happens to be.
        location = (root.resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _log_run_contents(
    params: Params, files: StageFiles, metrics: dict, validation: dict, changes: dict
) -> None:
    import mlflow

    mlflow.log_params(flatten_params(params))
    mlflow.log_metric("data.skipped_files", len(validation.get("skipped", [])))
    mlflow.log_metrics(
        flatten_metrics({k: v for k, v in metrics.items() if k != "confusion_matrix"})
    )
    mlflow.log_dict(validation["counts"], "data/manifest_summary.json")
    # Which images this version trained, validated and tested on: a later promotion reads it to
    # check that the test images it compares on were never in this version's training data.
    mlflow.log_text(files.manifest.read_text(), MANIFEST_ARTIFACT)
    mlflow.log_dict(changes, CHANGES_ARTIFACT)
    for path in (files.metrics, files.parity, files.validation, files.features_info):
        mlflow.log_artifact(str(path), "reports" if path.parent.name == "reports" else "data")
    if files.plots.is_dir():
        # File by file, not the folder: a killed run's temp files are never uploaded.
        for plot in output_files(files.plots):
            mlflow.log_artifact(str(plot), "plots")
    mlflow.log_artifact(str(files.head_weights), "head")
    mlflow.log_artifact(str(files.head_meta), "head")


def log_onnx_model(
    experiment_id: str,
    name: str,
    model_path: Path,
    tags: dict[str, str],
    log_contents: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """One MLflow run holding the ONNX model (registered as ``name``); returns (run id, version).

    ``log_contents`` logs the rest of the run (params, metrics, artifacts) inside the same run.
    """
    import mlflow
    import onnx

    meta = _onnx_meta(model_path)
    size, n_classes = int(meta["headswap.image_size"]), len(json.loads(meta["headswap.classes"]))
    with fluent_tracking_uri(tracking_uri()):
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.set_tags({f"headswap.{k}": v for k, v in tags.items()})
            if log_contents is not None:
                log_contents()
            info = mlflow.onnx.log_model(
                onnx.load(str(model_path)),
                name="model",
                signature=_signature(size, n_classes),
                input_example=np.zeros((1, 3, size, size), dtype=np.float32),
                onnx_execution_providers=["CPUExecutionProvider"],
                # The flavor's own pins; inferring them costs a subprocess (~6 s) per model.
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                save_as_external_data=False,
            )
        # The version is created with its lineage tags in one request, so a server lost between
        # two calls can never leave a version without them; aliases come later.
        version = mlflow.register_model(info.model_uri, name, tags=tags).version
    return run.info.run_id, str(version)


# --- reading what the store holds ----------------------------------------------------------


def _is_missing(error: Exception) -> bool:
    text = str(error).lower()
    return getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or (
        "not found" in text or "does not exist" in text
    )


def find_version(client, name: str, version: str):
    """The store's ``name`` version ``version``, or None when it has no such model or version."""
    if not str(version).isdigit():
        return None
    try:
        return client.get_model_version(name, str(version))
    except Exception as error:  # noqa: BLE001 - RestException / MlflowException
        if _is_missing(error):
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


def version_classes(client, version) -> list[str] | None:
    """A version's classes in output order: its tag, else its run's validation report."""
    if version.tags.get("classes"):
        return json.loads(version.tags["classes"])
    text = (
        run_artifact_text(client, version.run_id, VALIDATION_ARTIFACT) if version.run_id else None
    )
    return None if text is None else json.loads(text).get("classes")


def check_label_set(client, name: str, classes: list[str]) -> None:
    """Refuse to add a version whose class list differs from the model's latest version.

    Raises:
        RegistryError: the model exists and its latest version predicts other classes.
    """
    versions = client.search_model_versions(f"name='{name}'")
    latest = max(versions, key=lambda v: int(v.version), default=None)
    registered = version_classes(client, latest) if latest is not None else None
    if registered is not None and registered != classes:
        raise RegistryError(
            f"model {name} (latest v{latest.version}) predicts classes {registered}, but this "
            f"run's data has classes {classes}; a model's versions must share one label set: "
            "set registry.model_name to a new name for this data (or restore data.source)"
        )


def changes_since_champion(client, name: str, manifest_rows: list[dict]) -> dict:
    """What changed in the data since the champion's (``manifest_changes``), for registry.json.

    Returns:
        ``since_version``, ``since_data_md5``, ``per_class``, ``total`` and ``note`` (why there
        is nothing to compare with: no champion, or a champion that recorded no manifest).
    """
    nothing = {"since_version": None, "since_data_md5": None, "per_class": {}, "total": {}}
    champion = alias_version(client, name, CHAMPION)
    if champion is None:
        return {**nothing, "note": f"{name} has no champion yet: nothing to compare with"}
    since = {
        "since_version": champion,
        "since_data_md5": client.get_model_version(name, champion).tags.get("data_md5"),
    }
    old_rows = version_manifest(client, name, champion)
    if old_rows is None:
        note = f"champion v{champion} has no {MANIFEST_ARTIFACT} (registered before split records)"
        return {**nothing, **since, "note": note}
    return {**since, **manifest_changes(old_rows, manifest_rows), "note": None}


def reusable_registration(
    out_path: Path, client, name: str, uri: str, tags: dict[str, str]
) -> Registration | None:
    """The registration ``out_path`` records, if the store in use holds exactly it: the same
    store, model, version and run, built from the same ONNX file and data. Else None."""
    try:
        recorded = json.loads(out_path.read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("tracking_uri") != uri or recorded.get("model_name") != name:
        return None
    version = tracking_call(
        lambda: find_version(client, name, str(recorded.get("version"))),
        "reading the registered version",
        REDO_STAGE,
    )
    if version is None or version.run_id != recorded.get("run_id"):
        return None
    if any(version.tags.get(key) != tags[key] for key in ("onnx_sha256", "data_md5")):
        return None
    return Registration.from_record(recorded, reused=True)


# --- the register stage --------------------------------------------------------------------


def register_model(params: Params, files: StageFiles, out_path: Path) -> Registration:
    """Log the run, register the ONNX model, set aliases, tags and the model card.

    Writes ``models/registry.json``, unless it already describes this exact model and data in
    the store in use: then nothing is registered, the file is left untouched and the returned
    registration has ``reused`` set. With ``registry.auto_promote`` a new version then goes
    through the promotion gate against the current champion.

    Raises:
        RegistryError: parity failed, the class list differs from the registered model's, or
            the store cannot be reached.
    """
    from mlflow import MlflowClient

    from headswap.data import read_manifest

    uri = tracking_uri()
    client = MlflowClient(uri)
    name = params.registry.model_name
    validation = json.loads(files.validation.read_text())
    rows = read_manifest(files.manifest)
    tags = lineage(files, rows, params.data.split, validation["classes"])
    reused = reusable_registration(out_path, client, name, uri, tags)
    if reused is not None:
        return reused
    tags.update(gate_tags(files.parity, validation))
    tracking_call(
        lambda: check_label_set(client, name, validation["classes"]),
        "checking the class list",
        REDO_STAGE,
    )
    changes = tracking_call(
        lambda: changes_since_champion(client, name, rows),
        "comparing with the champion's data",
        REDO_STAGE,
    )
    registration = _register_new_version(params, files, tags, changes, client)
    atomic_write_text(out_path, registration.to_json())
    return registration


def _register_new_version(
    params: Params, files: StageFiles, tags: dict[str, str], changes: dict, client
) -> Registration:
    name = params.registry.model_name
    metrics = json.loads(files.metrics.read_text())
    validation = json.loads(files.validation.read_text())
    experiment_id = tracking_call(
        lambda: _ensure_experiment(client, params.registry.experiment, Path(".")),
        "create experiment",
        REDO_STAGE,
    )
    run_id, version = tracking_call(
        lambda: log_onnx_model(
            experiment_id,
            name,
            files.model,
            tags,
            lambda: _log_run_contents(params, files, metrics, validation, changes),
        ),
        "logging the MLflow run",
        REDO_STAGE,
    )
    aliases = finish_registration(client, params.registry, version)
    head = json.loads(files.head_meta.read_text())
    tracking_call(
        lambda: attach_model_card(
            client, name, version, run_id, tags, metrics, validation, head, changes
        ),
        "attaching the model card",
        REDO_STAGE,
    )
    if params.registry.auto_promote and CHAMPION not in aliases:
        aliases += _auto_promote(params, version)
    return Registration(
        name,
        version,
        run_id,
        experiment_id,
        tracking_uri(),
        aliases,
        f"models:/{name}/{version}",
        registered_at=datetime.now(UTC).isoformat(timespec="seconds"),
        onnx_sha256=tags["onnx_sha256"],
        data_md5=tags["data_md5"],
        data_changes=changes,
    )


def finish_registration(client, registry: RegistryConfig, version: str) -> list[str]:
    """Set ``challenger`` on the new version, and ``champion`` if the model has none yet."""
    from headswap.promotion import record_initial_champion

    name = registry.model_name
    tracking_call(
        lambda: client.set_registered_model_alias(name, CHALLENGER, version),
        "setting aliases",
        REDO_STAGE,
    )
    if record_initial_champion(client, registry, version):
        return [CHALLENGER, CHAMPION]
    return [CHALLENGER]


def attach_model_card(
    client,
    name: str,
    version: str,
    run_id: str,
    tags: dict[str, str],
    metrics: dict,
    validation: dict,
    head: dict,
    changes: dict | None = None,
) -> str:
    """Log ``model_card.md`` to the run and set it as the version's description."""
    from headswap.modelcard import as_description, render_model_card

    card = render_model_card(name, version, run_id, tags, metrics, validation, head, changes)
    client.log_text(run_id, card, "model_card.md")
    client.update_model_version(name, version, description=as_description(card, "model_card.md"))
    return card


def _auto_promote(params: Params, version: str) -> list[str]:
    """Try the promotion gate for the version just registered; a refusal is not a failure."""
    from headswap.promotion import PromotionFiles, promote_version

    outcome = promote_version(
        params.registry,
        PromotionFiles(),
        version=int(version),
        reason="registry.auto_promote after register",
        split=params.data.split,
    )
    print(f"auto_promote: {outcome.message}")
    return [CHAMPION] if outcome.promoted else []


def _onnx_meta(model_path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}


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


_alias_version = alias_version  # the spine's name, kept for callers outside this module
