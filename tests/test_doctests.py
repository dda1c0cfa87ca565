"""Run the docstring examples of every module in the package, imported under its real name."""

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


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_part_is_in_the_vims_namespace() -> None:
    assert vims.__name__ == "vims"
    for part in PARTS[1:]:
        assert importlib.import_module(part).__name__ == part
