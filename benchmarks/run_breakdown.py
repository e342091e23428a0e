"""`make run` against `dvc repro`: seconds per stage, the flow's own overhead, and their ratio.

Both drivers start from the same state: two copies of one workspace that has finished a run (so
the feature cache is warm), each with this checkout's code, and in each the same stages made
stale the same way: dvc.lock and DVC's run cache removed, so every stage runs (none is restored
from the run cache), and the MLflow store removed, so register logs version 1 in a new embedded
store, as in a fresh clone.
Then one copy runs ``python -m flows.pipeline`` (what `make run` runs) and the other ``dvc repro``.
With ``--repeats 2`` the order alternates (flow, dvc, dvc, flow), so a machine that gets busier
or quieter during the run does not favour one driver.

Per stage, the flow's figures are its own (the ``pipeline_timings.json`` it logs to the MLflow
run). ``dvc repro``'s are read from outside: a stage runs from DVC's "Running stage" line to the
next one, and its CPU is the DVC process's own plus its finished children's at those moments.

    python benchmarks/run_breakdown.py --workspace /path/to/finished/workspace
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CODE = ("src", "flows", "dvc.yaml")  # what this checkout contributes to both copies
SKIP = {".venv", ".git/index.lock", "__pycache__"}
RUNNING = re.compile(r"^Running stage '([^']+)'")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_cpu(process: psutil.Process) -> float:
    """CPU of ``process`` and its finished (waited-for) children: DVC waits for each stage."""
    times = process.cpu_times()
    return times.user + times.system + times.children_user + times.children_system


def make_copy(workspace: Path, target: Path) -> Path:
    """A copy of ``workspace`` with this checkout's code, every stage stale, nothing restorable."""
    shutil.copytree(
        workspace, target, symlinks=True, ignore=lambda _d, names: SKIP.intersection(names)
    )
    for name in CODE:
        source, dest = ROOT / name, target / name
        if dest.is_dir():
            shutil.rmtree(dest)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest)
    (target / "dvc.lock").unlink(missing_ok=True)
    shutil.rmtree(target / ".dvc" / "cache" / "runs", ignore_errors=True)
    # A new embedded MLflow store, as in a fresh clone: the copied one would keep the original
    # workspace's artifact folder, and both drivers would write into it.
    for name in ("models/registry.json", "mlflow.db"):
        (target / name).unlink(missing_ok=True)
    shutil.rmtree(target / "mlartifacts", ignore_errors=True)
    return target


def _environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy / "src"), str(copy)])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def _run(command: list[str], copy: Path, log: Path) -> tuple[float, float, list[tuple]]:
    """(wall s, CPU s of the whole process tree, [(stage, wall at start, tree CPU at start)])."""
    marks = []
    started, cpu = time.perf_counter(), _children_cpu()
    with (
        log.open("w") as out,
        subprocess.Popen(
            command,
            cwd=copy,
            env=_environment(copy),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as process,
    ):
        watched = psutil.Process(process.pid)
        for line in process.stdout:
            out.write(line)
            match = RUNNING.match(line)
            if match:
                marks.append((match.group(1), time.perf_counter() - started, _tree_cpu(watched)))
    wall, total_cpu = time.perf_counter() - started, _children_cpu() - cpu
    if process.returncode != 0:
        sys.exit(f"`{' '.join(command)}` failed in {copy} (exit {process.returncode}); see {log}")
    return wall, total_cpu, marks


def run_dvc(copy: Path, log: Path) -> dict:
    wall, cpu, marks = _run(["dvc", "repro"], copy, log)
    ends = [(m[1], m[2]) for m in marks[1:]] + [(wall, cpu)]
    stages = [
        {"stage": name, "seconds": end - start, "cpu_seconds": end_cpu - start_cpu}
        for (name, start, start_cpu), (end, end_cpu) in zip(marks, ends, strict=True)
    ]
    first = marks[0][1] if marks else wall
    return {"seconds": wall, "cpu_seconds": cpu, "stages": stages, "before_first_stage": first}


def run_flow(copy: Path, log: Path) -> dict:
    wall, cpu, _ = _run([sys.executable, "-m", "flows.pipeline"], copy, log)
    timings = _logged_timings(copy)
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "stages": [
            {k: run[k] for k in ("stage", "status", "seconds", "cpu_seconds")}
            for run in timings["stages"]
        ],
        "flow_overhead_seconds": timings["overhead_seconds"],
        "flow_overhead_cpu_seconds": timings["overhead_cpu_seconds"],
        # interpreter, imports, the ephemeral Prefect server; and after the flow: its shutdown
        "outside_flow_seconds": wall - timings["flow_seconds"],
    }


def _logged_timings(copy: Path) -> dict:
    """The pipeline_timings.json the flow logged to the MLflow run it registered."""
    from mlflow import MlflowClient

    registration = json.loads((copy / "models" / "registry.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(registration["tracking_uri"])
        path = client.download_artifacts(registration["run_id"], "pipeline_timings.json", tmp)
        return json.loads(Path(path).read_text())


def _table(flow: dict, dvc: dict) -> list[str]:
    dvc_stages = {s["stage"]: s for s in dvc["stages"]}
    lines = [
        f"{'seconds':<22} {'flow wall':>9} {'flow CPU':>9} {'dvc wall':>9} {'dvc CPU':>9}",
    ]
    for stage in flow["stages"]:
        other = dvc_stages.get(stage["stage"], {"seconds": 0.0, "cpu_seconds": 0.0})
        note = "" if stage["status"] == "ran" else f"  ({stage['status']})"
        lines.append(
            f"{stage['stage']:<22} {stage['seconds']:9.1f} {stage['cpu_seconds']:9.1f} "
            f"{other['seconds']:9.1f} {other['cpu_seconds']:9.1f}{note}"
        )
    lines.append(
        f"{'flow overhead (in flow)':<22} {flow['flow_overhead_seconds']:9.1f} "
        f"{flow['flow_overhead_cpu_seconds']:9.1f}"
    )
    lines.append(f"{'outside the flow':<22} {flow['outside_flow_seconds']:9.1f}")
    lines.append(f"{'before first stage':<22} {'':>9} {'':>9} {dvc['before_first_stage']:9.1f}")
    lines.append(
        f"{'total':<22} {flow['seconds']:9.1f} {flow['cpu_seconds']:9.1f} "
        f"{dvc['seconds']:9.1f} {dvc['cpu_seconds']:9.1f}"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workspace",
        type=Path,
        required=True,
        help="a workspace that finished a run (make run) with the feature cache it used",
    )
    parser.add_argument("--scratch", type=Path, default=None, help="where the copies go")
    parser.add_argument("--repeats", type=int, default=1, help="flow/dvc pairs (order alternates)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    workspace = args.workspace.resolve()
    if not (workspace / "dvc.lock").is_file():
        sys.exit(f"{workspace} has no dvc.lock: run `make run` there first (it warms the cache)")
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    pairs = []
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="run-breakdown-") as tmp:
        for repeat in range(args.repeats):
            copies = {
                name: make_copy(workspace, Path(tmp) / f"{name}-{repeat}")
                for name in ("flow", "dvc")
            }
            order = ("flow", "dvc") if repeat % 2 == 0 else ("dvc", "flow")
            result = {}
            for name in order:
                log = Path(tmp) / f"{name}-{repeat}.log"
                runner = run_flow if name == "flow" else run_dvc
                result[name] = runner(copies[name], log)
                print(f"{name}: {result[name]['seconds']:.1f} s wall", file=sys.stderr, flush=True)
            pairs.append(result)
            for name in ("flow", "dvc"):
                shutil.rmtree(copies[name], ignore_errors=True)
    flow_wall = sum(p["flow"]["seconds"] for p in pairs)
    dvc_wall = sum(p["dvc"]["seconds"] for p in pairs)
    flow_cpu = sum(p["flow"]["cpu_seconds"] for p in pairs)
    dvc_cpu = sum(p["dvc"]["cpu_seconds"] for p in pairs)
    summary = {
        "started": started,
        "load_average": load,
        "load_average_end": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "workspace": str(workspace),
        "pairs": pairs,
        "flow_vs_dvc_wall": flow_wall / dvc_wall,
        "flow_vs_dvc_cpu": flow_cpu / dvc_cpu,
    }
    for number, pair in enumerate(pairs, 1):
        print(f"pair {number}:")
        print("\n".join(_table(pair["flow"], pair["dvc"])))
    print(
        f"make run / dvc repro: {summary['flow_vs_dvc_wall']:.2f}x wall, "
        f"{summary['flow_vs_dvc_cpu']:.2f}x CPU ({started}, load average "
        f"{' '.join(f'{x:.2f}' for x in load)} at the start, "
        f"{' '.join(f'{x:.2f}' for x in summary['load_average_end'])} at the end)"
    )
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
