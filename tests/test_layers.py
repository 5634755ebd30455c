"""Imports point down the layers of DESIGN.md: a module imports only modules of its own layer or below.

The one upward edge is deliberate and lazy: ``MaskSpec.block_layout`` / ``MaskSpec.varlen`` (methods the issues ask
for on the spec) import ``attnmask.lowering`` inside the method.
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
    # 1: the spec algebra and its expression parser
    "masks": 1,
    "expr": 1,
    # 2: lowering
    "lowering": 2,
    # 3: attention and its backends
    "plancache": 3,
    "backends": 3,
    "backends.contract": 3,
    "backends._common": 3,
    "backends.reference": 3,
    "backends.sdpa": 3,
    "backends.varlen": 3,
    "backends.blocksparse": 3,
    "backends.banded": 3,
    "backends.native": 3,
    "backends.flex": 3,
    "attention": 3,
    # 4-7: batches, packing, labels and loss, generation
    "batch": 4,
    "tokenizers": 4,
    "pack": 5,
    "labels": 6,
    "loss": 6,
    "generation": 7,
    # 8: integrations
    "integrations": 8,
    "integrations.hf": 8,
    "integrations.datasets": 8,
    "distributed": 8,
    # 9: the command line and pictures
    "cli": 9,
    "viz": 9,
    "demo": 9,
    "packfile": 9,
}
LAZY_UPWARD = {("masks", "lowering")}


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
                if child.module == "attnmask":
                    found.extend((alias.name, in_function) for alias in child.names)
                else:
                    found.append((child.module.removeprefix("attnmask."), in_function))
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


def test_every_module_has_a_layer():
    assert {module_name(p) for p in MODULES} <= set(LAYER)


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_point_down_the_layers(path):
    here = module_name(path)
    for target, lazy in imports(path):
        if target not in LAYER:  # a name imported from the package itself (``from attnmask import x``)
            continue
        upward = LAYER[target] > LAYER[here]
        assert not upward or (lazy and (here, target) in LAZY_UPWARD), f"{here} (layer {LAYER[here]}) imports {target}"
