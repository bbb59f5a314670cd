"""The layering, read from the imports themselves (ast, nothing is imported or run).

- `shared/` is the bottom layer: it imports none of our other packages;
- `learner/` and `rollout_server/` never import each other: they talk through `shared/` only;
- nothing imports another package's private names (`_x`), neither by `from m import _x`, nor a
  private module (`m._y`), nor an attribute (`m._x`) of a module it imported.

Each `import` counts wherever it is written (lazily inside a function, under TYPE_CHECKING).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "learner", "rollout_server", "deploy", "demo", "bench", "tests")
# top-level modules that belong to a package folder (pytest puts tests/ on sys.path for conftest)
MODULE_PACKAGE = {"conftest": "tests"}
# importer package -> our packages it must not import
FORBIDDEN = {
    "shared": set(PACKAGES) - {"shared"},
    "learner": {"rollout_server"},
    "rollout_server": {"learner"},
}


def _package_of(module: str) -> str | None:
    top = module.split(".")[0]
    top = MODULE_PACKAGE.get(top, top)
    return top if top in PACKAGES else None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def violations(source: str, package: str, where: str = "<source>") -> list[str]:
    """Every layering rule `source` (a file of `package`) breaks, one line each."""
    tree = ast.parse(source)
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name -> the other package's module it is bound to

    def check(module: str, line: int, names: list[str] = ()) -> None:
        other = _package_of(module)
        if other is None or other == package:
            return
        if other in FORBIDDEN.get(package, ()):
            found.append(f"{where}:{line}: {package} imports {module}")
        for part in module.split(".")[1:] + list(names):
            if _private(part):
                found.append(f"{where}:{line}: {package} imports {other}'s private {module}:{part}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                check(a.name, node.lineno)
                bound = a.asname or a.name.split(".")[0]
                aliases[bound] = a.name if a.asname else bound
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            check(node.module, node.lineno, [a.name for a in node.names])
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            module = aliases.get(root.id) if isinstance(root, ast.Name) else None
            if module and _package_of(module) not in (None, package):
                found.append(f"{where}:{node.lineno}: {package} uses {module}'s private .{node.attr}")
    return found


def _sources():
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            yield pkg, path


def test_the_tree_keeps_the_layering():
    found = [
        v for pkg, path in _sources() for v in violations(path.read_text(), pkg, str(path.relative_to(REPO)))
    ]
    assert not found, "layering broken:\n" + "\n".join(found)
    assert sum(1 for _ in _sources()) > 50  # the walk really saw the tree


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("shared", "from rollout_server.settings import ServerSettings"),
        ("shared", "def f():\n    import learner.loss\n"),
        ("shared", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from learner import recipe\n"),
        ("learner", "from rollout_server import service"),
        ("rollout_server", "import learner.recipe as r"),
        ("rollout_server", "from shared.config import _argkw"),
        ("demo", "from learner.data import _end_at_eos"),
        ("bench", "import shared._hidden"),
        ("tests", "import shared.config as c\nc._bool('1')\n"),
        ("tests", "from shared import config\nconfig._Parser\n"),
    ],
)
def test_each_rule_catches_its_break(package, source):
    assert violations(source, package), f"not caught in {package}: {source!r}"


@pytest.mark.parametrize(
    ("package", "source"),
    [
        ("shared", "from shared.config import Parser, argkw\nimport os\nos._exit(0)\n"),
        ("learner", "from learner.loss import divergence\nfrom shared import messages\n"),
        ("tests", "from conftest import _free_port\nimport msgspec\nmsgspec._core\n"),
        ("deploy", "from rollout_server.ray_actor import start_rollout_actor\nimport learner.recipe\n"),
    ],
)
def test_what_is_allowed_stays_allowed(package, source):
    assert violations(source, package) == []
