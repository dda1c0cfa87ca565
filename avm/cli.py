"""``vims avm``: the A-VM agent's commands (keys, run, replay)."""

from __future__ import annotations

import typer

from vims.commands import register_commands

avm_app = typer.Typer(help="The A-VM agent: its keys, and running or replaying the analysis pipeline.",
                      no_args_is_help=True)

#: Modules that add commands to the ``avm`` group through ``register(avm_app)``.
SUBCOMMANDS = ("vims.avm.init_cli", "vims.avm.agent_cli")


def register(app: typer.Typer) -> None:
    register_commands(avm_app, SUBCOMMANDS)
    if avm_app.registered_commands or avm_app.registered_groups:
        app.add_typer(avm_app, name="avm")
