"""The rooms of src/pneumonia import one way (docs/architecture.md): no module imports itself back
through others, and no room imports a room above it. Imports are read with `ast`, so an import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# Top-level modules by room; a package's modules belong to the room named after it.
TOP_LEVEL_ROOMS = {
    # below everything: configuration, errors, logging, storage and the storage layout
    "errors": "base", "config": "base", "logs": "base", "progress": "base", "storage": "base",
    "layout": "base", "cluster": "base", "cli": "base", "tf_startup": "base",
    # a run's own files, shared by training and evaluation
    "weight_files": "run", "trained": "run", "hparams": "run", "run_ended": "run",
    # commands on top of every room
    "predict": "entry", "runs": "entry",
}
# What each room may import besides itself. model/ knows nothing of files or stages: of the base
# it sees only configuration, errors and logging.
ALLOWED = {
    "base": set(),
    "data": {"base"},
    "model": {"pneumonia.config", "pneumonia.errors", "pneumonia.logs"},
    "run": {"base", "data", "model"},
    "evaluation": {"base", "data", "model", "run"},
    "training": {"base", "data", "model", "run", "evaluation"},
    "k8s": {"base"},
    "entry": {"base", "data", "model", "run", "evaluation", "training", "k8s"},
}


def modules(src: Path = SRC) -> dict[str, Path]:
    found = {}
    for path in src.rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, resolved to the deepest known module (a package's name
    when a name is imported from its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets - {"pneumonia"} if name != "pneumonia" else targets


def graph(src: Path = SRC) -> dict[str, set[str]]:
    known = modules(src)
    return {name: imports(name, path, known) for name, path in known.items()}


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "entry"  # the package's own __init__
    if len(parts) > 2 or (REPO / "src" / "pneumonia" / parts[1]).is_dir():
        return parts[1]
    if parts[1] not in TOP_LEVEL_ROOMS:
        raise AssertionError(f"{module} is in no room: add it to TOP_LEVEL_ROOMS in tests/test_imports.py "
                             "and to docs/architecture.md")
    return TOP_LEVEL_ROOMS[parts[1]]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One path per import circle found by a depth-first search (empty when there is none)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def forbidden(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for source, targets in sorted(edges.items()):
        source_room = room(source)
        for target in sorted(targets):
            target_room = room(target)
            allowed = ALLOWED[source_room]
            if target_room == source_room or target_room in allowed or target in allowed:
                continue
            wrong.append(f"{source} ({source_room}) imports {target} ({target_room})")
    return wrong


def test_no_import_circle():
    assert cycles(graph()) == []


def test_rooms_import_only_downwards():
    assert forbidden(graph()) == []


def test_model_knows_nothing_of_files_or_stages():
    edges = graph()
    model_imports = set().union(*(targets for source, targets in edges.items() if room(source) == "model"))
    assert {"pneumonia.config", "pneumonia.logs"} <= model_imports  # the graph does see model's imports
    assert not {"pneumonia.storage", "pneumonia.layout"} & model_imports
    assert not [target for target in model_imports if room(target) in ("data", "training", "evaluation", "run")]


@pytest.mark.parametrize("source, wrong_line, complaint", [
    ("data", "from pneumonia.training import fit\n", "pneumonia.data.x (data) imports pneumonia.training.fit (training)"),
    ("model", "from pneumonia import storage\n", "pneumonia.model.x (model) imports pneumonia.storage (base)"),
    ("evaluation", "from ..training import fit\n", "pneumonia.evaluation.x (evaluation) imports pneumonia.training.fit (training)"),
])
def test_the_check_catches_a_wrong_direction_and_a_circle(tmp_path, source, wrong_line, complaint):
    # A copy of the tree with one bad import added: the same functions that pass on the real tree fail.
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (copy / "pneumonia" / source / "x.py").write_text(wrong_line)
    assert complaint in forbidden(graph(copy))
    # and a circle: storage (base) importing a module that imports storage
    (copy / "pneumonia" / "storage.py").write_text((copy / "pneumonia" / "storage.py").read_text()
                                                  + "\nfrom pneumonia import layout  # noqa\n")
    assert any("pneumonia.storage" in circle and "pneumonia.layout" in circle for circle in cycles(graph(copy)))
