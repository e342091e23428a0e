"""The register stage: one MLflow run per pipeline run, the ONNX model in the model registry.

Aliases, never stages: ``challenger`` marks every registered version that passed its gates
(export parity), ``champion`` moves only through the promotion gate, except that the very first
version of a model becomes champion so that ``models:/<name>@champion`` always resolves.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from headswap.config import Params, RegistryConfig, flatten_params
from headswap.errors import RegistryError
from headswap.io import atomic_write_text

CHAMPION, CHALLENGER = "champion", "challenger"
RETRY_DELAYS_S = (1, 2, 4, 8)


@dataclass(frozen=True)
class StageFiles:
    """The pipeline files the register stage reads, relative to the project root."""

    raw_dvc: Path = Path("data/raw.dvc")
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
    model_name: str
    version: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    aliases: list[str]
    model_uri: str


def tracking_uri(project_root: Path = Path(".")) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded sqlite store at the project root."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root.resolve() / 'mlflow.db'}"
    )


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
    """Hash of the sorted test-image sha256s: two models are comparable only if these match."""
    hashes = sorted(row["sha256"] for row in manifest_rows if row["split"] == "test")
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def lineage(files: StageFiles, manifest_rows: list[dict]) -> dict[str, str]:
    """Tags that let anyone trace a model version back to its data, code and features."""
    raw = yaml.safe_load(files.raw_dvc.read_text()) if files.raw_dvc.is_file() else {}
    features = json.loads(files.features_info.read_text())
    return {
        "data_md5": str((raw.get("outs") or [{}])[0].get("md5", "untracked")),
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


def with_retries(action, what: str):
    """Run ``action``; on connection-type failures retry with backoff, then fail clearly."""
    for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
        try:
            return action()
        except RegistryError:
            raise
        except Exception as error:  # noqa: BLE001 - MLflow raises many types for a dead server
            if delay is None or not _is_transient(error):
                raise RegistryError(
                    f"{what} failed after {attempt} attempt(s) against {tracking_uri()}: {error}. "
                    "Check that the MLflow server is running (or unset MLFLOW_TRACKING_URI to "
                    "use the embedded store), then re-run; `dvc repro` will redo only this stage."
                ) from None
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_transient(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(
        word in text
        for word in ("connection", "timeout", "temporarily", "max retries", "locked", "503", "502")
    )


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


def _log_run_contents(params: Params, files: StageFiles, metrics: dict, validation: dict) -> None:
    import mlflow

    mlflow.log_params(flatten_params(params))
    mlflow.log_metric("data.skipped_files", len(validation.get("skipped", [])))
    mlflow.log_metrics(
        flatten_metrics({k: v for k, v in metrics.items() if k != "confusion_matrix"})
    )
    mlflow.log_dict(validation["counts"], "data/manifest_summary.json")
    for path in (files.metrics, files.parity, files.validation, files.features_info):
        mlflow.log_artifact(str(path), "reports" if path.parent.name == "reports" else "data")
    if files.plots.is_dir():
        mlflow.log_artifacts(str(files.plots), "plots")
    mlflow.log_artifact(str(files.head_weights), "head")
    mlflow.log_artifact(str(files.head_meta), "head")


def log_onnx_model(
    experiment_id: str, name: str, model_path: Path, tags: dict[str, str], log_contents=None
) -> tuple[str, str]:
    """One MLflow run holding the ONNX model (registered as ``name``); returns (run id, version).

    ``log_contents`` logs the rest of the run (params, metrics, artifacts) inside the same run.
    """
    import mlflow
    import onnx

    meta = _onnx_meta(model_path)
    size, n_classes = int(meta["headswap.image_size"]), len(json.loads(meta["headswap.classes"]))
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
            # The flavor's own pins; inferring them instead costs a subprocess (~6 s) per model.
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            save_as_external_data=False,
        )
    # The version is created with its lineage tags in one request, so a server lost between
    # two calls can never leave a version without them; aliases come later.
    version = mlflow.register_model(info.model_uri, name, tags=tags).version
    return run.info.run_id, str(version)


def register_model(params: Params, files: StageFiles, out_path: Path) -> Registration:
    """Log the run, register the ONNX model, set aliases, tags and the model card.

    Writes ``models/registry.json``. With ``registry.auto_promote`` the new version then goes
    through the promotion gate against the current champion.
    """
    import mlflow
    from mlflow import MlflowClient

    from headswap.data import read_manifest

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    name = params.registry.model_name
    metrics = json.loads(files.metrics.read_text())
    validation = json.loads(files.validation.read_text())
    tags = {**lineage(files, read_manifest(files.manifest)), **gate_tags(files.parity, validation)}

    experiment_id = with_retries(
        lambda: _ensure_experiment(client, params.registry.experiment, Path(".")),
        "create experiment",
    )
    run_id, version = with_retries(
        lambda: log_onnx_model(
            experiment_id,
            name,
            files.model,
            tags,
            lambda: _log_run_contents(params, files, metrics, validation),
        ),
        "logging the MLflow run",
    )
    aliases = finish_registration(client, params.registry, version)
    head = json.loads(files.head_meta.read_text())
    with_retries(
        lambda: attach_model_card(client, name, version, run_id, tags, metrics, validation, head),
        "attaching the model card",
    )
    if params.registry.auto_promote and CHAMPION not in aliases:
        aliases += _auto_promote(params, version)
    registration = Registration(
        name, version, run_id, experiment_id, uri, aliases, f"models:/{name}/{version}"
    )
    atomic_write_text(out_path, json.dumps(asdict(registration), indent=2))
    return registration


def finish_registration(client, registry: RegistryConfig, version: str) -> list[str]:
    """Set ``challenger`` on the new version, and ``champion`` if the model has none yet."""
    from headswap.promotion import record_initial_champion

    name = registry.model_name
    with_retries(
        lambda: client.set_registered_model_alias(name, CHALLENGER, version), "setting aliases"
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
) -> str:
    """Log ``model_card.md`` to the run and set it as the version's description."""
    from headswap.modelcard import as_description, render_model_card

    card = render_model_card(name, version, run_id, tags, metrics, validation, head)
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
    )
    print(f"auto_promote: {outcome.message}")
    return [CHAMPION] if outcome.promoted else []


def _onnx_meta(model_path: Path) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return {prop.key: prop.value for prop in proto.metadata_props}


def alias_version(client, name: str, alias: str) -> str | None:
    """The version number behind ``name@alias``, or None if the alias is not set."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - MLflow raises RestException/MlflowException for "no alias"
        return None


_alias_version = alias_version  # the spine's name, kept for callers outside this module
