"""The `predict` flow and command against a real registry: where they may write and read, and
which registered models they trust.

The workspace is a tmp folder that is the cwd, with MLFLOW_TRACKING_URI unset, so headswap uses
its embedded ``sqlite:///<cwd>/mlflow.db`` store. The models are tiny real ONNX graphs with
headswap's interface (see registry_gate/conftest.py), registered through the register stage's
own functions with the ``onnx_sha256`` tag the register stage writes.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from registry_gate.conftest import TINY_CLASSES, tiny_model, write_images

from tests.helpers.workspace import tool_env

GOOD = (20.0, 0.51)
OTHER = (-20.0, 0.51)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A workspace (data/raw images) that is the cwd, and a folder beside it to protect."""
    top = tmp_path_factory.mktemp("predict-trust")
    root = top / "ws"
    write_images(root / "data" / "raw", per_class=6)
    (top / "outside").mkdir()
    (top / "outside" / "victim.txt").write_text("keep me")
    write_images(top / "outside" / "images", per_class=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield root


@pytest.fixture
def model_name(store) -> str:
    """A fresh model name, written into the workspace's params.yaml as registry.model_name."""
    name = f"trust-{uuid.uuid4().hex[:8]}"
    (store / "params.yaml").write_text(yaml.safe_dump({"registry": {"model_name": name}}))
    return name


def register(root: Path, name: str, slope_cut=GOOD, hashed: bool = True) -> str:
    """Register a tiny model as the register stage does (first version becomes champion)."""
    import json

    import mlflow

    from headswap.config import RegistryConfig
    from headswap.io import file_sha256
    from headswap.register import finish_registration, log_onnx_model
    from headswap.tracking import client, ensure_experiment, tracking_uri

    path = tiny_model(root / f"model-{uuid.uuid4().hex[:8]}.onnx", *slope_cut)
    tags = {"classes": json.dumps(TINY_CLASSES), "backbone": "tiny-brightness"}
    if hashed:
        tags["onnx_sha256"] = file_sha256(path)
    experiment = ensure_experiment(client(), "headswap-tests", root)
    mlflow.set_tracking_uri(tracking_uri())
    _, version = log_onnx_model(experiment, name, path, tags)
    finish_registration(client(), RegistryConfig(model_name=name, lock_wait_s=60), version)
    return version


def all_files(top: Path) -> set[Path]:
    return {p for p in top.rglob("*") if p.name != "mlflow.db" and "mlartifacts" not in p.parts}


def stderr_lines(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


# --- item 1: the served flow writes and reads only under the predict roots -------------------


@pytest.mark.parametrize(
    "out", ["../x.csv", "{top}/x.csv", "link/x.csv", "../../outside/victim.txt"]
)
def test_the_flow_refuses_an_out_outside_out_dir_and_writes_nothing(store, model_name, out):
    from flows.predict import predict
    from headswap.predict import PredictError

    register(store, model_name)  # a champion exists: only the out check stands in the way
    (store / "predictions").mkdir(exist_ok=True)
    link = store / "predictions" / "link"
    if not link.is_symlink():
        link.symlink_to(store.parent)
    before = all_files(store.parent)
    with pytest.raises(PredictError, match=r"outside predict\.out_dir .* in params\.yaml") as no:
        predict.fn("data/raw", out.format(top=store.parent))
    assert "\n" not in str(no.value)
    assert all_files(store.parent) == before
    assert (store.parent / "outside" / "victim.txt").read_text() == "keep me"


@pytest.mark.parametrize("folder", ["{top}/outside/images", "data/../../outside/images", "data/in"])
def test_the_flow_refuses_a_folder_outside_the_input_roots(store, model_name, folder):
    from flows.predict import predict
    from headswap.predict import PredictError

    register(store, model_name)
    if not (store / "data" / "in").is_symlink():
        (store / "data" / "in").symlink_to(store.parent / "outside" / "images")
    before = all_files(store.parent)
    with pytest.raises(PredictError, match=r"outside predict\.input_roots"):
        predict.fn(folder.format(top=store.parent), "p.csv")
    assert all_files(store.parent) == before


def test_the_cli_writes_under_out_dir_by_default_and_where_an_explicit_out_says(
    store, model_name, tmp_path
):
    from typer.testing import CliRunner

    from headswap.cli import app

    register(store, model_name)
    runner = CliRunner()
    default = runner.invoke(app, ["predict", "data/raw"])
    assert default.exit_code == 0, default.output
    assert len((store / "predictions" / "predictions.csv").read_text().splitlines()) == 13
    explicit = runner.invoke(app, ["predict", "data/raw", "--out", str(tmp_path / "mine.csv")])
    assert explicit.exit_code == 0, explicit.output
    assert len((tmp_path / "mine.csv").read_text().splitlines()) == 13


@pytest.mark.slow  # starts an ephemeral Prefect server
def test_the_real_flow_writes_under_out_dir_and_fails_a_run_that_leads_out(store, model_name):
    register(store, model_name)
    script = (
        "from flows.predict import predict\n"
        "result = predict('data/raw', 'batch/1.csv')\n"
        "print('ROWS', result['rows'], result['out'])\n"
        "state = predict('data/raw', '../escaped.csv', return_state=True)\n"
        "print('STATE', state.type.value, state.message)\n"
    )
    env = tool_env(PREFECT_HOME=str(store.parent / "prefect"))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = store / "predictions" / "batch" / "1.csv"
    assert f"ROWS 12 {written.resolve()}" in done.stdout
    assert "STATE FAILED" in done.stdout and "predict.out_dir" in done.stdout
    assert not (store.parent / "escaped.csv").exists()


# --- item 5: the downloaded model is the registered one; a hand-moved champion is noticed -----


def test_a_stored_model_file_that_differs_from_its_sha256_tag_is_refused(
    store, model_name, tmp_path
):
    from headswap.config import RegistryConfig
    from headswap.io import file_sha256
    from headswap.predict import ModelIntegrityError, champion_uri, partial_path, predict_images
    from headswap.tracking import client, find_version

    version = register(store, model_name)
    found = find_version(client(), model_name, version)
    logged = client().get_logged_model(found.source.removeprefix("models:/"))
    stored = Path(urlparse(logged.artifact_location).path) / "model.onnx"
    assert file_sha256(stored) == found.tags["onnx_sha256"]
    tiny_model(stored, *OTHER)  # someone with write access to the artifact store swaps the file
    out = tmp_path / "p.csv"
    uri = champion_uri(RegistryConfig(model_name=model_name))
    with pytest.raises(ModelIntegrityError, match=f"{model_name} v{version}: .* sha256") as bad:
        predict_images(uri, [store / "data" / "raw"], out)
    assert "\n" not in str(bad.value) and "onnx_sha256 tag" in str(bad.value)
    assert not out.exists() and not partial_path(out).exists()


def test_a_version_without_the_tag_is_used_with_one_warning(store, model_name, tmp_path, capfd):
    from headswap.predict import predict_images

    version = register(store, model_name, hashed=False)
    capfd.readouterr()
    result = predict_images(
        f"models:/{model_name}/{version}", [store / "data" / "raw"], tmp_path / "p.csv"
    )
    warnings = [line for line in stderr_lines(capfd) if line.startswith("warning:")]
    assert warnings == [
        f"warning: {model_name} v{version} has no onnx_sha256 tag (registered before versions "
        "recorded it): its file cannot be verified"
    ]
    assert result.rows == 12 and result.errors == 0


def test_a_champion_moved_by_hand_is_warned_about_until_an_audited_move(store, model_name, capfd):
    from headswap.config import RegistryConfig
    from headswap.predict import champion_uri, pin_alias
    from headswap.promotion.audit import champion_provenance, out_of_band_champion
    from headswap.promotion.promote import rollback
    from headswap.tracking import client

    first = register(store, model_name)
    second = register(store, model_name, OTHER)
    registry = RegistryConfig(model_name=model_name, lock_wait_s=60)
    capfd.readouterr()
    assert pin_alias(champion_uri(registry))[0] == f"models:/{model_name}/{first}"
    assert champion_provenance(client(), model_name) is None
    assert stderr_lines(capfd) == []

    client().set_registered_model_alias(model_name, "champion", second)  # the UI's alias pencil
    assert pin_alias(champion_uri(registry))[0] == f"models:/{model_name}/{second}"
    (line,) = stderr_lines(capfd)
    assert line.startswith(f"warning: {model_name}@champion is v{second}, which was never gated")
    found = out_of_band_champion(client(), model_name)
    assert (found.current, found.audited) == (second, first) and found.audited_at
    assert found.audited_at in line

    rollback(registry, reason="undo the hand-made move")  # audited: the warning goes away
    assert champion_provenance(client(), model_name) is None


def test_a_champion_with_no_audited_move_at_all_is_warned_about(store, model_name):
    import mlflow

    from headswap.promotion.audit import champion_provenance
    from headswap.register import log_onnx_model
    from headswap.tracking import client, ensure_experiment, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    experiment = ensure_experiment(client(), "headswap-tests", store)
    path = tiny_model(store / f"model-{uuid.uuid4().hex[:8]}.onnx", *GOOD)
    _, version = log_onnx_model(experiment, model_name, path, {})
    assert champion_provenance(client(), model_name) is None  # no champion: nothing to say
    client().set_registered_model_alias(model_name, "champion", version)
    assert "no promotion, rollback or first registration" in champion_provenance(
        client(), model_name
    )


# --- item 6 through the registry: rows reach the CSV whatever the file names are ------------


def test_a_non_utf8_name_is_scored_and_escaped_with_a_registered_model(store, model_name, tmp_path):
    from headswap.config import RegistryConfig
    from headswap.predict import champion_uri, pin_alias, predict_images

    register(store, model_name)
    folder = tmp_path / "in"
    folder.mkdir()
    source = next((store / "data" / "raw" / "bright").iterdir())
    Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")).write_bytes(source.read_bytes())
    uri, _ = pin_alias(champion_uri(RegistryConfig(model_name=model_name)))
    predict_images(uri, [folder], tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["path"] == "caf\\xe9.png" and row["predicted"] in TINY_CLASSES and not row["error"]
