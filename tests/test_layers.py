"""Imports point down the layers of DESIGN.md, and no import cycle exists, not even within one layer.

A module imports only modules of its own layer or below, at the top of the file or inside a function alike; the
import graph of the package (both kinds of import) has no cycle. ``MaskSpec.block_layout`` / ``MaskSpec.varlen`` reach
``attnmask.lowering`` through ``masks.LOWERINGS``, which lowering fills when it is imported, not by importing it.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "attnmask"

LAYER = {
    # 0: leaf helpers
    "errors": 0,
    "_checks": 0,
    "_dense": 0,
    "_spans": 0,
    "tiles": 0,  # tile grid and interval arithmetic, below the spec algebra
    "_draw": 0,  # the text-drawing primitives of viz that lowering and pack print through
    # 1: the spec algebra and its expression parser
    "masks": 1,
    "expr": 1,
    # 2: lowering
    "lowering": 2,
    # 3: attention and its backends
    "plancache": 3,
    "tuning": 3,
    "backends": 3,
    "backends.contract": 3,
    "backends._clib": 3,
    "backends._common": 3,
    "backends._workers": 3,
    "backends.reference": 3,
    "backends.sdpa": 3,
    "backends.varlen": 3,
    "backends.blocksparse": 3,
    "backends.banded": 3,
    "backends.native": 3,
    "backends.flex": 3,
    "backends.cuda_costs": 3,
    "backends.packed": 3,
    "backends.cuda_varlen": 3,
    "backends.flash": 3,
    "attention": 3,
    # 4-7: batches, packing, labels and loss, generation
    "batch": 4,
    "tokenizers": 4,
    "pack": 5,
    "labels": 6,
    "loss": 6,
    "chat": 6,
    "generation": 7,
    # 8: integrations
    "integrations": 8,
    "integrations.hf": 8,
    "integrations.datasets": 8,
    "integrations.ranks": 8,
    "integrations.context_parallel": 8,
    "integrations.sampler": 8,
    "distributed": 8,
    # 9: the command line and pictures
    "cli": 9,
    "chatcli": 9,
    "viz": 9,
    "demo": 9,
    "packfile": 9,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(attnmask module imported, whether the import sits inside a function)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "attnmask":
                package = child.module.removeprefix("attnmask").removeprefix(".")
                if package:
                    found.append((package, in_function))
                # ``from attnmask.pkg import sub`` imports the module ``pkg.sub`` when there is one
                found.extend(
                    (name, in_function)
                    for alias in child.names
                    if (name := f"{package}.{alias.name}".lstrip(".")) in module_names()
                )
            elif isinstance(child, ast.Import):
                found.extend(
                    (a.name.removeprefix("attnmask."), in_function)
                    for a in child.names
                    if a.name.startswith("attnmask.")
                )
            visit(child, nested)

    visit(tree, False)
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if module_name(p) != "")


def module_names() -> set[str]:
    return {module_name(p) for p in MODULES}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top of the file or inside a function."""
    names = module_names()
    return {
        module_name(p): {target for target, _ in imports(p) if target in names and target != module_name(p)}
        for p in MODULES
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each a cycle or several), sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_every_module_has_a_layer():
    assert module_names() <= set(LAYER)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_point_down_the_layers(path):
    here = module_name(path)
    for target, lazy in imports(path):
        if target not in LAYER:  # a name imported from the package itself (``from attnmask import x``)
            continue
        kind = "inside a function" if lazy else "at the top"
        assert LAYER[target] <= LAYER[here], f"{here} (layer {LAYER[here]}) imports {target} {kind}"


def test_no_import_cycle_not_even_within_a_layer_or_through_a_lazy_import():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_cycles_within_a_layer_and_through_lazy_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert ("demo", True) in imports(PACKAGE / "cli.py") and "demo" in import_graph()["cli"]  # a lazy import
    assert "integrations.context_parallel" in import_graph()["distributed"]  # ``from attnmask.pkg import name``


TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_test_files_import_helpers_never_another_test_file(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            assert not name.startswith("tests.test_"), f"{path.name} imports {name}: move it to tests/helpers.py"
