"""The package's floor plan, enforced: every import inside ``lnjax`` points down the layer table.

Layers, bottom to top (a module may import its own subpackage and any layer below it, never one above;
docs/method.md §0 and README "What is inside" describe them). The check reads every ``import`` statement of every
module with ``ast`` — also the ones inside functions, which run later but are dependencies all the same — so an
upward import cannot hide in a lazy import. ``lnjax/__init__.py`` and ``lnjax/__main__.py`` are the public face and
may import any layer; nothing inside the package imports them (checked too).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

LAYERS = ("core", "models", "editors", "io", "engine", "data", "eval", "world", "app")
PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lnjax"


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every lnjax import in ``source`` (``from X import y`` counts as X.y and X)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lnjax"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lnjax":
                continue
            # ``from lnjax import world`` imports lnjax.world: resolve each name that is a subpackage
            if target == "lnjax":
                out += [(node.lineno, f"lnjax.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def layer_of(module: str):
    """The layer index of an ``lnjax...`` module, or None for the public face (``lnjax`` itself)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None
    if parts[1] == "__version__":
        return None
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module}: not in any layer {LAYERS} (add it to a subpackage)")
    return LAYERS.index(parts[1])


def violations(files: dict[str, tuple[str, bool]]) -> list[str]:
    """Upward imports in ``files`` ({module name: (source, is_package)}), as readable strings."""
    bad = []
    for module, (source, is_package) in sorted(files.items()):
        src_layer = layer_of(module)
        for line, target in imported_modules(source, module, is_package):
            dst_layer = layer_of(target)
            if src_layer is None:          # the public face may import anything
                continue
            if dst_layer is None:
                bad.append(f"{module}:{line} imports the public face {target!r}")
            elif dst_layer > src_layer:
                bad.append(f"{module}:{line} imports {target} ({LAYERS[dst_layer]} is above {LAYERS[src_layer]})")
    return bad


def package_files(root: pathlib.Path = PACKAGE) -> dict[str, tuple[str, bool]]:
    return {_module_name(p, root): (p.read_text(), p.name == "__init__.py") for p in sorted(root.rglob("*.py"))}


def test_imports_point_down():
    bad = violations(package_files())
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_module_is_in_a_layer():
    top = {p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert top - {"__init__.py", "__main__.py"} == set(LAYERS)


@pytest.mark.parametrize("source, expect", [
    ("from lnjax.app import run\n", "app is above core"),
    ("def f():\n    from ..world import default_world\n", "world is above core"),
    ("from lnjax import eval\n", "eval is above core"),
    ("import lnjax\n", "public face"),
    ("from . import ln\nfrom lnjax.core.solve import ridge_shift\n", None),
])
def test_the_check_fails_on_an_upward_import(source, expect):
    files = {"lnjax.core.new_module": (source, False)}
    bad = violations(files)
    if expect is None:
        assert bad == []
    else:
        assert any(expect in b for b in bad), bad
