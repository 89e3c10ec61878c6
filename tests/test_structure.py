"""The package's shape (issue 23): no import cycle, no function-local import of medlib's own modules, and no
module importing one on a floor above its own. Floors, lowest first: what a module may import is on its floor
or below. pipeline (the notebooks' steps), study and reproduce are the roof; the CLI sits on top of it."""

from __future__ import annotations

import ast
from pathlib import Path

from medlib.paths import PACKAGE_DIR

FLOORS = [
    {"medlib", "medlib.paths", "medlib.cli_common"},
    {"medlib.config", "medlib.prompts", "medlib.data.io", "medlib.data.validate"},
    {"medlib.models"},
    {"medlib.runs"},
    {"medlib.data"},
    {"medlib.training"},
    {"medlib.evaluate", "medlib.plots"},
    {"medlib.chat", "medlib.export", "medlib.report"},
    {"medlib.pipeline", "medlib.study", "medlib.reproduce"},
    {"medlib.cli", "medlib.__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def _imports_medlib(path: Path) -> bool:
    return any(isinstance(n, (ast.Import, ast.ImportFrom)) and "medlib" in ast.dump(n)
               for n in ast.parse(path.read_text()).body)


# packages whose __init__ imports medlib modules: importing anything inside them runs those imports
EAGER_PACKAGES = {name: _imports_medlib(path) for name, path in MODULES.items() if path.name == "__init__.py"}


def _targets(node: ast.AST, importer: str) -> list[str]:
    """medlib modules an import statement runs: the module itself and every package above it."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names]
    else:
        return []
    out = []
    for name in names:
        if name.split(".")[0] != "medlib":
            continue
        parts = name.split(".")
        out += [".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in MODULES]
    # a package's __init__ runs first, but only counts when it imports something; an importer's own packages
    # are already being imported when it runs
    return [t for t in out if t != importer and not importer.startswith(t + ".")
            and EAGER_PACKAGES.get(t, True)]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> the medlib modules it imports at import time, function-local imports of medlib found)."""
    graph, local = {}, []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {t for node in tree.body for t in _targets(node, name)}
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local += [f"{path.relative_to(PACKAGE_DIR.parent)}:{n.lineno} {func.name}" for n in ast.walk(func)
                          if _targets(n, name)]
    return graph, local


def floor(module: str) -> int:
    for level, members in enumerate(FLOORS):
        if any(module == m or module.startswith(m + ".") for m in members - {"medlib"}) or module == "medlib":
            return level
    raise AssertionError(f"{module} is on no floor; add it to FLOORS")


def test_no_function_imports_medlib():
    _, local = import_graph()
    assert not local, "function-local imports of medlib's own modules: " + "; ".join(local)


def test_no_import_cycle():
    graph, _ = import_graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_no_module_imports_a_floor_above_its_own():
    graph, _ = import_graph()
    upward = [f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})" for m, targets in graph.items() for t in targets
              if floor(t) > floor(m)]
    assert not upward, "; ".join(sorted(upward))


def test_the_checks_see_what_they_check(tmp_path):
    """The parser finds a function-local import and an upward one when there is one (the tests can fail)."""
    tree = ast.parse("def f():\n    from medlib.pipeline import layout\n")
    assert [t for n in ast.walk(tree) for t in _targets(n, "medlib.models")] == ["medlib.pipeline"]
    assert floor("medlib.pipeline") > floor("medlib.models") and floor("medlib.training.run") == floor("medlib.training")
