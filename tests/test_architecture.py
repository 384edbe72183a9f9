"""The package's import graph against the layers drawn in the README (Layout).

Every ``import`` of a ``lifelong_moe`` module counts, also one inside a function: an import placed
in a function to dodge a cycle is still a cycle here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lifelong_moe"

# Lowest first. A module may import its own part and any part of a lower layer, nothing else.
LAYERS: list[set[str]] = [
    {"names", "checks", "errors", "stream", "compat", "targets", "log"},  # shared nouns
    {"moe"},
    {"models"},
    {"data", "evaluation"},
    {"methods", "tracking", "measure"},
    {"config"},
    {"run"},
    {"cli", "compare", "bench"},  # the console entry points
]
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str) -> set[str]:
    """The lifelong_moe modules ``path`` imports (``from pkg import mod`` names the module)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lifelong_moe"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("lifelong_moe"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(
                    sub
                    if (PACKAGE.parent / sub.replace(".", "/")).exists()
                    or (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                    else base
                )
    return found - {name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.parts}
    return {
        name: {i for i in imports(path, name) if i in modules} for name, path in modules.items()
    }


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_part_has_a_layer() -> None:
    missing = {part(m) for m in graph()} - set(LAYER_OF) - {"__init__", "conf"}
    assert not missing, f"parts with no layer in LAYERS (add them, and to the README): {missing}"


def test_arrows_point_down() -> None:
    wrong = [
        f"{a} -> {b}"
        for a, targets in graph().items()
        for b in targets
        if part(a) != part(b)
        and LAYER_OF.get(part(b), 99) >= LAYER_OF.get(part(a), -1)
        and not LAYER_OF.get(part(a)) == LAYER_OF.get(part(b)) == 0  # nouns use each other
    ]
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
