"""The layout of ``lpc/``: read from the source (ast), not by importing it. No import cycle between its modules, no
module imports another's private name, and function-local imports only of optional dependencies (so that
the import graph is what the top of each file says)."""

import ast

from tests.helpers import REPO

PACKAGE = REPO / "lpc"
OPTIONAL = {"yaml", "matplotlib", "peft", "sklearn", "datasets", "pyarrow", "trl", "accelerate"}


def _modules() -> dict:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _target(module: str, path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if node.level == 0:
        return node.module
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports():
    """``(importer, imported lpc module, names, at top level)`` for every import of an ``lpc`` module, and every
    function-local import of anything."""
    mods = _modules()
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
            target = _target(name, path, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in mods:
                    edges.append((name, sub, [], node))
                elif target in mods:
                    edges.append((name, target, [alias.name], node))
    return mods, edges, local


def test_no_import_cycle():
    mods, edges, _ = _imports()
    graph = {m: sorted({b for a, b, _, _ in edges if a == m and b != m}) for m in mods}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_no_private_name_imported_from_another_module():
    _, edges, _ = _imports()
    private = [(a, b, n) for a, b, names, _ in edges for n in names if n.startswith("_")]
    assert not private, private


def test_function_local_imports_are_optional_dependencies():
    _, _, local = _imports()
    assert all(mod.split(".")[0] in OPTIONAL for _, _, mod in local), local
