"""The README's module map (Development) is the layering rule: every module of the ``uagw`` package has a
row, and each imports at run time only modules listed above it (names used only in annotations, under
TYPE_CHECKING, excepted), so the import graph flows one way. Derived from the table and the code, so a
module added later is checked too."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `(uagw/[a-z_0-9]+\.py|ops_service\.py)`")


def table_order() -> List[str]:
    """Module names in the order of the README's module map ("ops_service", "limits", ...)."""
    order = []
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            order.append(Path(match.group(1)).stem)
    return order


def runtime_imports(path: Path) -> Set[str]:
    """The ``uagw`` modules and ops_service that ``path`` imports outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
               for node in ast.walk(block)}
    found: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module == "ops_service":
            found.add("ops_service")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "ops_service")
    return found - {"__version__"}


def package_modules() -> Dict[str, Path]:
    return {path.stem: path for path in sorted((REPO / "uagw").glob("*.py")) if not path.stem.startswith("__")}


def test_every_package_module_has_a_row_in_the_module_map():
    missing = set(package_modules()) - set(table_order())
    assert not missing, f"add these modules to the README's module map: {sorted(missing)}"


def test_each_module_imports_only_modules_above_it_in_the_map():
    order = table_order()
    rank = {name: index for index, name in enumerate(order)}
    upward = []
    for name, path in package_modules().items():
        for imported in sorted(runtime_imports(path)):
            if imported in rank and rank[imported] >= rank[name]:
                upward.append(f"{name} imports {imported}, listed below it")
    assert not upward, upward


def test_each_module_says_what_it_may_import():
    silent = [name for name, path in package_modules().items()
              if not re.search(r"May import|imports nothing", path.read_text(encoding="utf-8")[:3000])]
    assert not silent, f"these modules' docstrings do not say what they may import: {silent}"
