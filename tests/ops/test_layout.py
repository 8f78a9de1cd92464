"""The import graph of ``lpc_kernels``, read from the source (ast), function-local imports included: no cycle, and
the leaf modules that the backends and the op layer share import nothing of the package beyond their leaves."""

import ast

from tests.helpers import REPO
from tests.helpers.import_graph import find_cycles, import_target, parse_modules

PACKAGE = REPO / "lpc_kernels"
EXTENSIONS = {"lpc_kernels._C"}  # compiled from csrc/ (setup.py): imports nothing of the package
# leaf -> what of the package it may import (the rest of its imports are torch, triton, the standard library)
LEAVES = {"lpc_kernels.numerics": set(), "lpc_kernels.checks": {"lpc_kernels.numerics"},
          "lpc_kernels.extension": set(),  # setup.py reads it by path, before torch or the package can be imported
          "lpc_kernels.shapes": {"lpc_kernels.numerics"},
          "lpc_kernels.preference": {"lpc_kernels.checks"}}


def _graph() -> dict:
    """Module -> the package's modules it imports, at the top of the file or inside a function."""
    mods = parse_modules(PACKAGE)
    graph = {name: set() for name in mods}
    for name, (path, tree) in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                target = import_target(name, path, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        graph[name].add(sub)
                    elif sub not in EXTENSIONS and target in mods:
                        graph[name].add(target)
        graph[name].discard(name)
    return graph


def test_no_import_cycle():
    cycles = find_cycles(_graph())
    assert not cycles, cycles


def test_the_cycle_check_finds_a_cycle():
    graph = _graph()
    graph["lpc_kernels.numerics"].add("lpc_kernels.backends")  # backends -> reference -> numerics
    assert find_cycles(graph)


def test_leaf_modules_import_only_leaves():
    graph = _graph()
    for leaf, allowed in LEAVES.items():
        assert graph[leaf] <= allowed, (leaf, graph[leaf] - allowed)


def _bench_graph() -> dict:
    """``benches/``: flat scripts importing each other by bare module name (pytest puts the folder on sys.path)."""
    files = {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted((REPO / "benches").glob("*.py"))}
    graph = {name: set() for name in files}
    for name, tree in files.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in files:
                graph[name].add(node.module)
        graph[name].discard(name)
    return graph


def test_benches_have_no_import_cycle():
    graph = _bench_graph()
    assert not any("_memory" in deps for deps in graph.values()), \
        "benches/_memory.py is a script run in a subprocess: nothing imports it"
    assert not find_cycles(graph), find_cycles(graph)
