"""The README's Layout section matches the tree, every relative link in the docs resolves, and
benchmarks/ACCURACY.md's tables are the ones its results file renders.

The Layout section is one fenced block: a line at column 0 that ends in ``/`` names a folder,
and each indented line that starts with a ``.py`` path names a module relative to it (``#``
lines are group labels). Every module it lists must exist, and every module under src/headswap/
and flows/ (``__init__.py`` aside) must be listed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PACKAGES = ("src/headswap", "flows")
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("benchmarks/*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def layout_block(readme: str) -> str:
    """The first fenced block after the ``## Layout`` heading."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```\n", 2)[1]


def listed_modules(block: str) -> list[str]:
    """Module paths relative to the repository root, in the order the block lists them."""
    folder, modules = "", []
    for line in block.splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else ""
        if not first or first.startswith("#"):
            continue
        if not line[0].isspace() and first.endswith("/"):
            folder = first
        elif first.endswith(".py"):
            modules.append(folder + first)
    return modules


def tree_modules() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    }


def test_the_layout_lists_every_module_and_only_modules_that_exist() -> None:
    listed = listed_modules(layout_block(README.read_text()))
    tree = tree_modules()
    missing = sorted(tree - set(listed))
    extra = sorted(set(listed) - tree)
    repeated = sorted({module for module in listed if listed.count(module) > 1})
    assert not (missing or extra or repeated), (
        "README.md's Layout section and the tree disagree:\n"
        f"  modules not listed: {missing}\n"
        f"  listed but not in the tree: {extra}\n"
        f"  listed twice: {repeated}"
    )


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(document: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", document.read_text(), flags=re.MULTILINE)
    return {github_anchor(heading) for heading in headings}


def resolves(document: Path, target: str) -> bool:
    """Whether a link target in ``document`` names an existing file or folder (and heading)."""
    path, _, fragment = target.partition("#")
    resolved = (document.parent / path).resolve() if path else document
    if not resolved.exists():
        return False
    return not fragment or resolved.suffix != ".md" or fragment in anchors(resolved)


def broken_links(document: Path) -> list[str]:
    """Relative links in ``document`` whose file, folder or heading does not exist."""
    targets = LINK.findall(document.read_text())
    return [t for t in targets if not re.match(r"[a-z]+:", t) and not resolves(document, t)]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document: Path) -> None:
    assert broken_links(document) == [], f"{document.relative_to(ROOT)}: broken links"


def test_the_layout_parser_reads_folders_groups_and_modules() -> None:
    block = "flows/   flows\n  pipeline.py  train\n\nsrc/pkg/\n  # group\n  sub/a.py  note\n"
    assert listed_modules(block) == ["flows/pipeline.py", "src/pkg/sub/a.py"]


def test_accuracy_tables_are_rendered_from_the_results_file() -> None:
    check = subprocess.run(
        [sys.executable, "benchmarks/accuracy.py", "render", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, (
        "benchmarks/ACCURACY.md differs from benchmarks/results/accuracy.csv: run "
        f"`python benchmarks/accuracy.py render`\n{check.stdout}{check.stderr}"
    )
