"""The package layers of ``docs/architecture.md``, enforced on the imports of ``baton/``.

The layer table is read from the doc, so the doc and the code cannot drift apart: every
package must be in it, no package may import one in a later layer, packages may not import
each other in a cycle, and the pure cores import no asyncio, sockets, threads, clock, runtime
or transfer. Every module is also held to 500 lines, unless its docstring gives a reason
(a line starting ``Size:``).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BATON = ROOT / "baton"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

PURE = (
    "baton.kv", "baton.config", "baton.settings", "baton.protocol",
    "baton.engine.request", "baton.engine.scheduler", "baton.engine.step", "baton.engine.timing",
    "baton.engine.roofline",
    "baton.router.indexer", "baton.router.sequences", "baton.router.kv_selector",
    "baton.router.selectors", "baton.router.disagg", "baton.planner",
)
"""Modules (or packages: every module inside) that must stay pure cores."""
IMPURE = ("asyncio", "socket", "ssl", "selectors", "threading", "subprocess", "concurrent",
          "time", "uvloop", "aiohttp", "uvicorn", "nats", "baton.runtime", "baton.transfer")
"""What a pure core must not import: event loops, sockets, threads, processes, the clock,
network clients, and Baton's runtime and KV transfer."""
MAX_LINES = 500


# ------------------------------------------------------------------ reading the code


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(BATON.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, at any depth of its code (absolute names)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module:
                found.add(node.module)
    return found


def package_of(module: str) -> str:
    """``baton.router.kv_router`` -> ``router``; ``baton.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "baton"


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules():
        src = package_of(name)
        graph.setdefault(src, set())
        for target in imports(name, path):
            if target.startswith("baton.") and package_of(target) != src:
                graph[src].add(package_of(target))
    return graph


def documented_layers() -> dict[str, int]:
    """Package -> layer number, from the table under ``## Layers``."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for number, packages in re.findall(r"^\| (\d+) [^|]*\| ([^|]*) \|", section, re.M):
        for package in re.findall(r"`([A-Za-z_]+)`", packages):
            layers[package] = int(number)
    return layers


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


# ------------------------------------------------------------------ the rules


def test_the_layer_table_is_found_and_names_every_package() -> None:
    layers = documented_layers()
    assert {"kv", "runtime", "router", "cli"} <= set(layers), layers
    missing = sorted(set(package_graph()) - set(layers) - {"baton"})
    assert not missing, f"packages not in the layer table of docs/architecture.md: {missing}"


def test_no_package_imports_one_in_a_later_layer() -> None:
    layers = documented_layers()
    wrong = [f"{src} (layer {layers[src]}) imports {dst} (layer {layers[dst]})"
             for src, targets in package_graph().items() if src in layers
             for dst in sorted(targets) if layers.get(dst, -1) > layers[src]]
    assert not wrong, "\n".join(wrong)


def test_packages_import_each_other_without_cycles() -> None:
    assert find_cycle(package_graph()) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("name,path", [
    (name, path) for name, path in modules()
    if any(name == p or name.startswith(p + ".") for p in PURE)
], ids=lambda x: x if isinstance(x, str) else "")
def test_pure_cores_import_no_io_clock_or_runtime(name: str, path: Path) -> None:
    bad = sorted(m for m in imports(name, path)
                 if any(m == f or m.startswith(f + ".") for f in IMPURE))
    assert not bad, f"{name} is a pure core but imports {bad}"


def test_every_pure_core_exists() -> None:
    names = {name for name, _ in modules()}
    assert all(any(n == p or n.startswith(p + ".") for n in names) for p in PURE)


def test_modules_over_500_lines_say_why() -> None:
    long = []
    for name, path in modules():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and not re.search(r"^Size: ", doc, re.M):
            long.append(f"{name}: {lines} lines")
    assert not long, f"split these or give a 'Size:' reason in their docstring: {long}"
