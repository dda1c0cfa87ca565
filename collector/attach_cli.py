"""``vims attach``: find the QEMU VMs of this host and look at one through its monitor, no restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vims.console import out, print_json
from vims.errors import InputError


def register(app: typer.Typer) -> None:
    app.command("attach")(attach)


def attach(
    qmp: Path = typer.Argument(None, help="The VM's QMP monitor socket (-qmp unix:PATH,server=on,wait=off), "
                             "or libvirt:DOMAIN[@URI] for a libvirt domain (default URI qemu:///system)."),
    list_vms: bool = typer.Option(False, "--list", help="List the QEMU processes of this host and their monitors."),
    kernel: Path = typer.Option(None, "--kernel", help="The kernel image the VM boots (default: QEMU's -kernel)."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print JSON."),
) -> None:
    """Attach to a VM that VIMS did not start (plain QEMU with a QMP socket, or a libvirt domain): read
    its RAM from the QEMU process, find its kernel (KASLR) and processes, then detach, leaving it as it was. `vims check
    --qmp PATH` runs the integrity checks on such a VM."""
    from vims.collector.attach import AttachedVm, find_qemus

    if list_vms:
        found = [q.as_dict() for q in find_qemus()]
        if as_json:
            print_json(found)
            return
        for q in found:
            monitor = q["qmp"] or "no QMP socket on its command line (and no libvirt domain of that name)"
            out.print(f"{q['pid']:>8}  {q['name'] or '-':<24} {monitor}  (stub: {'yes' if q['gdb'] else 'no'})")
        if not found:
            out.print("no QEMU process runs on this host")
        return
    if qmp is None:
        raise InputError("give the VM's QMP socket, or --list to find one")
    with AttachedVm(qmp, kernel=kernel) as vm:
        profile = vm.profile
        tasks = list(vm.backend().kernel.tasks())
        summary: dict[str, Any] = {
            "name": vm.name, "pid": vm.pid, "qmp": str(qmp), "kernel": str(vm.kernel),
            "release": profile.release,
            "memory": "mapped file" if vm.memory.regions[0].offset == 0 else f"/proc/{vm.pid}/mem",
            "text_vaddr": hex(profile.symbol("_text")), "processes": len(tasks),
            "user_processes": sum(1 for t in tasks if t.mm), "notes": vm.notes,
        }  # fmt: skip
    if as_json:
        print_json(summary)
        return
    for key, value in summary.items():
        out.print(f"{key:>15}  {value}")
