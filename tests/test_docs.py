"""The manual holds together: the README stays short, every internal link (README and
docs/) reaches a page and a heading that exist, the generated reference pages are what
the code says today, and the site builds strictly, with nothing fetched from the web."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import docs_reference  # noqa: E402

PAGES = sorted((ROOT / "docs").glob("*.md"))
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _slug(heading: str) -> str:
    """A heading's anchor as Python-Markdown's toc makes it (MkDocs' default)."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def _links(page: Path) -> list[str]:
    return _LINK.findall(_FENCE.sub("", page.read_text()))


def broken_links(pages: list[Path]) -> list[str]:
    broken = []
    for page in pages:
        for target in _links(page):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not ours to check offline
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if not where.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in _anchors(where):
                broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_the_readme_is_short_and_points_into_the_docs():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    targets = {t.partition("#")[0] for t in _links(readme)}
    assert {f"docs/{p.name}" for p in PAGES} <= targets


def test_every_internal_link_reaches_a_page_and_a_heading():
    assert PAGES, "no docs"
    assert broken_links([ROOT / "README.md", *PAGES]) == []


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## The `--x` option\n\n"
                                   "[ok](a.md#the-x-option) [gone](b.md) [no](a.md#nope)\n"
                                   "```\n[in code](c.md)\n```\n")
    assert broken_links([tmp_path / "a.md"]) == ["a.md: b.md (no such file)",
                                                 "a.md: a.md#nope (no such heading)"]


def test_the_reference_pages_are_what_the_code_makes():
    """docs/configuration.md (every option) and the bounds table of docs/security.md are
    made by scripts/docs_reference.py: a changed option or bound without `make docs` fails."""
    stale = [path.name for path, text in docs_reference.made().items()
             if path.read_text() != text]
    assert stale == []


def test_every_option_of_every_command_is_on_the_configuration_page():
    from pichat.cli import main

    page = (ROOT / "docs" / "configuration.md").read_text()
    missing = []
    for name, command in docs_reference._commands(main):
        if f"`{name}`" not in page:
            missing.append(name)
        for param in command.params:
            for flag in getattr(param, "opts", []) if param.param_type_name == "option" else []:
                if f"`{flag}`" not in page:
                    missing.append(f"{name} {flag}")
    assert missing == []


@pytest.mark.timeout(300)
def test_the_site_builds_strictly_and_offline(tmp_path):
    """`mkdocs build --strict` (broken links, pages left out of the navigation and bad
    anchors are errors), and the pages it makes load nothing from the web."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                             "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    built = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    assert {f"{p.stem}/index.html" for p in PAGES if p.name != "index.md"} <= built
    for page in site.rglob("*.html"):
        fetched = re.findall(r'<(?:link|script)[^>]+(?:href|src)="(https?://[^"]+)"',
                             page.read_text())
        assert fetched == [], f"{page.relative_to(site)} loads {fetched}"


def test_the_http_api_pages_list_every_route_the_router_serves():
    """The route tables of docs/http-api.md and docs/conversations.md name exactly the
    routes the router's application serves (a new route without its row fails)."""
    from pichat.router.api.app import create_app

    served = {(r.method, r.resource.canonical) for r in create_app(object()).router.routes()
              if r.method != "HEAD"}
    documented = set()
    for page in ("http-api.md", "conversations.md"):
        for row in re.findall(r"^\| (`[^|]+`) \|", (ROOT / "docs" / page).read_text(), re.M):
            for method, path in re.findall(r"`(GET|POST|PATCH|DELETE|PUT|\*) (/[^`]*)`", row):
                documented.add((method, path.replace("/ID", "/{id}")))
    assert documented == served
