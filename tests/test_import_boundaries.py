"""Import boundaries, checked by reading the source (ast), so nothing is imported to check them.

* No product module imports the reference checker (``selva.reference``): it verifies our modules
  against the official vectors and must stay removable. The one door is the CLI, whose
  ``check-reference`` verb runs it.
* ``selva`` imports none of the other project packages (DESIGN §2: dependencies point one way).
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
