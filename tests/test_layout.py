"""The architecture holds: the kernel never imports the workflows, resources or triggers."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

FORBIDDEN = ("assets", "resources", "sensors", "definitions")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_kernel_never_imports_workflows_resources_or_sensors() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(_imports(path) & set(FORBIDDEN))
        for path in (REPO / "aios_dagster").rglob("*.py")
        if _imports(path) & set(FORBIDDEN)
    }
    assert offenders == {}


def _public_definitions(tree: ast.Module) -> list[ast.FunctionDef | ast.ClassDef]:
    """Module-level functions and classes, and public methods of public classes."""
    found: list[ast.FunctionDef | ast.ClassDef] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            found.append(node)
            if isinstance(node, ast.ClassDef):
                found += [
                    child
                    for child in node.body
                    if isinstance(child, ast.FunctionDef) and not child.name.startswith("_")
                ]
    return found


def test_every_public_function_has_a_docstring() -> None:
    missing = []
    for folder in ("aios_dagster", "assets", "resources", "sensors"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in _public_definitions(tree):
                if ast.get_docstring(node) is None:
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert missing == []
