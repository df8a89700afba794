"""The package's floors: every module imports only from the floors below it (and, within its floor, from the
modules listed before it in the README's Architecture section), so there are no import circles."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _floors():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Architecture", 1)[1].split("```", 2)[1]
    order = re.findall(r"^  (\w+)\.py", block, re.M)
    return order


def test_readme_lists_every_module_once():
    order = _floors()
    modules = sorted(p.stem for p in (ROOT / "lmsys_utils").glob("*.py") if not p.stem.startswith("__"))
    assert sorted(order) == modules and len(set(order)) == len(order)


def test_modules_import_only_what_is_listed_before_them():
    order = _floors()
    for name in order:
        tree = ast.parse((ROOT / "lmsys_utils" / f"{name}.py").read_text())
        imported = {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        later = [m for m in imported if order.index(m) >= order.index(name)]
        assert not later, f"{name}.py imports {later}, listed at or after it: a circle waiting to happen"
