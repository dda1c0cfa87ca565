"""``vims avm init``: an A-VM's keys (CURVE keypair for the control channel, Ed25519 for its reports).

The key code is :mod:`vims.remote.keys` (REM-S reads the same files); where the keys live is
:func:`vims.remote.keys.avm_home`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vims.remote.keys import AVM_DIR_HELP as DIR_HELP
from vims.remote.keys import avm_home


def init(avm_id: str = typer.Option("avm-1", "--id", help="This A-VM's id (letters, digits, '._-')."),
         folder: Path | None = typer.Option(None, "--dir", help=DIR_HELP),
         force: bool = typer.Option(False, "--force", metavar="", help="Replace existing keys (REM-S must re-enrol)."),
         json_out: bool = typer.Option(False, "--json", metavar="", help="Print the result as JSON.")) -> None:
    """Create this A-VM's CURVE keypair and Ed25519 signing key (files 0600).

    Give the printed ``avm.public.json`` to REM-S: ``vims remote enroll FILE --vm VM --gate-port PORT``.
    """
    from vims.console import out, print_json
    from vims.remote.keys import AvmIdentity

    home = avm_home(folder)
    ident = AvmIdentity.generate(avm_id)
    public = ident.write(home, force=force)
    if json_out:
        print_json({"avm_id": avm_id, "folder": str(home), "public_key_file": str(public),
                    "curve_public": ident.curve_public, "sign_public": ident.sign_public})
    else:
        out.print(f"A-VM {avm_id}: keys in {home}; enrol [bold]{public}[/] with REM-S")


def register(avm_app: typer.Typer) -> None:
    avm_app.command("init")(init)
