"""The documentation's reference parts, made from the code so that they cannot drift:
docs/configuration.md (every command's options, from the `pichat` command itself) and the
bounds table in docs/security.md (from pichat/bounds.py).

    python scripts/docs_reference.py           write them
    python scripts/docs_reference.py --check   exit 1 if either is not what the code says

`make docs` writes them before building the site; tests/test_docs.py runs the check.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BOUNDS_START = "<!-- bounds: made by scripts/docs_reference.py from pichat/bounds.py -->"
BOUNDS_END = "<!-- /bounds -->"

INTRO = """# Configuration

Every option of every command, as the code defines it (this page is made from the
`pichat` command itself by `scripts/docs_reference.py`; `make docs` writes it and
`make test` fails when it is stale). Every option is also an environment variable, so a
systemd `EnvironmentFile` or a compose file can hold the whole configuration; a value on
the command line wins over the variable. `pichat COMMAND --help` says the same.

Beyond the options: `PICHAT_MODEL_DIR` sets where named models are assembled (default
`~/.cache/pichat/models`).
"""

_BRACKET = re.compile(r"\s*\[default: ([^\]]*)\]\.?")


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _given(value: object) -> object:
    """A default the code gives (None for click's "no default" sentinel)."""
    return None if "UNSET" in repr(value) else value


def _default(param: click.Parameter, help_text: str) -> str:
    value = _given(param.default)
    if isinstance(param, click.Option):
        if isinstance(param.show_default, str):
            return _cell(param.show_default)
        if (found := _BRACKET.search(help_text)) is not None:
            return _cell(found.group(1))
        if param.is_flag:
            return "on" if value else "off"
        if param.multiple and not value:
            return "none"
    if value is None or callable(value):
        return "none"
    return f"`{value}`"


def _rows(command: click.Command) -> list[str]:
    rows = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        flags = " / ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
        help_text = param.help or ""
        env = param.envvar if isinstance(param.envvar, str) else ""
        kind = ""
        if isinstance(param.type, click.Choice):
            kind = " (" + ", ".join(f"`{c}`" for c in param.type.choices) + ")"
        rows.append(f"| {flags} | {f'`{env}`' if env else ''} | {_default(param, help_text)} "
                    f"| {_cell(_BRACKET.sub('', help_text))}{kind} |")
    return rows


ORDER = ("router", "worker", "up", "ask", "chat", "status", "conversations", "invite", "join",
         "keys", "keygen", "models", "health")
"""The commands in the order a reader meets them (any other follows, by name)."""


def _commands(group: click.Group, prefix: str = "pichat") -> list[tuple[str, click.Command]]:
    found = []
    for name in sorted(group.commands, key=lambda n: (ORDER.index(n) if n in ORDER
                                                       else len(ORDER), n)):
        command = group.commands[name]
        if command.hidden:
            continue
        found.append((f"{prefix} {name}", command))
        if isinstance(command, click.Group):
            found += _commands(command, f"{prefix} {name}")
    return found


def configuration() -> str:
    from pichat.cli import main

    parts = [INTRO]
    for name, command in _commands(main):
        rows = _rows(command)
        summary = (command.get_short_help_str(limit=200) or "").strip()
        level = "#" * (name.count(" ") + 1)
        parts.append(f"{level} `{name}`\n\n{summary}\n")
        if rows:
            parts.append("| option | environment | default | meaning |\n|---|---|---|---|\n"
                         + "\n".join(rows) + "\n")
    return "\n".join(parts)


def bounds_table() -> str:
    from pichat.bounds import BOUNDS

    rows = [f"| {b.what} | {b.limit} | `{b.test.split('::')[1]}` |" for b in BOUNDS]
    return "| what | bound | proved by |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def security(page: str) -> str:
    start, end = page.index(BOUNDS_START), page.index(BOUNDS_END)
    return page[:start + len(BOUNDS_START)] + "\n\n" + bounds_table() + "\n" + page[end:]


def made() -> dict[Path, str]:
    """Each generated page as the code makes it."""
    return {DOCS / "configuration.md": configuration(),
            DOCS / "security.md": security((DOCS / "security.md").read_text())}


def main(argv: list[str]) -> int:
    stale = [path for path, text in made().items()
             if not path.exists() or path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python scripts/docs_reference.py",
                  file=sys.stderr)
        return 1 if stale else 0
    for path, text in made().items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
