"""Code is an input: every dvc.yaml stage lists the headswap modules its command can run.

Each stage's ``cmd`` is ``headswap <stage>``. The modules it can run are ``headswap/__init__``,
cli.py and what cli.py imports at module level, what the stage's command function (and the cli
helpers and callbacks it uses) imports, and everything those modules import in turn, at module
level or inside functions. Imports under ``if TYPE_CHECKING:`` never run and do not count.

The deps are the exact closure, not ``src/`` as a whole: a head-only change must not make the
features stage (the expensive one) stale.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers.workspace import REPO

SRC = REPO / "src"
PACKAGE = "headswap"


def module_path(name: str) -> Path | None:
    """The file of module ``name`` (``headswap.x`` or a package's __init__), or None."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name | ast.Attribute) and ast.unparse(test).endswith(
        "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Every Import/ImportFrom under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if _is_type_checking(child):
            for orelse in child.orelse:  # the else branch does run
                yield from _import_nodes(ast.Module(body=[orelse], type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def _absolute(node: ast.ImportFrom, current: str) -> str:
    """The absolute module an ImportFrom names, resolving relative levels from ``current``."""
    if not node.level:
        return node.module or ""
    path = module_path(current)
    is_package = path is not None and path.name == "__init__.py"
    package = current.split(".") if is_package else current.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _with_parents(name: str) -> set[str]:
    """``a.b.c`` -> {a, a.b, a.b.c}: importing a submodule runs each parent package first."""
    parts = name.split(".")
    return {".".join(parts[: i + 1]) for i in range(len(parts))}


def imported_modules(node: ast.AST, current: str) -> set[str]:
    """The headswap modules (with their parent packages) the imports under ``node`` load."""
    found: set[str] = set()
    for imp in _import_nodes(node):
        if isinstance(imp, ast.Import):
            names = [alias.name for alias in imp.names]
        else:
            base = _absolute(imp, current)
            # `from headswap import x` loads headswap.x when x is a module, else an attribute.
            names = [base, *(f"{base}.{alias.name}" for alias in imp.names)]
        for name in names:
            if name.split(".")[0] == PACKAGE and module_path(name):
                found |= _with_parents(name)
    return found


def transitive_closure(start: set[str], expanded: frozenset[str] = frozenset()) -> set[str]:
    """``start`` plus every headswap module reachable from it through any import; the modules
    in ``expanded`` count as reached but are not scanned (their imports are already in)."""
    seen, queue = set(expanded), list(start)
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(module_path(name).read_text())
        queue.extend(imported_modules(tree, name) - seen)
    return seen


def _command_name(function: ast.FunctionDef) -> str | None:
    """The name a ``@app.command(...)`` decorator registers, typer-style, or None."""
    for decorator in function.decorator_list:
        call = decorator if isinstance(decorator, ast.Call) else None
        if call and ast.unparse(call.func) == "app.command":
            if call.args and isinstance(call.args[0], ast.Constant):
                return call.args[0].value
            return function.name.replace("_", "-")
    return None


def _is_app_callback(function: ast.FunctionDef) -> bool:
    """A ``@app.callback()`` runs before every command of ``app``."""
    return any(
        ast.unparse(d.func if isinstance(d, ast.Call) else d) == "app.callback"
        for d in function.decorator_list
    )


def _reachable_functions(functions: dict[str, ast.FunctionDef], roots: list[str]) -> list[str]:
    """``roots`` plus the cli.py functions they name (helpers such as ``_params``), transitively."""
    seen, queue = [], list(roots)
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.append(name)
        for node in ast.walk(functions[name]):
            if isinstance(node, ast.Name) and node.id in functions and node.id not in seen:
                queue.append(node.id)
    return seen


def stage_modules(stage: str) -> set[str]:
    """Every headswap module that ``headswap <stage>`` can run."""
    cli = ast.parse((SRC / PACKAGE / "cli.py").read_text())
    functions = {n.name: n for n in cli.body if isinstance(n, ast.FunctionDef)}
    commands = {_command_name(f): name for name, f in functions.items() if _command_name(f)}
    assert stage in commands, f"dvc.yaml stage {stage!r} has no `headswap {stage}` command"
    callbacks = [name for name, f in functions.items() if _is_app_callback(f)]
    # cli.py is scanned piecewise (not as a whole module: that would count every command).
    start = {PACKAGE}
    top_level = ast.Module(
        body=[n for n in cli.body if not isinstance(n, ast.FunctionDef)], type_ignores=[]
    )
    start |= imported_modules(top_level, f"{PACKAGE}.cli")
    for name in _reachable_functions(functions, [commands[stage], *callbacks]):
        start |= imported_modules(functions[name], f"{PACKAGE}.cli")
    return transitive_closure(start, expanded=frozenset({f"{PACKAGE}.cli"}))


def stage_code(stage: str) -> set[str]:
    """The files of ``stage_modules(stage)``, relative to the repository root."""
    return {module_path(name).relative_to(REPO).as_posix() for name in stage_modules(stage)}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep.rstrip("/") or path.startswith(dep.rstrip("/") + "/") for dep in deps)


STAGES = sorted(_stages())


def test_every_stage_is_a_headswap_command():
    for name, stage in _stages().items():
        assert stage["cmd"].split()[:2] == ["headswap", name], f"stage {name}: {stage['cmd']}"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_cover_the_code_it_runs(stage):
    deps = [str(dep) for dep in _stages()[stage].get("deps", [])]
    missing = sorted(path for path in stage_code(stage) if not _covered(path, deps))
    assert not missing, (
        f"dvc.yaml stage {stage!r} runs code it does not list in deps, so editing it would not "
        f"make the stage stale; add: {', '.join(missing)}"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_list_no_code_it_does_not_run(stage):
    """Exact, not coarse: extra code deps re-run a stage (features is the costly one) for
    nothing. A dep that no longer exists would make `dvc repro` fail."""
    code = stage_code(stage)
    deps = [str(dep) for dep in _stages()[stage].get("deps", [])]
    extra = sorted(dep for dep in deps if dep.startswith("src/") and dep not in code)
    assert not extra, f"dvc.yaml stage {stage!r} lists code it never runs: {', '.join(extra)}"


def test_a_head_change_does_not_make_features_stale():
    assert "src/headswap/heads.py" not in stage_code("features")
    assert "src/headswap/heads.py" in stage_code("train")


def test_the_import_scan_sees_every_form():
    """Absolute, from-package, from-module, relative, function-level; TYPE_CHECKING skipped."""
    source = (
        "import headswap.io\n"
        "from headswap import errors\n"
        "from . import imaging\n"
        "from .config import load_params\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from headswap.heads import Head\n"
        "def later():\n"
        "    from headswap.manifest import read_manifest\n"
    )
    found = imported_modules(ast.parse(source), f"{PACKAGE}.features")
    names = {"io", "errors", "imaging", "config", "manifest"}
    assert found == {PACKAGE, *(f"{PACKAGE}.{name}" for name in names)}
