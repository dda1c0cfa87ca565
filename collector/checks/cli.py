"""``vims check``: the static integrity checks against the running guest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

_STYLE = {"pass": "green", "fail": "bold red", "error": "yellow"}


def guest_context(name: str = "vims-guest") -> Any:
    """The check context of the detached guest ``name`` (``vims guest up``); close ``ctx.backend``."""
    from vims.collector.backends import QemuBackend
    from vims.collector.checks.base import Context

    backend = QemuBackend.from_guest(name)
    try:
        return Context.of_guest(backend)
    except BaseException:
        backend.close()
        raise


def register(app: typer.Typer) -> None:
    @app.command("check")
    def check(
        names: list[str] = typer.Option(None, "--check", "-c", metavar="NAME",
                                        help="Run only this check (repeatable): kernel-text, syscall-table, "
                                        "process-binaries, hidden-processes."),
        deep: bool = typer.Option(True, "--deep/--light",
                                  help="--light skips the deep checks (process-binaries hashes every "
                                  "code page of every process)."),
        guest: str = typer.Option("vims-guest", "--name", help="The guest started by `vims guest up`."),
        output: Path = typer.Option(None, "--output", "-o", help="Also write the rows as Parquet here."),
        json_out: bool = typer.Option(False, "--json", metavar="", help="Print the rows as JSON."),
    ) -> None:
        """Check the running guest's integrity from outside: kernel text, system call table, the code of
        running programs, hidden processes. Exit status 1 when a check fails or cannot run."""
        from vims.collector.checks.base import rows_table, run_checks, select
        from vims.console import out, print_json

        checks = select(names or None, deep=deep)
        ctx = guest_context(guest)
        try:
            rows = run_checks(ctx, checks)
        finally:
            ctx.backend.close()
        if output is not None:
            from vims.tables import write_table

            write_table(rows_table(rows), output)
        if json_out:
            print_json([r.as_dict() for r in rows])
        else:
            from rich.table import Table

            table = Table(title=f"integrity checks of guest {guest!r}", title_justify="left")
            for column in ("check", "target", "status", "detail"):
                table.add_column(column, overflow="fold")
            for r in rows:
                table.add_row(r.check, r.target, f"[{_STYLE[r.status]}]{r.status}[/]", r.detail or "")
            out.print(table)
        if any(r.status != "pass" for r in rows):
            raise typer.Exit(1)
