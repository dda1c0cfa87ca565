"""The examples of docs/models.md and docs/python-api.md run, and the API page names what the notebooks import."""

from __future__ import annotations

import doctest
import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["docs/models.md", "docs/python-api.md"]


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str) -> None:
    result = doctest.testfile(str(ROOT / page), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0, f"{result.failed} example(s) failed in {page}"


def _notebook_imports() -> set[tuple[str, str]]:
    found = set()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            for m in re.finditer(r"^from (vims[\w.]*) import ([\w, ]+?)(?: as \w+)?$", "".join(cell["source"]), re.M):
                found.update((m[1], n.strip()) for n in m[2].split(","))
    return found


def test_api_page_names_every_function_the_notebooks_import() -> None:
    page = (ROOT / "docs" / "python-api.md").read_text()
    imports = _notebook_imports()
    assert len(imports) > 10
    missing = [f"{mod}.{name}" for mod, name in sorted(imports) if f"{mod}.{name}" not in page]
    assert not missing, f"docs/python-api.md does not name {', '.join(missing)}"


def test_every_function_the_api_page_names_exists() -> None:
    page = (ROOT / "docs" / "python-api.md").read_text()
    for dotted in sorted(set(re.findall(r"`(vims(?:\.\w+)+)", page))):
        mod, _, attr = dotted.rpartition(".")
        try:
            module = importlib.import_module(dotted)
        except ImportError:
            module = None
        if module is None:
            assert hasattr(importlib.import_module(mod), attr), dotted
