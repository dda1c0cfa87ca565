"""``vims check``: the static integrity checks against the running guest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

_STYLE = {"pass": "green", "fail": "bold red", "error": "yellow"}


def guest_context(name: str = "vims-guest", reference: Path | None = None, qmp: Path | None = None) -> Any:
    """The check context of the detached guest ``name`` (``vims guest up``), or of the VM whose QMP
    monitor is ``qmp`` (:class:`~vims.collector.attach.AttachedVm`); close ``ctx.backend``.

    ``reference``: the reference files (a root directory or an ext2/3/4 image, e.g. a copy of the VM's
    clean disk) instead of those of the image the guest was built from.
    """
    import dataclasses

    from vims.collector.backends import QemuBackend
    from vims.collector.checks.base import Context
    from vims.errors import InputError

    if reference is not None and not reference.exists():
        raise InputError("no such directory or disk image", where=reference)
    if qmp is not None:
        from vims.collector.attach import AttachedVm

        vm = AttachedVm(qmp, rootfs=reference)
        try:
            backend = vm.backend(stub=False, detach_on_close=True)  # the checks only read memory
        except BaseException:
            vm.detach()
            raise
    else:
        backend = QemuBackend.from_guest(name)
    try:
        ctx = Context.of_guest(backend)
        if reference is not None:
            ctx = dataclasses.replace(ctx, reference=dataclasses.replace(ctx.reference, rootfs=reference))
        return ctx
    except BaseException:
        backend.close()
        raise


def tables(rows: list[Any]) -> list[Any]:
    """One :class:`rich.table.Table` per check of ``rows``: target, status, its declared columns
    (:attr:`~vims.collector.checks.base.Check.columns`) and the detail.

    Parameters
    ----------
    rows : list of Row
        The rows, in the order the checks ran (the tables come in that order).
    """
    from rich.table import Table

    from vims.collector.checks.base import Column, registry

    checks = registry()
    by_check: dict[str, list[Any]] = {}
    for r in rows:
        by_check.setdefault(r.check, []).append(r)
    out = []
    for name, group in by_check.items():
        known = checks.get(name)
        # a check not in the registry (one made with register=False) shows its fields as text
        columns = known.columns if known is not None else tuple(Column(k) for k in group[0].fields)
        table = Table(title=name, title_justify="left")
        for column in ("target", "status", *(c.name for c in columns), "detail"):
            table.add_column(column, overflow="fold")
        for r in group:
            values = [c.render(r.fields.get(c.name)) for c in columns]
            table.add_row(r.target, f"[{_STYLE[r.status]}]{r.status}[/]", *values, r.detail or "")
        out.append(table)
    return out


def show(rows: list[Any], guest: str, json_out: bool = False) -> None:
    """Print check rows: as JSON (each with its ``fields``), or one table per check (:func:`tables`).

    Parameters
    ----------
    rows : list of Row
        The rows, in the order the checks ran.
    guest : str
        The guest's name (in the heading).
    json_out : bool
        Print JSON instead of tables.
    """
    from vims.console import out, print_json

    if json_out:
        print_json([r.as_dict(with_fields=True) for r in rows])
        return
    out.print(f"integrity checks of guest {guest!r}")
    for table in tables(rows):
        out.print(table)


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
        qmp: Path = typer.Option(None, "--qmp", help="Instead: a VM VIMS did not start, by its QMP monitor "
                                 "socket, or libvirt:DOMAIN (see `vims attach --list`)."),
        reference: Path = typer.Option(None, "--reference", help="The reference files for process-binaries: "
                                       "a root directory or an ext2/3/4 disk image (its dpkg md5sums are "
                                       "checked first); default: the image the guest was built from."),
        output: Path = typer.Option(None, "--output", "-o", help="Also write the rows as Parquet here."),
        json_out: bool = typer.Option(False, "--json", metavar="", help="Print the rows as JSON."),
    ) -> None:
        """Check the running guest's integrity from outside: kernel text, system call table, the code of
        running programs, hidden processes. Exit status 1 when a check fails or cannot run."""
        from vims.collector.checks.base import rows_table, run_checks, select

        checks = select(names or None, deep=deep)
        ctx = guest_context(guest, reference, qmp)
        try:
            rows = run_checks(ctx, checks)
        finally:
            ctx.backend.close()
        if output is not None:
            from vims.tables import write_table

            write_table(rows_table(rows), output)
        show(rows, guest, json_out)
        if any(r.status != "pass" for r in rows):
            raise typer.Exit(1)
