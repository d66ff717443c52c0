"""The package's layers, read from its source: every import points down a layer (or within one), no two
modules import each other (directly or around a circle), and an import inside a function only defers a
module that loads torch or another heavy library.

The layers, bottom first, are those the README's Layout section describes; a module missing from the
Layout section fails here too, so the description cannot drift from the tree.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from repo import REPO

ROOT = REPO
PACKAGE = ROOT / "python" / "devicemap"
README = ROOT / "README.md"

# Bottom first. A module may import from its own layer and the ones below it.
LAYERS: list[tuple[str, ...]] = [
    ("devicemap._core", "devicemap.errors", "devicemap.formatting"),
    ("devicemap.inputs",),
    ("devicemap.sizing",),
    ("devicemap.cost",),
    ("devicemap.plans",),
    ("devicemap.planners",),
    ("devicemap.loading",),
    ("devicemap.compat",),
    ("devicemap.integrations",),
    ("devicemap.catalog",),
    ("devicemap.cli",),
]
HEAVY_LIBRARIES = {"torch", "transformers", "accelerate", "diffusers", "peft", "safetensors", "numpy"}


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int
    in_function: bool
    typing_only: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    if module == "devicemap":
        return len(LAYERS)  # the package's front: it re-exports every layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's Layout section)")


def resolve(source: str, node: ast.ImportFrom, alias: str | None) -> str:
    is_package = MODULES[source].name == "__init__.py"
    base = source.split(".") if is_package else source.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if alias is not None and (f"{target}.{alias}" in MODULES or f"{target}.{alias}" == "devicemap._core"):
        return f"{target}.{alias}"  # `from . import owned_folders` imports a module
    return target


def walk(
    tree: ast.AST, in_function: bool = False, typing_only: bool = False
) -> Iterator[tuple[ast.AST, bool, bool]]:
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for grandchild in child.body:
                yield grandchild, in_function, True
                yield from walk(grandchild, in_function, True)
            for grandchild in child.orelse:
                yield grandchild, in_function, typing_only
                yield from walk(grandchild, in_function, typing_only)
            continue
        yield child, in_function, typing_only
        nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from walk(child, nested, typing_only)


def imports_of(source: str) -> list[Import]:
    found = []
    for node, in_function, typing_only in walk(ast.parse(MODULES[source].read_text())):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                target = resolve(source, node, alias.name)
                if target == "devicemap" or target.startswith("devicemap."):
                    found.append(Import(source, target, node.lineno, in_function, typing_only))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("devicemap."):
                    found.append(Import(source, alias.name, node.lineno, in_function, typing_only))
    return found


def heavy_at_import(module: str, seen: set[str] | None = None) -> bool:
    """Whether importing ``module`` loads torch or another heavy library (itself or through the modules it
    imports at module level)."""
    seen = set() if seen is None else seen
    if module in seen or module not in MODULES:
        return False
    seen.add(module)
    for node, in_function, typing_only in walk(ast.parse(MODULES[module].read_text())):
        if in_function or typing_only:
            continue
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in HEAVY_LIBRARIES for a in node.names):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and (node.module or "").split(".")[0] in HEAVY_LIBRARIES
        ):
            return True
    return any(
        heavy_at_import(i.target, seen)
        for i in imports_of(module)
        if not i.in_function and not i.typing_only and i.target != module
    )


ALL_IMPORTS = [i for m in MODULES for i in imports_of(m)]


def test_every_import_points_down_a_layer() -> None:
    upward = [
        f"{i.source}:{i.line} imports {i.target} (layer {layer_of(i.target)} above {layer_of(i.source)})"
        for i in ALL_IMPORTS
        if i.source != "devicemap" and layer_of(i.target) > layer_of(i.source)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in ALL_IMPORTS:
        if i.target in MODULES and i.target != i.source:
            graph[i.source].add(i.target)
    # A package imports its own modules (re-exports); its modules reach the package only through these.
    circles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_imports_inside_functions_only_defer_heavy_modules() -> None:
    needless = [
        f"{i.source}:{i.line} imports {i.target} inside a function, though importing it loads no heavy library"
        for i in ALL_IMPORTS
        if i.in_function and not heavy_at_import(i.target)
    ]
    assert not needless, "\n".join(needless)


def layout_section() -> str:
    text = README.read_text()
    match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, "README.md has no '## Layout' section"
    return match.group(1)


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if MODULES[m].name != "__init__.py" or m != "devicemap")
)
def test_the_readme_layout_names_every_module(module: str) -> None:
    path = MODULES[module].relative_to(PACKAGE)
    shown = path.parent.as_posix() + "/" if path.name == "__init__.py" else path.name
    assert shown in layout_section(), (
        f"README.md's Layout section does not mention {path} ({module}); describe it there"
    )


def test_the_checker_reads_real_imports() -> None:
    """The rules above are not vacuous: the reader finds the package's imports and tells heavy modules from
    light ones."""
    lower, higher = "devicemap.inputs.memory", "devicemap.planners.solve"
    assert layer_of(lower) < layer_of(higher)
    assert any(
        i.source == "devicemap.planners.solve" and layer_of(i.target) < layer_of(i.source)
        for i in ALL_IMPORTS
    )
    assert heavy_at_import("devicemap.loading.apply")  # imports torch at module level
    assert not heavy_at_import("devicemap.errors")
