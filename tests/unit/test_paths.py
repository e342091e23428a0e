"""headswap.paths mirrors dvc.yaml: every file a stage writes has one name in Python."""

from __future__ import annotations

from pathlib import Path

import yaml

from headswap import paths

REPO = Path(__file__).resolve().parents[2]


def _declared(stage: dict, kind: str) -> list[Path]:
    """The paths a stage lists under ``kind`` (outs, metrics, plots), options stripped."""
    entries = stage.get(kind, [])
    return [Path(next(iter(e)) if isinstance(e, dict) else e) for e in entries]


def _named_paths() -> set[Path]:
    return {value for value in vars(paths).values() if isinstance(value, Path)}


def test_every_output_and_metrics_file_in_dvc_yaml_is_named_in_paths():
    stages = yaml.safe_load((REPO / paths.DVC_YAML).read_text())["stages"]
    declared = {
        path
        for stage in stages.values()
        for kind in ("outs", "metrics")
        for path in _declared(stage, kind)
    }
    assert declared, "dvc.yaml lists no outputs"
    assert declared - _named_paths() == set()


def test_every_plot_in_dvc_yaml_lies_in_the_named_plots_folder():
    stages = yaml.safe_load((REPO / paths.DVC_YAML).read_text())["stages"]
    plots = [path for stage in stages.values() for path in _declared(stage, "plots")]
    assert plots
    assert {path.parent for path in plots} == {paths.PLOTS_DIR}


def test_the_pipeline_files_in_paths_exist_in_dvc_yaml():
    text = (REPO / paths.DVC_YAML).read_text()
    for name in ("MANIFEST", "VALIDATION", "FEATURES", "HEAD_WEIGHTS", "MODEL", "REGISTRATION"):
        assert str(getattr(paths, name)) in text, name
