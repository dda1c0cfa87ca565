"""Run the docstring examples of every module in the package, imported under its real name.

One test per docstring that holds examples (a docstring without any is no test: counting it would
inflate the suite); every module is imported by :func:`test_every_module_imports`.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vims

PARTS = ["vims", "vims.collector", "vims.models", "vims.training", "vims.remote", "vims.datasets", "vims.avm"]


def _modules() -> list[str]:
    names: list[str] = []
    for part in PARTS:
        package = importlib.import_module(part)
        names.append(part)
        prefix = part + "."
        for info in pkgutil.walk_packages(package.__path__, prefix):
            if info.name.startswith(tuple(p + "." for p in PARTS if p != part and p.startswith(prefix))):
                continue
            names.append(info.name)
    return sorted(set(names))


FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _with_examples() -> list[tuple[str, str]]:
    """``(module, docstring test name)`` of every docstring that holds at least one example."""
    found = []
    for name in _modules():
        for test in doctest.DocTestFinder().find(importlib.import_module(name)):
            if test.examples:
                found.append((name, test.name))
    return found


def test_every_module_imports() -> None:
    for name in _modules():
        importlib.import_module(name)


@pytest.mark.parametrize(("module", "name"), _with_examples(), ids=lambda v: v)
def test_docstring_examples(module: str, name: str) -> None:
    tests = [t for t in doctest.DocTestFinder().find(importlib.import_module(module)) if t.name == name]
    assert len(tests) == 1 and tests[0].examples, f"{name} has no examples any more"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    result = runner.run(tests[0])
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring example(s) failed in {name}"


def test_every_part_is_in_the_vims_namespace() -> None:
    assert vims.__name__ == "vims"
    for part in PARTS[1:]:
        assert importlib.import_module(part).__name__ == part
