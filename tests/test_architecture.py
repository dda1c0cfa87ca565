"""The import rules of docs/architecture.md cover every module they are about.

``make lint`` runs import-linter with the contracts in ``pyproject.toml``; the core's contract names
its modules one by one, so a new module in ``vims/`` that is missing from it would escape the rule.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_core_contract_names_every_core_module() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = next(c for c in config["tool"]["importlinter"]["contracts"] if c["name"].startswith("The core"))
    modules = {f"vims.{p.stem}" for p in (ROOT / "vims").glob("*.py") if p.stem != "__init__"}
    assert set(core["source_modules"]) == modules
    parts = {f"vims.{p.name}" for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "vims"}
    assert parts <= set(core["forbidden_modules"]), parts - set(core["forbidden_modules"])
