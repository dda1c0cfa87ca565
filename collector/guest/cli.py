"""``vims guest``: build the C-VM image, start and stop a detached guest, ask it things."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from vims.console import err, out, print_json, progress
from vims.errors import VimsError

guest_app = typer.Typer(
    help="The monitored guest (C-VM) under QEMU: a Debian 12 server by default (KASLR, 2 vCPUs, network; its "
         "workload and real attacks), or the quick busybox guest (--image mini).",
    no_args_is_help=True,
)

NAME = typer.Option("vims-guest", "--name", help="Name of the detached guest.")
JSON = typer.Option(False, "--json", metavar="", help="Print JSON.")
IMAGE = typer.Option(
    "debian", "--image", help="debian: a Debian bookworm server booted as users boot it (KASLR, 2 vCPUs, "
    "1 GiB, network); mini: the busybox guest (quick; the scripted attack scenarios)."
)
IMAGES = ("mini", "debian")


def _build(image: str, force: bool = False) -> Any:
    from vims.collector.guest import build_guest
    from vims.collector.guest.debian import build_debian
    from vims.errors import InputError

    if image not in IMAGES:
        raise InputError(f"--image {image!r}: one of {', '.join(IMAGES)}")
    builder = build_debian if image == "debian" else build_guest
    return builder(force=force, log=lambda msg: err.print(f"[dim]{msg}[/dim]"))


def _show(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(data)
        return
    for key, value in data.items():
        out.print(f"[bold]{key}[/bold]: {value}")


@guest_app.command("build")
def build(
    force: bool = typer.Option(False, "--force", metavar="", help="Rebuild even when the cache is up to date."),
    image_name: str = IMAGE,
    as_json: bool = JSON,
) -> None:
    """Build the guest image (kernel, initramfs, kernel profile, kernel-text reference), or reuse it.

    The first build downloads the Debian kernel that linux-image-amd64 depends on and busybox-static,
    boots the guest once to read its kernel symbols, and caches everything under the VIMS cache.
    ``--image debian`` builds a Debian bookworm disk with mmdebstrap and its profile from the kernel's
    own files (no boot).
    """
    image = _build(image_name, force)
    if image_name == "debian":
        _show(
            {
                "release": image.release, "directory": image.directory, "kernel": image.kernel,
                "initrd": image.initramfs, "disk": image.disk, "profile": image.profile,
                "ssh_key": image.ssh_key,
                **{k: image.info.get(k) for k in ("build_seconds", "disk_bytes_used", "built", "key")},
            },
            as_json,
        )  # fmt: skip
        return
    _show(
        {
            "release": image.release,
            "directory": image.directory,
            "kernel": image.kernel,
            "initramfs": image.initramfs,
            "profile": image.profile,
            "rootfs": image.rootfs,
            **{k: image.info.get(k) for k in ("kernel_version", "cpu", "paging_levels", "built", "key")},
        },
        as_json,
    )


@guest_app.command("up")
def up(
    name: str = NAME,
    memory: int = typer.Option(0, "--memory", help="Guest RAM in MiB (0: 256 mini, 1024 debian)."),
    image_name: str = IMAGE,
    pti: bool = typer.Option(False, "--pti", metavar="", help="Debian guest: add pti=on to its command line."),
    gate_port: int = typer.Option(
        0, "--gate-port", help="Host port the guest's client connects to (0: a free one)."
    ),
    gdb_port: int = typer.Option(0, "--gdb-port", help="GDB stub port (0: a free one)."),
    cpu: str = typer.Option("max", "--cpu", help="QEMU CPU model (any: kernel-text checks against the image)."),
    tracer: str = typer.Option("gdb", "--tracer",
                               help="gdb (the GDB stub's watchpoint/breakpoint, any QEMU) or plugin (QEMU 10's "
                                    "TCG plugin: every call; `vims collect --method plugin`)."),
    as_json: bool = JSON,
) -> None:
    """Boot the guest in the background (build the image first if needed) and print its endpoints."""
    from vims.collector.guest import Guest
    from vims.errors import VimsError

    if tracer not in ("gdb", "plugin"):
        raise VimsError(f"--tracer {tracer!r}: gdb or plugin")
    if tracer == "plugin" and pti:
        raise VimsError("--tracer plugin reads the task from the user's page tables: it needs PTI off (no --pti)")
    image = _build(image_name)
    guest = Guest.start(
        image, name=name, memory_mb=memory or None, gate_port=gate_port or None, cpu=cpu,
        gdb_port=gdb_port or None, detach=True, extra_args=("pti=on",) if pti else (),
        plugin=tracer == "plugin",
    )  # fmt: skip
    _show(guest.status(), as_json)


@guest_app.command("down")
def down(name: str = NAME, as_json: bool = JSON) -> None:
    """Stop the detached guest and remove its memory file."""
    from vims.collector.guest import Guest

    guest = Guest.attach(name)
    guest.stop()
    _show({"name": name, "stopped": True, "pid": guest.pid}, as_json)


@guest_app.command("status")
def status(name: str = NAME, as_json: bool = JSON) -> None:
    """Show the detached guest: QEMU pid, GDB stub, memory file, profile, serial endpoints."""
    from vims.collector.guest import Guest

    _show(Guest.attach(name).status(), as_json)


@guest_app.command("run")
def run(
    command: str = typer.Argument(..., help="A shell command to run in the guest."),
    name: str = NAME,
    timeout: float = typer.Option(60.0, "--timeout", help="Seconds the command may take."),
    as_json: bool = JSON,
) -> None:
    """Run a shell command in the detached guest through its control serial port."""
    from vims.collector.guest import Guest

    rc, text = Guest.attach(name).execute(command, timeout=timeout)
    if as_json:
        print_json({"exit": rc, "output": text})
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if rc:
        raise typer.Exit(rc)


@guest_app.command("scenario")
def scenario(
    which: str = typer.Argument(..., help="Debian guest: ssh-bruteforce, webshell-upload, reverse-shell, "
                                "privesc-persistence, data-theft, hidden-payload (or reset); busybox guest: "
                                "normal, webshell, adduser, tamper-binary (or reset)."),
    name: str = NAME,
    seed: int = typer.Option(0, "--seed", help="Debian guest: seeds the attack's choices (and the workload's)."),
    during_workload: float = typer.Option(
        0.0, "--during-workload", metavar="SECONDS",
        help="Debian guest: play the normal workload this long and start the attack at a seeded moment in it.",
    ),
    rate: float = typer.Option(2.0, "--rate", help="With --during-workload: the workload's actions per second."),
    as_json: bool = JSON,
) -> None:
    """Play a scenario in the detached guest and print its answer.

    On the Debian guest the scenarios are real attacks (hydra, an uploaded PHP shell, a reverse shell,
    sudo privilege escalation and persistence, data theft, a hidden beacon); the output is the attack's
    ground truth: its window, the guest pids its processes start from, and what it did.
    """
    from vims.collector.guest import Guest

    guest = Guest.attach(name)
    if guest.kind == "debian":
        _attack(guest, which, seed, during_workload, rate, as_json)
        return
    answer = guest.reset() if which == "reset" else guest.scenario(which)
    _show({"scenario": which, "answer": answer}, as_json)


def _attack(guest: Any, which: str, seed: int, during: float, rate: float, as_json: bool) -> None:
    """An attack scenario on the Debian guest (:mod:`vims.collector.guest.attacks`), alone or in a workload."""
    from vims.collector.guest import attacks

    if which == "reset":
        _show({"scenario": "reset", "answer": attacks.reset(guest)}, as_json)
        return
    say = (lambda _msg: None) if as_json else (lambda msg: err.print(f"[dim]{msg}[/dim]"))
    if during > 0:
        from vims.collector.guest.recording import RunSpec, play_run, scenarios_from_attacks

        attacks.check_scenario(guest, which)
        spec = RunSpec("cli", "attack", seed, during, scenario=which)
        played = play_run(guest, spec, rate, scenarios_from_attacks((which,))[which], log=say)
        if played.attack_error or played.workload_error:
            raise VimsError(played.attack_error or played.workload_error)
        summary = played.workload.as_dict()
        if as_json:
            print_json({"workload": summary, "attack_at_s": played.attack_at_s, "truth": played.truth})
            return
        _workload_table(summary)
        _show({"attack_at_s": played.attack_at_s, **(played.truth or {})}, False)
        return
    else:
        truth = attacks.run_scenario(guest, which, seed, log=say)
        if as_json:
            print_json(json.loads(truth.to_json()))
            return
    _show(json.loads(truth.to_json()), False)


@guest_app.command("workload")
def workload(
    name: str = NAME,
    seed: int = typer.Option(0, "--seed", help="Seeds the plan: same seed, same actions at the same times."),
    rate: float = typer.Option(2.0, "--rate", help="Actions per second (mean of a Poisson process)."),
    duration: float = typer.Option(60.0, "--duration", help="Seconds during which actions start."),
    workers: int = typer.Option(4, "--workers", help="Actions that may run at once."),
    as_json: bool = JSON,
) -> None:
    """Play the small-server workload on the detached Debian guest: web pages, ssh logins, cron jobs,
    log rotation, package queries and the client's connections through REM-S's gate.

    Prints the count of each kind of action and every failure; exit status 1 when an action failed.
    """
    from vims.collector.guest import Guest
    from vims.collector.guest.workload import Workload, check_knobs

    check_knobs(rate, duration, workers)
    runner = Workload(Guest.attach(name), seed=seed, rate=rate, workers=workers)
    planned = runner.plan(duration)
    with progress(transient=True) as bar:
        task = bar.add_task("workload", total=len(planned))
        done = {"ok": 0, "failed": 0}

        def show(result: Any) -> None:
            done["ok" if result.ok else "failed"] += 1
            bar.update(task, advance=1, description=f"workload: {done['ok']} ok, {done['failed']} failed, "
                                                    f"last {result.action.kind}")  # fmt: skip

        result = runner.run(duration, on_result=show)
    summary = result.as_dict()
    if as_json:
        print_json(summary)
    else:
        _workload_table(summary)
    if summary["failed"]:
        raise typer.Exit(1)


def _workload_table(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"workload: seed {summary['seed']}, {summary['rate']:g} actions/s, "
                        f"{summary['duration']:g} s")  # fmt: skip
    for column in ("action", "ok", "failed"):
        table.add_column(column, justify="left" if column == "action" else "right")
    for kind, count in summary["counts"].items():
        table.add_row(kind, str(count["ok"]), f"[red]{count['failed']}[/]" if count["failed"] else "0")
    out.print(table)
    out.print(f"{summary['actions']} actions in {summary['elapsed_s']} s ({summary['actions_per_s']}/s), "
              f"longest start delay {summary['max_lag_s']} s, mean action {summary['mean_action_s']} s")  # fmt: skip
    for failure in summary["failures"]:
        out.print(f"[red]failed[/] #{failure['index']} {failure['kind']} {' '.join(failure['detail'])}: "
                  f"{failure['error']}", highlight=False)  # fmt: skip


def register(app: typer.Typer) -> None:
    app.add_typer(guest_app, name="guest")
