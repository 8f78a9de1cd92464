"""The layout of ``lpc/``: read from the source (ast), not by importing it. No import cycle between its modules, no
module imports another's private name, and function-local imports only of optional dependencies (so that
the import graph is what the top of each file says)."""

import ast

from tests.helpers import REPO
from tests.helpers.import_graph import find_cycles, import_target, parse_modules

PACKAGE = REPO / "lpc"
OPTIONAL = {"yaml", "matplotlib", "peft", "sklearn", "datasets", "pyarrow", "trl", "accelerate"}
# the documented order of lpc's modules (README.md, "Layout"), bottom to top: a module imports only modules of its own
# group or of the groups before it (a package, such as data, counts as one module)
ORDER = (("config", "io"), ("runtime", "distributed", "tracking"), ("data", "analysis", "plots"), ("hf",),
         ("objective",), ("model",), ("losses",), ("builders", "checkpoint", "reference", "cli"), ("evaluate",),
         ("train_components",), ("train", "generate", "experiments", "integrations", "tiny_model"))


def _imports():
    """``(importer, imported lpc module, names, at top level)`` for every import of an ``lpc`` module, and every
    function-local import of anything."""
    mods = parse_modules(PACKAGE)
    edges, local = [], []
    for name, (path, tree) in mods.items():
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if id(node) not in top:
                local.append((name, node.lineno, node.module if isinstance(node, ast.ImportFrom)
                              else node.names[0].name))
            if isinstance(node, ast.Import):
                edges += [(name, a.name, [], None) for a in node.names if a.name in mods]
                continue
            target = import_target(name, path, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in mods:
                    edges.append((name, sub, [], node))
                elif target in mods:
                    edges.append((name, target, [alias.name], node))
    return mods, edges, local


def test_no_import_cycle():
    mods, edges, _ = _imports()
    graph = {m: {b for a, b, _, _ in edges if a == m and b != m} for m in mods}
    cycles = find_cycles(graph)
    assert not cycles, cycles


def test_no_private_name_imported_from_another_module():
    _, edges, _ = _imports()
    private = [(a, b, n) for a, b, names, _ in edges for n in names if n.startswith("_")]
    assert not private, private


def test_function_local_imports_are_optional_dependencies():
    _, _, local = _imports()
    assert all(mod.split(".")[0] in OPTIONAL for _, _, mod in local), local


def test_modules_import_only_modules_below_them():
    mods, edges, _ = _imports()
    group = {name: i for i, names in enumerate(ORDER) for name in names}

    def top(module):  # lpc.data.batching -> data
        return module.split(".")[1] if module.count(".") else None

    assert {top(m) for m in mods} - {None} == set(group), "a module missing from ORDER (or ORDER names a gone one)"
    upward = [(a, b) for a, b, _, _ in edges if top(a) and top(b) and group[top(b)] > group[top(a)]]
    assert not upward, upward
