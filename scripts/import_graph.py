"""The import graph of aid_cli, file by file, checked against the layers of docs/design.md: no file imports a file of a
higher layer, and no files import each other in a circle. Every import counts, also those inside functions.

    python scripts/import_graph.py [PACKAGE_DIR]      # default: this checkout's aid_cli; exit 1 on a problem

tests/test_layers.py runs the same check.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# The layers, lowest first (docs/design.md, "Layers"): a module may import its own layer and the ones below.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "threads", "fileio", "download", "paths", "task"),  # leaves: paths, files, the Task
    ("sampling",),  # the σ grid and the one loop
    ("backbones", "data", "plots", "devices", "training"),  # networks, VAE and spaces, images, datasets, pictures
    ("methods", "metrics", "guidance.networks", "guidance.checkpoint"),  # methods on the loop's hooks, metrics
    ("models",),  # the model catalogue and cache, tuned parameters
    ("resolve", "inpainter"),  # which method runs; backbone + space + method -> pixels
    ("fill", "jobs", "bench", "evaluate", "guidance", "pretrain", "environment", "serve"),  # the products: files,
    # benchmarks, scores of files and backbones, training, the page
    ("cli",),  # parse, call, print
]


def layer_of(module: str) -> int:
    """The layer of `module` (dotted, without the `aid_cli.` prefix): its longest matching prefix in LAYERS."""
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and name.count(".") > depth:
                best, depth = i, name.count(".")
    if best is None:
        raise KeyError(f"{module} is in no layer of scripts/import_graph.py")
    return best


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, set[str]]:
    """module → the aid_cli modules it imports (files only: `from .x import name` counts as an import of x, or of
    x.name when that is a module of its own)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == root.name:
                    target = node.module.partition(".")[2]
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    found.add(sub if sub in files else target)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == root.name:
                        found.add(alias.name.partition(".")[2])
        graph[mod] = {m for m in found if m in files and m != mod and m}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where a file imports a file of a higher layer. A package's __init__ may import its
    own modules (it is their front door), and aid_cli's own __init__ ("") any of them."""
    bad = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            if not mod or t.startswith(mod + "."):  # a package's own modules
                continue
            if layer_of(t) > layer_of(mod):
                bad.append((mod, t))
    return bad


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "aid_cli"
    graph = imports(root)
    found_cycles, found_up = cycles(graph), upward(graph)
    print(f"{len(graph)} modules, {sum(len(v) for v in graph.values())} imports")
    for comp in found_cycles:
        print("cycle:", " <-> ".join(comp))
    for a, b in found_up:
        print(f"upward: {a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})")
    packages: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        packages.setdefault(mod.split(".")[0], set()).update(t.split(".")[0] for t in targets)
    for comp in cycles({k: v - {k} for k, v in packages.items()}):
        print("(folders that import each other, no file cycle:", " <-> ".join(comp) + ")")
    if not found_cycles and not found_up:
        print("no cycles, no upward imports")
    return 1 if found_cycles or found_up else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
