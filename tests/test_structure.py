"""The house's shape, checked: no import cycle (function-level imports included, so none can hide one),
every module says what it owns, no module grows past the size one reader can hold, and the shared
pieces never import a stage entry."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("pipeline", "cache")
STAGE_ENTRIES = {"pipeline.extract", "pipeline.fit_head", "pipeline.finetune", "pipeline.evaluate", "pipeline.run", "pipeline.sweep",
                 "pipeline.predict", "pipeline.export", "pipeline.quickstart"}
MAX_LINES = 420  # "about 400": room for a docstring to grow, not for a second job


def _modules() -> dict[str, Path]:
    found = {"cli": REPO / "cli.py"}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """{tl module: line of its first import} for every import in the file, at any depth."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from pipeline import distributed` imports the submodule, `from pipeline import X` the package
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        for name in names:
            if name in modules:
                found.setdefault(name, node.lineno)
    return found


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in graph.get(node, {}):
            if target == node or target not in graph:
                continue
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_module_import_graph_has_no_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function():
    graph = {"pipeline.a": {"pipeline.b": 3}, "pipeline.b": {"pipeline.c": 9}, "pipeline.c": {"pipeline.a": 40}}
    assert _cycle(graph) == ["pipeline.a", "pipeline.b", "pipeline.c", "pipeline.a"]
    source = "def late():\n    from pipeline import heads\n"
    path = REPO / "tests" / ".structure_probe.py"
    try:
        path.write_text(source)
        assert _imports(path, {"pipeline.heads": path, "pipeline": path}) == {"pipeline.heads": 2}
    finally:
        path.unlink()


def test_shared_pieces_never_import_a_stage_entry():
    graph = _graph()
    shared = [name for name in graph if name not in STAGE_ENTRIES and name != "cli"]
    wrong = {name: sorted(set(graph[name]) & STAGE_ENTRIES) for name in shared if set(graph[name]) & STAGE_ENTRIES}
    assert not wrong, f"shared modules importing stage entries: {wrong}"


def test_every_module_opens_with_a_docstring_and_stays_small():
    for name, path in _modules().items():
        text = path.read_text()
        docstring = ast.get_docstring(ast.parse(text))
        assert docstring and len(docstring.split()) >= 8, f"{name} does not open with a docstring of its job"
        if name != "cli":
            lines = len(text.splitlines())
            assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job (at most {MAX_LINES})"


def test_only_files_py_renames_files_into_place():
    """Every file a user keeps goes through pipeline.files.atomic_write (unique temporary, fsync, rename):
    no other module renames, replaces or torch.saves to a path of its own."""
    found = []
    for name, path in _modules().items():
        if name == "pipeline.files":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
                if (owner, node.func.attr) in {("os", "replace"), ("os", "rename"), ("shutil", "move")} \
                        or node.func.attr == "rename" \
                        or (owner == "torch" and node.func.attr == "save" and not (
                            node.args[1:] and isinstance(node.args[1], ast.Name) and node.args[1].id == "buffer")):
                    found.append(f"{name}:{node.lineno} {owner}.{node.func.attr}")
    assert not found, f"write through pipeline.files.atomic_write instead: {found}"


def test_what_the_documented_commands_write_in_the_checkout_is_ignored_by_git():
    """`mlflow run .` (README, MLproject) runs in the checkout and MLflow 3's local default store is
    `sqlite:///mlflow.db` with its artifacts under `mlruns/`: a `git status` after it listed both."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for written in ("mlflow.db", "mlruns/1/abc/artifacts/model/m.pt", "caches/x/manifest.json", "models/m.pt"):
        checked = subprocess.run(["git", "check-ignore", "--no-index", "-q", written], cwd=REPO)
        assert checked.returncode == 0, f"{written} is not ignored by .gitignore"
