"""Where the served `predict` flow may read and write: params.yaml's `predict` roots.

The flow resolves `folder` and `out` with these functions before it reads, downloads or writes
anything; the flow-level tests (with a real registered champion) are in
tests/integration/test_predict_trust.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from headswap.config import PredictConfig, load_params, parse_params
from headswap.errors import ConfigError
from headswap.predict import PredictError, served_input, served_output, served_paths

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A workspace with data/raw images and a folder outside it holding a file to protect."""
    root = tmp_path / "ws"
    (root / "data" / "raw" / "a").mkdir(parents=True)
    (root / "data" / "raw" / "a" / "x.png").write_bytes(b"")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim.txt").write_text("keep me")
    return root


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


def test_params_yaml_predict_section_matches_the_typed_defaults():
    assert load_params(REPO / "params.yaml").predict == PredictConfig()
    assert PredictConfig() == PredictConfig(out_dir="predictions", input_roots=["data"])


def test_predict_section_rejects_unknown_keys_and_empty_paths():
    with pytest.raises(ConfigError, match="predict.outdir"):
        parse_params({"predict": {"outdir": "x"}})
    with pytest.raises(ConfigError, match="predict.out_dir"):
        parse_params({"predict": {"out_dir": ""}})


def test_a_relative_out_is_a_file_under_out_dir(workspace):
    config = PredictConfig()
    base = (workspace / "predictions").resolve()
    assert served_output("batch-1.csv", config, workspace) == base / "batch-1.csv"
    assert served_output("2024/06/b.csv", config, workspace) == base / "2024" / "06" / "b.csv"
    assert served_output(str(base / "abs.csv"), config, workspace) == base / "abs.csv"
    # `..` that stays inside is fine: only where the path ends up counts
    assert served_output("sub/../c.csv", config, workspace) == base / "c.csv"


@pytest.mark.parametrize(
    "out",
    [
        "../x.csv",
        "../../outside/victim.txt",
        "{outside}/victim.txt",
        "/etc/passwd",
        "link/victim.txt",  # predictions/link -> ../outside
        "link",
        ".",  # the folder itself is not a file to write
    ],
)
def test_an_out_leading_outside_out_dir_is_refused_in_one_line(workspace, out):
    (workspace / "predictions").mkdir()
    (workspace / "predictions" / "link").symlink_to(workspace.parent / "outside")
    before = files_under(workspace.parent)
    out = out.format(outside=workspace.parent / "outside")
    with pytest.raises(PredictError, match=r"outside predict\.out_dir") as refused:
        served_output(out, PredictConfig(), workspace)
    assert "\n" not in str(refused.value) and "params.yaml" in str(refused.value)
    assert files_under(workspace.parent) == before
    assert (workspace.parent / "outside" / "victim.txt").read_text() == "keep me"


def test_an_out_that_is_a_symlink_to_a_file_outside_is_refused(workspace):
    (workspace / "predictions").mkdir()
    (workspace / "predictions" / "p.csv").symlink_to(workspace.parent / "outside" / "victim.txt")
    with pytest.raises(PredictError, match="victim.txt, outside predict.out_dir"):
        served_output("p.csv", PredictConfig(), workspace)


def test_out_dir_may_be_set_elsewhere_by_the_workspace_owner(workspace, tmp_path):
    config = PredictConfig(out_dir=str(tmp_path / "shared-preds"))
    assert served_output("b.csv", config, workspace) == (tmp_path / "shared-preds" / "b.csv")
    with pytest.raises(PredictError, match="outside predict.out_dir"):
        served_output("../b.csv", config, workspace)


def test_a_folder_under_an_input_root_is_accepted_and_resolved(workspace):
    raw = (workspace / "data" / "raw").resolve()
    assert served_input("data/raw", PredictConfig(), workspace) == raw
    assert served_input(str(raw / "a"), PredictConfig(), workspace) == raw / "a"
    assert served_input("data/raw/a/x.png", PredictConfig(), workspace) == raw / "a" / "x.png"


@pytest.mark.parametrize(
    "folder",
    ["{outside}", "data/../../outside", "..", ".", "data/raw/link", "data/raw/link/victim.txt"],
)
def test_a_folder_outside_the_input_roots_is_refused_in_one_line(workspace, folder):
    (workspace / "data" / "raw" / "link").symlink_to(workspace.parent / "outside")
    folder = folder.format(outside=workspace.parent / "outside")
    with pytest.raises(PredictError, match=r"outside predict\.input_roots") as refused:
        served_input(folder, PredictConfig(), workspace)
    assert "\n" not in str(refused.value)


def test_listed_input_roots_are_allowed_and_an_empty_list_allows_nothing(workspace):
    outside = workspace.parent / "outside"
    extra = PredictConfig(input_roots=["data", str(outside)])
    assert served_input(str(outside), extra, workspace) == outside.resolve()
    with pytest.raises(PredictError, match="none configured"):
        served_input("data/raw", PredictConfig(input_roots=[]), workspace)


def test_a_missing_folder_inside_a_root_is_one_line(workspace):
    with pytest.raises(PredictError, match="'data/new': no such file or folder"):
        served_input("data/new", PredictConfig(), workspace)


def test_served_paths_checks_both_before_anything_is_written(workspace):
    with pytest.raises(PredictError, match="out_dir"):
        served_paths("data/raw", "../x.csv", PredictConfig(), workspace)
    assert not (workspace / "predictions").exists() and not (workspace.parent / "x.csv").exists()
    source, target = served_paths("data/raw", "p.csv", PredictConfig(), workspace)
    assert target.parent == (workspace / "predictions").resolve() and source.name == "raw"


def test_malformed_paths_are_refused_in_one_line(workspace):
    (workspace / "predictions").mkdir()
    (workspace / "predictions" / "loop").symlink_to(workspace / "predictions" / "loop")
    for out in ("bad\0name.csv", "loop/x.csv"):
        with pytest.raises(PredictError) as refused:
            served_output(out, PredictConfig(), workspace)
        assert "\n" not in str(refused.value)
    with pytest.raises(PredictError, match="folder"):
        served_input("data/\0", PredictConfig(), workspace)
