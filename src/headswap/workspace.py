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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headswap.config import Params, parse_params
from headswap.errors import ERROR_PREFIX, HeadswapError
from headswap.paths import DVC_YAML, PARAMS

# DVC's locks are not a queue: a second `dvc repro` fails at once with one of these messages
# (the repo lock, or the per-output rwlock when the first run is already inside a stage).
DVC_LOCK_MESSAGES = ("Unable to acquire lock", "it is being blocked by")
LOCK_WAIT_ENV = "HEADSWAP_LOCK_WAIT_S"  # how long to wait for another run's lock (default 1 h)
LOCK_POLL_S = 2.0


class StageError(HeadswapError):
    """A DVC stage or command failed; the message carries the stage's own last lines."""


@dataclass(frozen=True)
class CommandResult:
    command: list[str]
    output: str


def executable(name: str) -> str:
    """The console script installed beside this interpreter (the project's .venv), else ``name``."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run_command(
    args: list[str],
    env: Mapping[str, str] | None = None,
    cwd: Path = Path("."),
    echo: bool = False,
) -> CommandResult:
    """Run a tool; on failure raise StageError with the tail of its output.

    With ``echo`` its output is also streamed to stdout as it comes, so a person watching
    `make run` sees each stage start and finish instead of minutes of silence.
    DVC commands wait for another DVC process's lock (see ``wait_for_dvc_lock``) instead of
    failing, so two runs started together queue up rather than crash.
    """
    command, returncode, output = _execute(args, env, cwd, echo)
    if returncode != 0:
        # A headswap stage that fails on bad input says so in one `error:` line; that line is
        # the whole story, so the caller (a Prefect flow run's state) gets it alone.
        own_errors = [line for line in output.splitlines() if line.startswith(ERROR_PREFIX)]
        if own_errors:
            reason = own_errors[-1].removeprefix(ERROR_PREFIX)
            raise StageError(f"`{' '.join(args)}` failed: {reason}")
        tail = "\n".join(line for line in output.strip().splitlines()[-15:])
        raise StageError(f"`{' '.join(args)}` failed (exit {returncode}):\n{tail}")
    return CommandResult(command, output)


def _execute(
    args: list[str], env: Mapping[str, str] | None, cwd: Path, echo: bool
) -> tuple[list[str], int, str]:
    """(resolved command, exit status, combined output); DVC commands wait for the lock."""
    command = [executable(args[0]), *args[1:]]
    # dvc.yaml stages call `headswap`; make sure they find the one installed beside us.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full_env = {**os.environ, "PATH": path, **(env or {})}

    def attempt() -> tuple[int, str]:
        if not echo:
            completed = subprocess.run(
                command, cwd=cwd, env=full_env, capture_output=True, text=True
            )
            return completed.returncode, completed.stdout + completed.stderr
        with subprocess.Popen(
            command,
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as process:
            output = "".join(_echo(line) for line in process.stdout)
        return process.returncode, output

    returncode, output = wait_for_dvc_lock(attempt) if args[0] == "dvc" else attempt()
    return command, returncode, output


def wait_for_dvc_lock(attempt: Callable[[], tuple[int, str]]) -> tuple[int, str]:
    """Re-run ``attempt`` (a DVC command) while it fails only because another DVC holds the lock.

    Returns the (exit status, output) of the first attempt that got the lock or failed for any
    other reason. Gives up after ``$HEADSWAP_LOCK_WAIT_S`` seconds with a StageError.
    """
    deadline = time.monotonic() + float(os.environ.get(LOCK_WAIT_ENV, "3600"))
    announced = False
    while True:
        returncode, output = attempt()
        if returncode == 0 or not any(message in output for message in DVC_LOCK_MESSAGES):
            return returncode, output
        if time.monotonic() > deadline:
            raise StageError(
                f"another DVC process has held this workspace's lock for over "
                f"{os.environ.get(LOCK_WAIT_ENV, '3600')} s (set {LOCK_WAIT_ENV} to wait longer; "
                "if no DVC process is running, delete .dvc/tmp/lock)"
            )
        if not announced:
            print(
                "another DVC run holds this workspace; waiting for it to finish...",
                file=sys.stderr,
                flush=True,
            )
            announced = True
        time.sleep(LOCK_POLL_S)


def repro(targets: list[str], driver: str = "headswap repro") -> int:
    """``dvc repro`` under the workspace lock, streaming DVC's output as it comes.

    Waits while another run (``make run``, a Prefect run) holds the workspace. Returns DVC's exit
    status.
    """
    from headswap.runlock import TOKEN_ENV, workspace_lock

    with workspace_lock(driver) as token:
        return _execute(["dvc", "repro", *targets], {TOKEN_ENV: token}, Path("."), echo=True)[1]


# DVC's hints about git and remotes: the flow does both itself, so they only confuse.
DVC_HINTS = (
    "To track the changes with git",
    "git add ",
    "Use `dvc push`",
    "To enable auto staging",
    "lock file 'dvc.lock'",
)


def _echo(line: str) -> str:
    """Stream a DVC output line, except lock complaints (the wait replaces them) and hints."""
    if not any(message in line for message in (*DVC_LOCK_MESSAGES, *DVC_HINTS)):
        sys.stdout.write(line)
        sys.stdout.flush()
    return line


def read_raw_params(path: Path = PARAMS) -> Any:
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


@dataclass(frozen=True)
class ParamChange:
    """One params.yaml key a run's overrides changed."""

    key: str
    old: Any
    new: Any


def apply_overrides(
    overrides: Mapping[str, Any], path: Path = PARAMS
) -> tuple[Params, list[ParamChange]]:
    """Write dotted-key overrides into params.yaml (like ``dvc exp run -S``), validated first.

    The file is read at call time, so every key the overrides leave alone keeps whatever a
    person last wrote there. Returns the resulting params and the keys that actually changed.

    Raises:
        ConfigError: the overridden params break the schema; params.yaml is left untouched.
    """
    from ruamel.yaml import YAML

    from headswap.io import atomic_write_text

    raw = read_raw_params(path)
    current = json.loads(json.dumps(raw, default=str))
    changes = [
        ParamChange(key, get_dotted(current, key), value)
        for key, value in overrides.items()
        if get_dotted(current, key) != value
    ]
    for change in changes:
        set_dotted(raw, change.key, change.new)
    params = parse_params(json.loads(json.dumps(raw, default=str)), source="flow parameters")
    if changes:
        import io

        buffer = io.StringIO()
        YAML().dump(raw, buffer)
        atomic_write_text(path, buffer.getvalue())
    return params, changes


def push_data(env: Mapping[str, str] | None = None) -> None:
    """Push the ingested data/raw to the DVC remote, so every data version can be restored."""
    run_command(["dvc", "push", "-q", "ingest"], env=env)


def pipeline_stages(dvc_yaml: Path = DVC_YAML) -> list[str]:
    """Stage names in dvc.yaml order (which is also their dependency order)."""
    import yaml

    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


@dataclass(frozen=True)
class StageRun:
    """What ``dvc repro --single-item <stage>`` did, and what it cost.

    Attributes:
        stage: the dvc.yaml stage.
        status: ``ran``, ``up to date`` (DVC skipped it) or ``restored`` (from DVC's run cache).
        seconds: wall time of the DVC process, the stage's command included.
        cpu_seconds: user + system CPU time of the DVC process and everything it started.
    """

    stage: str
    status: str
    seconds: float
    cpu_seconds: float

    @property
    def ran(self) -> bool:
        return self.status == "ran"


def repro_stage(stage: str, env: Mapping[str, str] | None = None) -> StageRun:
    """``dvc repro --single-item <stage>``, timed."""
    started, cpu = time.perf_counter(), children_cpu_seconds()
    result = run_command(["dvc", "repro", "--single-item", stage], env=env, echo=True)
    seconds = time.perf_counter() - started
    return StageRun(
        stage, stage_status(stage, result.output), seconds, children_cpu_seconds() - cpu
    )


def stage_status(stage: str, output: str) -> str:
    """``ran``, ``restored`` or ``up to date``, from what ``dvc repro`` printed about ``stage``."""
    if f"Running stage '{stage}'" in output:
        return "ran"
    return "restored" if f"Stage '{stage}' is cached" in output else "up to date"


def children_cpu_seconds() -> float:
    """User + system CPU of this process's finished child processes (and theirs), so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def save_experiment(name: str, message: str | None = None) -> None:
    """Record the workspace as a DVC experiment, visible in ``dvc exp show``.

    ``message`` becomes the experiment commit's message: the flow puts the MLflow run id there,
    so the experiment points at its MLflow run (models/registry.json inside it does too).
    """
    run_command(
        ["dvc", "exp", "save", "--force", "--name", name, *(["-m", message] * bool(message))]
    )


def experiment_rev(name: str) -> str:
    """The git commit of the DVC experiment ``name`` ('' if there is none)."""
    refs = run_command(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"])
    for line in refs.output.splitlines():
        sha, _, ref = line.partition(" ")
        if ref.rsplit("/", 1)[-1] == name:
            return sha
    return ""
