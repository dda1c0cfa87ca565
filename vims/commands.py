"""How the parts add their commands to ``vims`` (kept apart from :mod:`vims.cli` to avoid import cycles)."""

from __future__ import annotations

import importlib

import typer


def register_commands(target: typer.Typer, modules: tuple[str, ...]) -> None:
    """Let each of ``modules`` add its commands to ``target`` through its ``register(app)``.

    A module that does not exist (yet) is passed over; an import error inside one is a bug and raised.
    """
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                continue
            raise
        module.register(target)
