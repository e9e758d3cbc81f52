"""pichat's import picture, read from the code: every module, every arrow between two of
them (an `import` anywhere in the file, `TYPE_CHECKING` ones too), the circles, and the
arrows that run against the layering each package's docstring states.

`tests/test_layers.py` holds the code to these rules; `python tests/layers.py` prints the
picture (modules, arrows, arrows up, circles, the largest modules).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "pichat"

FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("pichat", "pichat.errors", "pichat.logs", "pichat.unpack", "pichat.claims",
              "pichat.ready", "pichat.daemon")),
    ("wire", ("pichat.protocol", "pichat.stream", "pichat.schemas")),
    ("policy", ("pichat.router.policy",)),
    ("shared", ("pichat.config", "pichat.security", "pichat.transport", "pichat.link",
                "pichat.health", "pichat.discovery", "pichat.invites", "pichat.models",
                "pichat.memory")),
    ("roles", ("pichat.router", "pichat.worker", "pichat.client", "pichat.console")),
    ("commands", ("pichat.cli", "pichat.cluster", "pichat.bounds", "pichat.__main__")),
]
"""The house's floors, lowest first: a module imports its own floor or those below."""

ROOMS: dict[str, list[str]] = {
    "pichat.router": ["pichat.router.policy", "pichat.router.observe", "pichat.router.api",
                      "pichat.router.daemon"],
    "pichat.worker": ["pichat.worker.engine", "pichat.worker.store", "pichat.worker.daemon"],
}
"""Inside a role, its rooms, lowest first (the package docstrings say why)."""

PURE: tuple[str, ...] = ("pichat.router.policy", "pichat.protocol", "pichat.schemas",
                         "pichat.errors", "pichat.stream", "pichat.unpack",
                         "pichat.memory.store", "pichat.router.api.tools",
                         "pichat.worker.store.window", "pichat.worker.engine.summary")
"""Modules that do no I/O and read no clock: table-tested as plain functions."""

PURE_HELPERS: tuple[str, ...] = ("pichat.logs",)
"""What a pure module may import besides pure modules: `clip` and `escape` are pure (the
module's formatter and throttle are for the daemons)."""

IO_LIBRARIES = frozenset({
    "asyncio", "zmq", "aiohttp", "socket", "sqlite3", "psycopg", "psycopg_pool", "threading",
    "subprocess", "selectors", "time", "os", "pathlib", "shutil", "tempfile", "llama_cpp",
    "zeroconf", "prometheus_client", "http", "urllib", "signal", "logging", "random",
})
"""What a pure module may not import (logging too: a pure module returns, it does not tell;
random: its choices come from its caller)."""


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: set[str] = field(default_factory=set)
    """pichat modules it imports."""
    libraries: set[str] = field(default_factory=set)
    """Top-level names of everything else it imports."""


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Module]:
    """Every module of the package, with what it imports."""
    found = {_name(p): Module(_name(p), p, len(p.read_text().splitlines()))
             for p in sorted(ROOT.rglob("*.py"))}
    for module in found.values():
        package = module.name if module.path.name == "__init__.py" \
            else module.name.rpartition(".")[0]
        for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in found else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                if target == "pichat" or target.startswith("pichat."):
                    while target not in found and "." in target:
                        target = target.rpartition(".")[0]
                    if target != module.name:
                        module.imports.add(target)
                else:
                    module.libraries.add(target.split(".")[0])
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def floor_of(name: str) -> int:
    best, level = -1, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if _within(name, prefix) and len(prefix) > best:
                best, level = len(prefix), index
    return level


def room_of(name: str) -> tuple[str, int] | None:
    for role, rooms in ROOMS.items():
        for index, room in enumerate(rooms):
            if _within(name, room):
                return role, index
    return None


def arrows_up(found: dict[str, Module]) -> list[tuple[str, str]]:
    """Imports that run against the floors or the rooms."""
    up = []
    for module in found.values():
        for target in module.imports:
            if floor_of(target) > floor_of(module.name):
                up.append((module.name, target))
                continue
            mine, theirs = room_of(module.name), room_of(target)
            if mine and theirs and mine[0] == theirs[0] and theirs[1] > mine[1]:
                up.append((module.name, target))
    return sorted(up)


def circles(found: dict[str, Module]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(found[node].imports):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for name in sorted(found):
        if name not in index:
            visit(name)
    return sorted(groups)


def impure(found: dict[str, Module]) -> list[tuple[str, str]]:
    """(pure module, what it imports that does I/O or is not itself pure)."""
    bad = []
    for module in found.values():
        if not any(_within(module.name, p) for p in PURE):
            continue
        bad += [(module.name, lib) for lib in sorted(module.libraries & IO_LIBRARIES)]
        bad += [(module.name, t) for t in sorted(module.imports)
                if not any(_within(t, p) for p in PURE + PURE_HELPERS) and t != "pichat"]
    return bad


def main() -> None:
    found = modules()
    edges = sum(len(m.imports) for m in found.values())
    print(f"{len(found)} modules, {edges} arrows")
    up = arrows_up(found)
    print(f"{len(up)} arrows up" + "".join(f"\n  {a} -> {b}" for a, b in up))
    groups = circles(found)
    print(f"{len(groups)} circles" + "".join(f"\n  {' <-> '.join(g)}" for g in groups))
    bad = impure(found)
    print(f"{len(bad)} impure imports in pure modules"
          + "".join(f"\n  {a} -> {b}" for a, b in bad))
    print("largest modules:")
    for module in sorted(found.values(), key=lambda m: -m.lines)[:10]:
        print(f"  {module.lines:5d}  {module.name}")


if __name__ == "__main__":
    main()
