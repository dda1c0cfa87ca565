"""Commands of the collector: ``vims guest``, ``vims check``, ``vims collect``, ``vims attach``.

Each command family lives beside the code it drives and registers itself here.
"""

from __future__ import annotations

import typer

from vims.commands import register_commands

SUBCOMMANDS = ("vims.collector.guest.cli", "vims.collector.checks.cli", "vims.collector.trace_cli",
               "vims.collector.attach_cli")


def register(app: typer.Typer) -> None:
    register_commands(app, SUBCOMMANDS)
