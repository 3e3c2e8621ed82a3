"""The layering of ``supervisor/``, as ``docs/architecture.md`` states it: every module is in
the layer table, and no module imports one of a higher layer (row types import nothing of the
project; storage and parsing never import the owner or the HTTP layer)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "supervisor"
DOC = REPO / "docs" / "architecture.md"


def layers() -> dict[str, int]:
    """module (dotted, without ``supervisor.``; the package itself is ``supervisor``) →
    layer number, read from the table of ``docs/architecture.md``."""
    out: dict[str, int] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*(\d+) [^|]*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                out[name] = int(m.group(1))
    return out


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts) or "supervisor"] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (anywhere in it: top level, functions,
    ``TYPE_CHECKING`` blocks)."""
    package = name.split(".") if path.name == "__init__.py" and name != "supervisor" else (
        name.split(".")[:-1] if name != "supervisor" else [])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
            elif node.module and (node.module == "supervisor"
                                  or node.module.startswith("supervisor.")):
                base, node_module = [], node.module.removeprefix("supervisor").lstrip(".")
                target = node_module.split(".") if node_module else []
                found |= _resolve(target, node.names, known)
                continue
            else:
                continue
            target = base + (node.module.split(".") if node.module else [])
            found |= _resolve(target, node.names, known)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("supervisor."):
                    found.add(alias.name.removeprefix("supervisor."))
    found.discard(name)
    return found


def _resolve(target: list[str], names: list[ast.alias], known: set[str]) -> set[str]:
    dotted = ".".join(target) or "supervisor"
    out = set()
    for alias in names:  # ``from . import events``: the module events
        sub = f"{dotted}.{alias.name}" if target else alias.name
        if sub in known:
            out.add(sub)
        else:
            out.add(dotted)
    return out


def test_every_module_has_a_layer() -> None:
    table, mods = layers(), modules()
    assert sorted(set(mods) - set(table)) == [], "add them to docs/architecture.md's table"
    assert sorted(set(table) - set(mods)) == [], "the table names modules that do not exist"


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_a_higher_layer(name: str) -> None:
    table, mods = layers(), modules()
    upward = {m: table[m] for m in imports(name, mods[name], set(mods))
              if table.get(m, -1) > table.get(name, 99)}
    assert upward == {}, f"{name} (layer {table.get(name)}) imports {upward}"


def test_row_types_import_nothing_of_the_project() -> None:
    mods = modules()
    assert imports("rows", mods["rows"], set(mods)) == set()


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser of imports finds each form a module can use."""
    src = tmp_path / "mod.py"
    src.write_text("from .daemon import Supervisor\nfrom . import events\n"
                   "from .journal.store import Store\nimport supervisor.proxy\n"
                   "def f():\n    from .api import Api\n")
    found = imports("records", src, set(modules()))
    assert found == {"daemon", "events", "journal.store", "proxy", "api"}
