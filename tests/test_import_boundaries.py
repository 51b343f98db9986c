"""Import boundaries, checked by reading the source (ast), so nothing is imported to check them.

* No product module imports the reference checker (``selva.reference``): it verifies our modules
  against the official vectors and must stay removable. The one door is the CLI, whose
  ``check-reference`` verb runs it.
* ``selva`` imports none of the other project packages (DESIGN §2: dependencies point one way).
* No import cycles between product modules, deferred imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRODUCT_PACKAGES = ("selva", "preprocessing", "pipelines", "training", "selva_cli")
# The CLI dispatches ``selva check-reference`` to the checker and lists the checker's input errors
# among the expected (one-line) errors; that is the verb, not a product dependency.
REFERENCE_DOOR = {"selva_cli/main.py"}


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _product_files() -> list[Path]:
    files = [p for package in PRODUCT_PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    return [p for p in files if not p.relative_to(ROOT).as_posix().startswith("selva/reference/")]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_product_modules_never_import_the_reference_checker():
    files = _product_files()
    assert any(p.name == "embedded.py" for p in files)  # the scan does see the text package
    offenders = {
        p.relative_to(ROOT).as_posix(): sorted(n for n in _imports(p) if _within(n, "selva.reference"))
        for p in files
        if p.relative_to(ROOT).as_posix() not in REFERENCE_DOOR
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_selva_imports_no_other_project_package():
    others = [p for p in PRODUCT_PACKAGES if p != "selva"]
    offenders = {
        p.relative_to(ROOT).as_posix(): sorted(n for n in _imports(p) if any(_within(n, o) for o in others))
        for p in sorted((ROOT / "selva").rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scan_sees_imports_in_function_bodies(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from selva.reference.weight_rule import uni\n    import selva.reference\n")
    assert {"selva.reference.weight_rule", "selva.reference"} <= _imports(module)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_cycles() -> list[list[str]]:
    """Cycles in the graph of product modules, counting imports inside functions too: a deferred
    import hides a cycle from Python's loader, not from the next reader."""
    files = {_module_name(p): p for p in _product_files()}
    graph = {m: sorted({n for n in _imports(p) if n in files and n != m}) for m, p in files.items()}
    cycles, state = [], {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for nxt in graph[module]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycles_between_product_modules():
    assert _import_cycles() == []
