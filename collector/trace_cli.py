"""``vims collect``: trace the system calls of the running guest into Parquet and/or a ZeroMQ stream."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from vims.console import err, out, print_json


def register(app: typer.Typer) -> None:
    app.command("collect")(collect)


def collect(
    duration: float = typer.Option(..., "--duration", "-d", min=0.1,
                                   help="Seconds to trace (Ctrl-C ends earlier, keeping what was captured)."),
    output: Path | None = typer.Option(None, "-o", "--output",
                                       help="Parquet file of events to write (written atomically)."),
    policy_file: Path | None = typer.Option(None, "--policy",
                                            help="Sampling policy, JSON or TOML: mode (full, duty-cycle), "
                                                 "window_ms, period_ms, include / exclude (programs), "
                                                 "include_calls / exclude_calls (x86-64 names or numbers), "
                                                 "max_events_per_s (see vims.tracing_policy)."),
    push: str | None = typer.Option(None, "--push",
                                    help="Also stream Arrow batches to this ZeroMQ endpoint (PUSH, connects), "
                                         "e.g. tcp://127.0.0.1:5555."),
    server_key: str | None = typer.Option(None, "--server-key",
                                          help="The receiver's CURVE public key: Z85 text, or its file (the "
                                               "A-VM's avm.public.json). Encrypts the stream."),
    keys: Path | None = typer.Option(None, "--keys",
                                     help="With --server-key: this collector's CURVE key file, made on first use "
                                          "(0600) with NAME.public.json beside it, the file the A-VM's "
                                          "--collector-key allows. Without it a fresh key is used each run."),
    name: str = typer.Option("vims-guest", "--name", help="Name of the guest started by `vims guest up`."),
    vm_id: str | None = typer.Option(None, "--vm-id", help="Id written in every event and message "
                                                           "(default: the guest's name)."),
    method: str = typer.Option("auto", "--method",
                               help="auto (watchpoint when the kernel allows it), watchpoint, breakpoint or plugin "
                                    "(a guest started with `vims guest up --tracer plugin`)."),
    max_events: int | None = typer.Option(None, "--max-events", min=1, help="Stop after this many events."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the summary as JSON."),
) -> None:
    """Trace the guest's system calls from outside (VMI through QEMU's GDB stub and its mapped memory).

    Each event has the process (pid, tgid, ppid, comm), the call and its six arguments, the user-space call site (module + offset) and, for calls that take one, the path. The guest keeps running afterwards with no trap left in it, also after Ctrl-C.
    """  # noqa: E501  (one line per paragraph: the help text is reflowed by rich)
    from vims.collector.backends import QemuBackend
    from vims.errors import VimsError
    from vims.tables import write_table
    from vims.tracing_policy import Policy

    if output is None and push is None:
        raise VimsError("nowhere to put the events: give -o EVENTS.parquet and/or --push ENDPOINT")
    if method not in ("auto", "watchpoint", "breakpoint", "plugin"):
        raise VimsError(f"--method {method!r}: one of auto, watchpoint, breakpoint, plugin")
    policy = Policy.load(policy_file) if policy_file is not None else Policy()
    vm_id = vm_id or name
    curve = _curve(server_key, keys, quiet=as_json)
    with QemuBackend.from_guest(name) as backend:
        tracer, result, stream = _trace(backend, vm_id, policy, method, duration, max_events, push, curve,
                                        keep=output is not None, quiet=as_json)
    if output is not None:
        write_table(result.events, output)
    summary = _summary(tracer, result, guest=name, vm_id=vm_id, policy=policy.to_dict(), output=output, push=push,
                       stream=stream)
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary, result)


def _curve(server_key: str | None, keys: Path | None, quiet: bool) -> dict[str, Any]:
    """The stream's CURVE settings for :class:`BatchSender` from ``--server-key`` and ``--keys``."""
    from vims.errors import InputError
    from vims.remote.keys import collector_keys, load_server_public

    if server_key is None:
        if keys is not None:
            raise InputError("--keys needs --server-key (the receiver's public key)")
        return {}
    if Path(server_key).is_file():
        server_key = load_server_public(Path(server_key))
    if keys is None:
        return {"server_key": server_key}
    own, public_file, made = collector_keys(keys)
    if made and not quiet:
        err.print(f"made collector keys {keys}; give the A-VM --collector-key {public_file}", highlight=False)
    return {"server_key": server_key, "public_key": own.public, "secret_key": own.secret}


def _trace(backend: Any, vm_id: str, policy: Any, method: str, duration: float, max_events: int | None,
           push: str | None, curve: dict[str, Any], keep: bool, quiet: bool) -> tuple[Any, Any, Any]:
    """Trace ``backend`` with a progress bar, Ctrl-C ending it cleanly: (tracer, result, stream counts)."""
    from vims.collector.stream import BatchSender
    from vims.collector.tracer import SyscallTracer
    from vims.console import progress

    sender = BatchSender(push, sender=vm_id, kind="event", **curve) if push else None
    stop = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        tracer: Any
        if method == "plugin":
            from vims.collector.plugin_tracer import PluginTracer

            tracer = PluginTracer(backend, vm_id, policy=policy, on_batch=sender.send if sender else None,
                                  keep=keep)
        else:
            tracer = SyscallTracer(backend, vm_id, policy=policy, method=method,
                                   on_batch=sender.send if sender else None, keep=keep)
        if sender is not None:  # records the tracer lost before batching travel in every header
            sender.upstream_dropped = lambda: int(tracer.stats.get("dropped", 0))
        if not quiet:
            for note in tracer.notes:
                err.print(f"[dim]{note}[/]", highlight=False)
        with progress() as bar:
            task = bar.add_task("tracing", total=duration)

            def show(p: dict[str, Any]) -> None:
                bar.update(task, completed=min(p["seconds"], duration),
                           description=f"tracing: {p['events']:,} events ({p['events_per_s']:,.0f}/s)")

            result = tracer.run(duration=duration, stop=stop, max_events=max_events, progress=show)
    finally:
        signal.signal(signal.SIGINT, previous)
        stream = sender.close() if sender else None
    return tracer, result, stream


def _summary(tracer: Any, result: Any, guest: str, vm_id: str, policy: dict[str, Any], output: Path | None,
             push: str | None, stream: dict[str, Any] | None) -> dict[str, Any]:
    """What ``vims collect --json`` prints: the options given, the counts, the top calls and programs."""
    events = result.events
    names = Counter(tracer.syscall_name(nr) for nr in events["nr"].to_pylist())
    programs = Counter(events["comm"].to_pylist())
    return {
        "guest": guest, "vm_id": vm_id, "method": result.method, "reason": result.reason, "policy": policy,
        "notes": tracer.notes, **result.stats, "output": str(output) if output else None, "push": push,
        "stream": stream, "top_syscalls": dict(names.most_common(10)),
        "top_programs": dict(programs.most_common(10)),
    }


def _print_summary(summary: dict[str, Any], result: Any) -> None:
    """The summary for a person."""
    stats = result.stats
    out.print(f"[bold]{stats['events']:,} events[/] in {stats['seconds']:g} s "
              f"({stats['events_per_s']:,.0f}/s) by {result.method}; ended: {result.reason}",
              highlight=False)
    dropped = [f"{summary[k]:,} {k}" for k in ("filtered", "capped", "path_unreadable", "dropped") if summary.get(k)]
    if dropped:
        out.print("not kept or incomplete: " + ", ".join(dropped), highlight=False)
    stream, push = summary["stream"], summary["push"]
    if stream:
        out.print(f"stream {push}: {stream['sent']} batches sent, {stream['dropped_batches']} dropped "
                  f"({stream['dropped_rows']} events)", highlight=False)
    calls = Counter(summary["top_syscalls"])
    programs = Counter(summary["top_programs"])
    out.print("top calls: " + ", ".join(f"{k} {v}" for k, v in calls.most_common(8)), highlight=False)
    out.print("top programs: " + ", ".join(f"{k} {v}" for k, v in programs.most_common(8)), highlight=False)
    if summary["output"]:
        out.print(f"wrote {summary['output']}", highlight=False)
