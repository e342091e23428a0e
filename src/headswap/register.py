"""The register stage: one MLflow run per pipeline run, the ONNX model in the model registry.

Aliases, never stages: ``challenger`` marks every registered version that passed its gates
(export parity), ``champion`` moves only through the promotion gate, except that the very first
version of a model becomes champion so that ``models:/<name>@champion`` always resolves.

DVC runs this stage on every ``dvc repro`` (the registry lives outside the repository), so it
registers only when ``models/registry.json`` does not already describe this exact model, data
and tracking store. Every version carries its lineage (ONNX and data hashes, the split rule and
settings, the class list) and its manifest as the run artifact ``data/manifest.csv``: that is what
lets a later promotion check that a comparison on today's test split is fair.

Talking to the store goes through ``headswap.tracking`` (one retry policy, one-line errors);
moving ``champion`` goes through ``headswap.promotion.promote`` (the lock and the audit).
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

from headswap import paths
from headswap.config import Params, RegistryConfig, SplitConfig
from headswap.errors import RegistryError
from headswap.io import atomic_write_text, file_sha256, flatten, output_files
from headswap.lineage import manifest_changes, split_tags, test_fingerprint
from headswap.manifest import read_manifest
from headswap.modelcard import as_description, render_model_card
from headswap.promotion.promote import promote_version, record_initial_champion
from headswap.promotion.scoring import PromotionFiles
from headswap.tracking import (
    CHALLENGER,
    CHAMPION,
    MANIFEST_ARTIFACT,
    alias_version,
    ensure_experiment,
    find_version,
    fluent_tracking_uri,
    run_artifact_text,
    tracking_call,
    tracking_uri,
    version_manifest,
)

CHANGES_ARTIFACT = "data/changes.json"
VALIDATION_ARTIFACT = "data/validation.json"
REDO_STAGE = "re-run `dvc repro` (it redoes only this stage)"


@dataclass(frozen=True)
class StageFiles:
    """The pipeline files the register stage reads, relative to the project root."""

    dvc_lock: Path = paths.DVC_LOCK
    raw_dvc: Path = paths.RAW_DVC
    manifest: Path = paths.MANIFEST
    validation: Path = paths.VALIDATION
    features_info: Path = paths.FEATURES_INFO
    head_weights: Path = paths.HEAD_WEIGHTS
    head_meta: Path = paths.HEAD_META
    model: Path = paths.MODEL
    parity: Path = paths.PARITY
    metrics: Path = paths.METRICS
    plots: Path = paths.PLOTS_DIR


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


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """Every numeric leaf of metrics.json as a dotted MLflow metric name (flags and nulls left
    out)."""
    return {
        name: float(value)
        for name, value in flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def data_md5(files: StageFiles) -> str:
    """The DVC md5 of data/raw: the ingest stage's output in dvc.lock, else data/raw.dvc.

    Returns ``"untracked"`` when neither records it (a workspace run without DVC).
    """
    if files.dvc_lock.is_file():
        lock = yaml.safe_load(files.dvc_lock.read_text()) or {}
        outs = (lock.get("stages") or {}).get("ingest", {}).get("outs") or []
        for out in outs:
            if out.get("path") == paths.RAW_DIR.as_posix() and out.get("md5"):
                return str(out["md5"])
    if files.raw_dvc.is_file():
        raw = yaml.safe_load(files.raw_dvc.read_text()) or {}
        return str((raw.get("outs") or [{}])[0].get("md5", "untracked"))
    return "untracked"


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def lineage_tags(
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


def _log_run_contents(
    params: Params, files: StageFiles, metrics: dict, validation: dict, changes: dict
) -> None:
    import mlflow

    mlflow.log_params(flatten(params.model_dump(mode="json")))
    mlflow.log_metric("data.skipped_files", len(validation.get("skipped", [])))
    mlflow.log_metrics(
        numeric_metrics({k: v for k, v in metrics.items() if k != "confusion_matrix"})
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


# --- what the store already holds ------------------------------------------------------------


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

    uri = tracking_uri()
    client = MlflowClient(uri)
    name = params.registry.model_name
    validation = json.loads(files.validation.read_text())
    rows = read_manifest(files.manifest)
    tags = lineage_tags(files, rows, params.data.split, validation["classes"])
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
        lambda: ensure_experiment(client, params.registry.experiment),
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
    card = render_model_card(name, version, run_id, tags, metrics, validation, head, changes)
    client.log_text(run_id, card, "model_card.md")
    client.update_model_version(name, version, description=as_description(card, "model_card.md"))
    return card


def _auto_promote(params: Params, version: str) -> list[str]:
    """Try the promotion gate for the version just registered; a refusal is not a failure."""
    outcome = promote_version(
        params.registry,
        PromotionFiles(cache_dir=params.features.cache_dir),
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
