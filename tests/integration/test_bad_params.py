"""Bad parameters give one line naming the key path and what is allowed: CLI, dvc repro, Prefect.

Each case edits one key of a valid params.yaml. The CLI cases run in-process (cheap); the
``dvc repro`` and Prefect-flow cases start the real tools and are marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from headswap.cli import app
from tests.helpers.workspace import REPO, tool_env

MISSING_SOURCE = "/nonexistent/headswap-images"

# case -> (params.yaml edit as {dotted key: value}, fragments the one-line message must contain)
CASES = {
    "unknown key": (
        {"head.colour": "red"},
        ["unknown key 'head.colour'", "allowed here: type, C, hidden"],
    ),
    "wrong type": (
        {"features.batch_size": "lots"},
        ["'features.batch_size'", "valid integer", "(got 'lots')"],
    ),
    "negative C": (
        {"head.C": -1.0},
        ["'head.C'", "greater than 0", "or Input should be 'auto'", "(got -1.0)"],
    ),
    "unknown backbone": (
        {"backbone.name": "resnet9000"},
        ["'backbone.name'", "unknown backbone 'resnet9000'", "allowed: efficientnet_lite0"],
    ),
    "taps out of range": (
        {"backbone.taps": [9, "head"]},
        ["'backbone.taps'", "taps [9] out of range", "allowed: 0, 1, 2, 3, 4, 5, 6, head"],
    ),
    "test_size >= 1": (
        {"data.split.test_size": 1.0},
        ["'data.split.test_size'", "less than 1", "(got 1.0)"],
    ),
    "missing data.source": (
        {"data.source": MISSING_SOURCE},
        [f"data.source: '{MISSING_SOURCE}' is not a directory", "allowed: 'elpv'"],
    ),
}

runner = CliRunner()


def write_params(path: Path, edits: dict) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in edits.items():
        *parents, leaf = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "error:" in line.lower()]
    assert "Traceback" not in output, output
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_cli_prints_one_line_with_key_path(case, tmp_path, monkeypatch):
    edits, fragments = CASES[case]
    write_params(tmp_path / "params.yaml", edits)
    monkeypatch.chdir(tmp_path)
    # a missing source surfaces where the source is read: ingest (and prepare without data/raw)
    commands = ["ingest", "prepare"] if case == "missing data.source" else ["check-params"]
    for command in commands:
        result = runner.invoke(app, [command])
        assert result.exit_code == 1, result.output
        line = one_error_line(result.output)
        for fragment in fragments:
            assert fragment in line, (command, line)


def make_workspace(root: Path) -> Path:
    """A DVC project with the real dvc.yaml and sources, and a tiny ImageFolder in data/raw."""
    from PIL import Image

    for name in ("src", "dvc.yaml", "params.yaml"):
        source = REPO / name
        copy = shutil.copytree if source.is_dir() else shutil.copy
        copy(source, root / name)
    for offset, label in enumerate(("functional", "defective")):
        (root / "data/raw" / label).mkdir(parents=True)
        for index in range(4):
            Image.new("RGB", (16, 16), (offset * 200, index * 40, 0)).save(
                root / "data/raw" / label / f"{index}.png"
            )
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=tool_env())
    return root


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_dvc_repro_shows_the_same_line(case, tmp_path):
    workspace = make_workspace(tmp_path)
    edits, fragments = CASES[case]
    write_params(workspace / "params.yaml", edits)
    result = subprocess.run(
        ["dvc", "repro", "prepare"],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=tool_env(),
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # `dvc repro` always runs ingest first, so a bad data.source stops it there with the same line
    line = one_error_line(output.replace("ERROR: failed to reproduce", "failed to reproduce"))
    for fragment in fragments:
        assert fragment in line, line


FLOW_SCRIPT = """
import json, sys
from flows.pipeline import train
results = {}
for case in sys.argv[1:]:
    import shutil
    shutil.copy(f"params-{case}.yaml", "params.yaml")
    state = train(return_state=True)
    results[case] = {"failed": state.is_failed(), "message": state.message or ""}
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
def test_prefect_flow_fails_with_the_same_line(tmp_path):
    """The train flow (ephemeral Prefect) fails each run with the one-line message as its state."""
    workspace = make_workspace(tmp_path)
    names = {f"case{index}": case for index, case in enumerate(CASES)}
    for name, case in names.items():
        write_params(workspace / f"params-{name}.yaml", CASES[case][0])
    result = subprocess.run(
        [sys.executable, "-c", FLOW_SCRIPT, *names],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=tool_env(PREFECT_HOME=str(tmp_path / "prefect-home")),
        timeout=600,
    )
    marker = [line for line in result.stdout.splitlines() if line.startswith("RESULTS ")]
    assert marker, result.stdout + result.stderr
    results = json.loads(marker[0].removeprefix("RESULTS "))
    for name, case in names.items():
        outcome = results[name]
        assert outcome["failed"], (case, outcome)
        assert "\n" not in outcome["message"].strip(), outcome["message"]
        for fragment in CASES[case][1]:
            assert fragment in outcome["message"], (case, outcome["message"])
