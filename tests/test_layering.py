"""The module layering, checked from the source: what may import what, and no import cycles.

- ``text/`` and ``diffusion/`` are the stages: they import nothing from ``checkpoints/``, ``server/``, ``tiny/`` or
  the command modules (they may use the torch-free top-level modules: ``errors``, ``families``).
- Command modules (``commands/``, and ``cli.py``, which dispatches to them) are imported by nothing but the
  dispatcher.
- No cycles between modules, counting imports inside functions too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import clipdiffusion

ROOT = Path(clipdiffusion.__file__).parent
PACKAGE = "clipdiffusion"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every clipdiffusion module ``path`` imports, at any depth of the file (resolved relative imports)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # "from . import eval" imports a module; "from .x import f" imports x
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {m for m in found if m in MODULES and m != name}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def is_command(name: str) -> bool:
    """The dispatcher (``cli``, and ``__main__`` for ``python -m clipdiffusion``) and the command modules."""
    return name in (f"{PACKAGE}.cli", f"{PACKAGE}.__main__") or name.startswith(f"{PACKAGE}.commands")


def test_stages_do_not_import_upward():
    forbidden = tuple(f"{PACKAGE}.{p}" for p in ("checkpoints", "server", "tiny", "pipeline", "commands", "cli"))
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items()
                 if m.startswith((f"{PACKAGE}.text", f"{PACKAGE}.diffusion"))
                 for t in targets if t.startswith(forbidden))  # fmt: skip
    assert not bad, "\n".join(bad)


def test_command_modules_live_together_and_only_the_dispatcher_imports_them():
    leaf = lambda n: n.rpartition(".")[2]  # noqa: E731
    stray = sorted(n for n in MODULES if (leaf(n) == "cli" or leaf(n).startswith("cli_")) and not is_command(n))
    assert not stray, f"command modules outside {PACKAGE}.commands: {stray}"
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if not is_command(m)
                 for t in targets if is_command(t))  # fmt: skip
    assert not bad, "\n".join(bad)


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    # a package __init__ that re-exports its modules is not a dependency of those modules
    graph = {m: {t for t in targets if not MODULES[t].name == "__init__.py" or not m.startswith(t + ".")}
             for m, targets in GRAPH.items()}  # fmt: skip
    cycles = _cycles(graph)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_imports():
    assert f"{PACKAGE}.errors" in GRAPH[f"{PACKAGE}.pipeline"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
