"""The DVC workspace as the pipeline's driver: versioning data, running stages, saving experiments.

Both drivers go through DVC (a shell's ``dvc repro`` and the Prefect flow's per-stage tasks), so
DVC alone decides what is stale. Parameter overrides are written into params.yaml the way
``dvc exp run -S`` writes them, after validating the result, so a bad value never reaches a stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headswap.config import Params, parse_params
from headswap.errors import HeadswapError

RAW_DIR = Path("data/raw")
INGEST_RECORD = Path("data/.ingest.json")


class StageError(HeadswapError):
    """A DVC stage or command failed; the message carries the stage's own last lines."""


@dataclass(frozen=True)
class CommandResult:
    command: list[str]
    output: str


def _executable(name: str) -> str:
    """Prefer the tool installed beside this interpreter (the project's .venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_command(args: list[str], env: Mapping[str, str] | None = None, cwd: Path = Path(".")) -> CommandResult:
    """Run a tool, streaming nothing; on failure raise StageError with the tail of its output."""
    command = [_executable(args[0]), *args[1:]]
    # dvc.yaml stages call `headswap`; make sure they find the one installed beside us.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    completed = subprocess.run(
        command, cwd=cwd, env={**os.environ, "PATH": path, **(env or {})},
        capture_output=True, text=True,
    )
    output = completed.stdout + completed.stderr
    if completed.returncode != 0:
        tail = "\n".join(line for line in output.strip().splitlines()[-15:])
        raise StageError(f"`{' '.join(args)}` failed (exit {completed.returncode}):\n{tail}")
    return CommandResult(command, output)


def read_raw_params(path: Path = Path("params.yaml")) -> Any:
    """params.yaml as a comment-preserving mapping (ruamel round-trip)."""
    from ruamel.yaml import YAML

    return YAML().load(path.read_text())


def get_dotted(mapping: Any, dotted: str) -> Any:
    """The value at a dotted key, or None where the path does not exist."""
    node = mapping
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def set_dotted(mapping: Any, dotted: str, value: Any) -> None:
    """``set_dotted(m, "head.C", 2.0)`` sets ``m["head"]["C"]``; unknown sections are created."""
    *parents, leaf = dotted.split(".")
    node = mapping
    for key in parents:
        if key not in node or node[key] is None:
            node[key] = {}
        node = node[key]
    node[leaf] = value


def apply_overrides(overrides: Mapping[str, Any], path: Path = Path("params.yaml")) -> Params:
    """Write dotted-key overrides into params.yaml (like ``dvc exp run -S``), validated first.

    Raises:
        ConfigError: the overridden params break the schema; params.yaml is left untouched.
    """
    from ruamel.yaml import YAML

    from headswap.io import atomic_write_text

    raw = read_raw_params(path)
    current = json.loads(json.dumps(raw, default=str))
    changed = {k: v for k, v in overrides.items() if get_dotted(current, k) != v}
    for dotted, value in changed.items():
        set_dotted(raw, dotted, value)
    plain = json.loads(json.dumps(raw, default=str))
    params = parse_params(plain, source="flow parameters")
    if changed:
        import io

        buffer = io.StringIO()
        YAML().dump(raw, buffer)
        atomic_write_text(path, buffer.getvalue())
    return params


def version_data(params: Params) -> str:
    """Ingest data.source into data/raw if it changed, ``dvc add`` it, and push to the remote.

    Returns the DVC md5 of data/raw. Re-ingesting is skipped when the source and sample size are
    the ones recorded last time, so an unchanged dataset costs only DVC's hash check.
    """
    from headswap.data import ingest

    record = {"source": params.data.source, "max_per_class": params.data.max_per_class}
    previous = json.loads(INGEST_RECORD.read_text()) if INGEST_RECORD.is_file() else None
    if previous != record or not RAW_DIR.is_dir():
        ingest(params.data, RAW_DIR)
        INGEST_RECORD.write_text(json.dumps(record))
    run_command(["dvc", "add", "-q", str(RAW_DIR)])
    run_command(["dvc", "push", "-q", f"{RAW_DIR}.dvc"])
    return data_md5()


def data_md5(dvc_file: Path = Path("data/raw.dvc")) -> str:
    import yaml

    return str(yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"])


def pipeline_stages(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stage names in dvc.yaml order (which is also their dependency order)."""
    import yaml

    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


def repro_stage(stage: str, env: Mapping[str, str] | None = None) -> bool:
    """``dvc repro --single-item <stage>``. Returns True if DVC ran it, False if it was up to date."""
    result = run_command(["dvc", "repro", "--single-item", stage], env=env)
    return f"Running stage '{stage}'" in result.output


def save_experiment(name: str) -> None:
    """Record the workspace as a DVC experiment, visible in ``dvc exp show``."""
    run_command(["dvc", "exp", "save", "--force", "--name", name])
