"""The packages depend one way: contracts <- plumbing <- {orchestrator, participants}.

A participant service must never load the saga engine, its definition language or the saga
stores; the orchestrator must never need the participant SDK. The one exception is the CLI's
``saga participant`` subcommand, the composition root that starts either daemon.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {
    "contracts": {"contracts"},
    "plumbing": {"contracts", "plumbing"},
    "participants": {"contracts", "plumbing", "participants"},
    "orchestrator": {"contracts", "plumbing", "orchestrator"},
}
COMPOSITION_ROOTS = {"orchestrator/commands.py": {"participants"}}
"""Modules allowed to reach across, and where to."""


def first_party_imports(path: Path) -> set[str]:
    """The first-party top-level packages a module imports, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        found |= {module.partition(".")[0] for module in modules}
    return found & {*ALLOWED, "examples"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        allowed = ALLOWED[package] | COMPOSITION_ROOTS.get(relative, set())
        if package == "orchestrator":
            allowed = allowed | {"examples"}  # the demo runs the example app
        stray = first_party_imports(path) - allowed
        if stray:
            wrong[relative] = sorted(stray)
    assert wrong == {}


def test_importing_the_participant_sdk_does_not_load_the_engine() -> None:
    probe = (
        "import sys, participants, participants.daemon; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'orchestrator'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"
