"""Layering of the data side (ARCHITECTURE): corpus/ < tokenizer/ < data/, no import cycles among their files.

Imports inside functions count too: a lazy import still ties the packages together.
"""
import ast
from pathlib import Path

import zhllm

SRC = Path(zhllm.__file__).parent
LOWER_FIRST = ("corpus", "tokenizer", "data")  # each may import only the ones before it


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Names of zhllm modules `path` may import (relative imports resolved); _graph keeps the real ones."""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "zhllm"}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if name.split(".")[0] == "zhllm":  # `from .pkg import mod` imports the module pkg.mod as well
                found |= {name} | {f"{name}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in SRC.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_lower_packages_never_import_higher_ones():
    graph = _graph()
    wrong = []
    for module, deps in graph.items():
        if _package(module) not in LOWER_FIRST:
            continue
        allowed = LOWER_FIRST[:LOWER_FIRST.index(_package(module)) + 1]
        wrong += [f"{module} -> {d}" for d in deps if _package(d) in LOWER_FIRST and _package(d) not in allowed]
    assert not wrong, wrong


def test_corpus_and_special_tokens_sit_at_the_bottom():
    graph = _graph()
    corpus = {d for m, deps in graph.items() if _package(m) == "corpus" for d in deps}
    assert {_package(d) for d in corpus} <= {"corpus", "errors"}, corpus
    assert graph["zhllm.tokenizer.special"] == set()


def test_no_import_cycle_among_the_data_side_files():
    graph = {m: deps for m, deps in _graph().items() if _package(m) in LOWER_FIRST}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, " -> ".join(path[path.index(d):] + [m, d]) if d in path else f"{m} -> {d}"
            if d in graph and d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
