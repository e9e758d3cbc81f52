"""The index of bounds (pichat/bounds.py) is true: every test it names exists, and the
documentation's table (docs/security.md) lists every bound with that test."""

from __future__ import annotations

import ast

from conftest import ROOT
from pichat.bounds import BOUNDS


def test_every_bound_names_a_test_that_exists():
    for bound in BOUNDS:
        path, name = bound.test.split("::")
        tree = ast.parse((ROOT / path).read_text())
        names = {n.name for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert name in names, f"{bound.what}: {bound.test} does not exist"


def test_the_docs_table_lists_every_bound_with_its_test():
    readme = (ROOT / "docs" / "security.md").read_text()
    for bound in BOUNDS:
        row = f"| {bound.what} | {bound.limit} | `{bound.test.split('::')[1]}` |"
        assert row in readme, f"docs/security.md lacks the row:\n{row}"
