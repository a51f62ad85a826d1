"""Package layering, checked by parsing source with `ast` (nothing of the project is imported).

Layers, in pipeline order; a module may import its own package and packages of earlier layers only
(two packages of one layer may not import each other):

0. `base`: the shared base (config, schemas, Hub format, data, distributed, files, training skeleton).
1. `grid` (the grid autoencoders) and `bpe_image` (BPE over codes): each depends on `base` only.
2. `flextok`: the 1D tokenizer and the tokenizer stage over both families; may use `grid`.
3. `priors`: may depend on all of the above.
4. `codec`: the image codec; may depend on all of the above.
5. `evaluation`: may depend on all of the above.
6. scripts: the top-level `*.py` files and `benchmarks/*.py`; may import anything.

An import is an `import` / `from` statement anywhere in a module (relative ones resolved), or
`importlib.import_module("x.y")` / `__import__("x.y")` with a string constant. A string constant
that is a dotted path into a later layer's package (a lazy-import table) is flagged as well.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from itertools import combinations
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"base": 0, "grid": 1, "bpe_image": 1, "flextok": 2, "priors": 3, "codec": 4, "evaluation": 5}
SCRIPT_LAYER = max(PACKAGES.values()) + 1
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}
DOTTED = re.compile(r"^(%s)(\.[A-Za-z_][A-Za-z0-9_]*)+$" % "|".join(PACKAGES))


class Edge(NamedTuple):
    """An import of `target` (`from a import b` gives `a.b`: `b` may be a submodule) by module `src`."""

    file: str
    line: int
    src: str
    target: str
    kind: str  # "import" or "string"
    layer: int  # of `src`
    is_init: bool


def collect(source: str, module: str, is_package: bool = False, filename: str = "<string>") -> list[tuple]:
    """`(line, dotted name, kind)` for every import in `source`, the code of module `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found, seen_args = [], set()
    for node in ast.walk(ast.parse(source, filename)):  # parents come before their children
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, "import") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(parts + ([node.module] if node.module else []))
            found += [(node.lineno, base if a.name == "*" else f"{base}.{a.name}", "import") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value, "import"))
                seen_args.add(id(node.args[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in seen_args:
            if DOTTED.match(node.value):
                found.append((node.lineno, node.value, "string"))
    return sorted(found)


@lru_cache(maxsize=None)
def project() -> tuple[list[Edge], frozenset[str]]:
    """Every import edge of the project, and the dotted names of all its modules."""
    files = [(path, layer) for pkg, layer in PACKAGES.items() for path in sorted((ROOT / pkg).rglob("*.py"))]
    files += [(path, SCRIPT_LAYER) for path in sorted([*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")])]
    edges, modules = [], set()
    for path, layer in files:
        parts = path.relative_to(ROOT).with_suffix("").parts if layer < SCRIPT_LAYER else (path.stem,)
        is_pkg = parts[-1] == "__init__"
        module, rel = ".".join(parts[:-1] if is_pkg else parts), str(path.relative_to(ROOT))
        modules.add(module)
        found = collect(path.read_text(), module, is_pkg, rel)
        edges += [Edge(rel, line, module, target, kind, layer, is_pkg) for line, target, kind in found]
    return edges, frozenset(modules)


def resolve(name: str) -> str:
    """The longest prefix of `name` that is a project module (`base.config.Config` -> `base.config`)."""
    parts = name.split(".")
    return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in project()[1]), name)


def layer_of(name: str) -> int | None:
    top = name.split(".")[0]
    return PACKAGES.get(top, SCRIPT_LAYER if top in SCRIPTS else None)


def violations(edges) -> list[str]:
    out = []
    for e in edges:
        name = resolve(e.target)
        layer, src_pkg, dst_pkg = layer_of(name), e.src.split(".")[0], name.split(".")[0]
        if layer is None or e.layer == SCRIPT_LAYER or src_pkg == dst_pkg:
            continue
        if layer > e.layer:
            why = f"layer {e.layer} `{src_pkg}` must not depend on layer {layer} `{dst_pkg}`"
        elif layer == e.layer:
            why = f"`{src_pkg}` and `{dst_pkg}` share layer {layer} and must not import each other"
        else:
            continue
        out.append(f"{e.file}:{e.line}: {name} ({e.kind}): {why}")
    return list(dict.fromkeys(out))


def test_collector_walks_nested_code():
    src = "import a.b\ndef f():\n    if x:\n        try:\n            from c.d import e\n        except ImportError:\n"
    src += "            import g\n"
    assert {t for _, t, _ in collect(src, "m")} == {"a.b", "c.d.e", "g"}


def test_collector_resolves_relative_imports():
    src = "from .a import b\nfrom ..x import y\nfrom . import c\n"
    assert [t for _, t, _ in collect(src, "pkg.sub.mod")] == ["pkg.sub.a.b", "pkg.x.y", "pkg.sub.c"]
    assert [t for _, t, _ in collect("from .a import b", "pkg.sub", is_package=True)] == ["pkg.sub.a.b"]


def test_collector_finds_importlib_calls_and_lazy_tables():
    src = 'import importlib\ndef f():\n    importlib.import_module("x.y")\n    __import__("priors.flow")\n'
    src += 'T = {"k": "priors.discrete"}\nD = "see priors.discrete"\n'  # a table entry counts, prose does not
    expected = [(1, "importlib", "import"), (3, "x.y", "import"), (4, "priors.flow", "import")]
    assert collect(src, "m") == expected + [(5, "priors.discrete", "string")]


def test_checker_flags_later_layers_and_same_layer_neighbours():
    src = 'from priors.flow import P\nM = "priors.discrete"\nfrom bpe_image.codec import C\nfrom base.config import D\n'
    src += "from .objectives import O\n"
    edges = [Edge("f.py", line, "grid.autoencoder", t, kind, 1, False)
             for line, t, kind in collect(src, "grid.autoencoder")]
    assert [v.split(": ")[0] for v in violations(edges)] == ["f.py:1", "f.py:2", "f.py:3"]


def test_layers_exist_and_edges_are_found():
    assert not [pkg for pkg in PACKAGES if not (ROOT / pkg).is_dir()], "a layer's package directory is missing"
    found = [e for e in project()[0] if e.src.split(".")[0] == "priors" and layer_of(resolve(e.target)) == 0]
    assert found, "the collector found no priors -> base import"


def test_package_layering():
    found = violations(project()[0])
    assert not found, f"{len(found)} layering violation(s):\n" + "\n".join(found)


def test_no_cycles_between_packages():
    graph: dict[str, dict[str, str]] = {pkg: {} for pkg in PACKAGES}
    for e in project()[0]:
        a, b = e.src.split(".")[0], resolve(e.target).split(".")[0]
        if a in graph and b in graph and a != b:
            graph[a].setdefault(b, f"{e.file}:{e.line}")

    reach = {pkg: set(targets) for pkg, targets in graph.items()}
    for via in graph:  # Warshall's transitive closure
        for pkg in graph:
            if via in reach[pkg]:
                reach[pkg] |= reach[via]
    cycles = [f"{a} <-> {b} ({a}->{b}: {graph[a].get(b, 'indirect')}; {b}->{a}: {graph[b].get(a, 'indirect')})"
              for a, b in combinations(PACKAGES, 2) if b in reach[a] and a in reach[b]]
    assert not cycles, "packages import each other:\n" + "\n".join(cycles)
