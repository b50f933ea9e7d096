"""The package's imports flow one way (README "Package map"):
typing / checks / sharding -> kernels -> models -> data -> checkpoint -> rl -> train -> eval / convert,
and no two modules import each other, even through function-level imports."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "zipr1_jax")
# Lower number = lower layer; a module may import only its own layer or lower ones.
LAYERS = {"typing": 0, "checks": 0, "sharding": 0, "kernels": 1, "models": 2, "data": 3, "checkpoint": 4, "rl": 5, "train": 6,
          "eval": 7, "convert": 7}


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(path: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(n, m) for n, m in found if m.startswith("zipr1_jax.")]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_imports_flow_one_way():
    wrong = []
    for module, path in _modules().items():
        src = _layer(module)
        for line, target in _imports(path):
            dst = _layer(target)
            if src is not None and dst is not None and dst > src:
                wrong.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(set(wrong)))


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for _, target in _imports(path):
            while target and target not in modules:  # `from a.b import name` names module a.b
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    # Packages' __init__ re-export their modules: an edge into a package is an edge to what it holds.
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own modules
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
