"""The ``vims`` command.

Each part of the package contributes its commands through a ``register(app)`` function in its own
``cli.py`` (``vims.datasets.cli``, ``vims.training.cli``, ...). A part registers a group only once it
does something, so ``vims --help`` lists what works. Part CLIs import heavy libraries (scikit-learn,
pandas) inside the command functions, so that ``vims --help`` and the quick commands start fast.
"""

from __future__ import annotations

import sys

import typer

from vims import __version__
from vims.commands import register_commands
from vims.console import err
from vims.errors import VimsError


def _flags_show_no_type() -> None:
    """Show flags (``--json``, ``--help``) without a type in ``--help``.

    Typer's help lists every option's type, a flag's too (``--json <bool>``), as if it took a value,
    while ``--json true`` is refused: a flag takes none, so its type column stays empty.
    """
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_vims_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich._vims_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign,assignment]


_flags_show_no_type()

app = typer.Typer(
    name="vims",
    help="VIMS attests a running virtual machine by its behaviour: it watches a guest from outside, "
    "scores what it does against trained models and reports to a remote server that gates connections.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

#: The modules that contribute commands, in the order their groups appear in ``--help``.
PARTS = ("vims.datasets.cli", "vims.training.cli", "vims.collector.cli", "vims.avm.cli", "vims.remote.cli",
         "vims.demo")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vims {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """VIMS: behaviour-based attestation of virtual machines."""


register_commands(app, PARTS)


def main() -> None:
    """Entry point: user errors become one line and exit status 2, never a traceback."""
    try:
        app()
    except VimsError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
