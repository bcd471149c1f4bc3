"""The shape of the code, as the README's "The shape of the code" section describes it
(issue #22): no import circles, a docstring on every package saying what it owns and
what it must not import, and no long function without its reason.

Import-linter (``make lint``) checks the layers between packages; these tests check what
its contracts cannot say: a circle between modules of one package, and the text.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jobrunner

ROOT = Path(jobrunner.__file__).resolve().parent

LONG_FUNCTION_LINES = 60
"""Issue #22: a function past this many lines (its docstring included) says why."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def imports_in(source: str, modules: set[str] | dict[str, Path]) -> set[str]:
    """The jobrunner modules a module's ``source`` imports anywhere in it (a deferred
    import inside a function is an import too: it is how circles hide)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (and modules that
    import themselves) of an import graph, by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_import_circles() -> None:
    modules = _modules()
    graph = {name: imports_in(path.read_text(), modules) for name, path in modules.items()}
    assert circles(graph) == []


def test_a_circle_is_found_through_a_deferred_import() -> None:
    """The search itself, so that the test above can fail."""
    names = {"jobrunner.a", "jobrunner.b", "jobrunner.c", "jobrunner.c.d"}
    assert imports_in("from jobrunner.b import x\n", names) == {"jobrunner.b"}
    assert imports_in("def f():\n    from jobrunner import a\n", names) == {"jobrunner.a"}
    assert imports_in("def f():\n    import jobrunner.a\n", names) == {"jobrunner.a"}
    assert imports_in("from jobrunner.c import d\n", names) == {"jobrunner.c.d"}
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(graph) == [["a", "b", "c"], ["e"]]


def test_every_package_says_what_it_owns_and_must_not_import() -> None:
    missing = []
    for init in sorted(ROOT.rglob("__init__.py")):
        words = (ast.get_docstring(ast.parse(init.read_text())) or "").lower().split()
        if init.parent == ROOT:
            continue  # the top package holds only the version
        if len(words) < 12 or "must not import" not in " ".join(words):
            missing.append(str(init.relative_to(ROOT.parent)))
    assert missing == [], "packages without 'what it owns' and 'Must not import'"


def long_functions() -> list[str]:
    """Functions (and methods) past LONG_FUNCTION_LINES whose docstring gives no reason
    (a sentence starting "Long because")."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            doc = " ".join((ast.get_docstring(node) or "").lower().split())
            if lines > LONG_FUNCTION_LINES and "long because" not in doc:
                out.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({lines})")
    return out


def test_no_long_function_without_its_reason() -> None:
    assert long_functions() == []
