"""``vims avm run`` and ``vims avm replay``: the A-VM agent live, and recorded data through the same pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

JSON = typer.Option(False, "--json", metavar="", help="Print every integrity report as one JSON line on stdout.")
MODEL = typer.Option(..., "--model", "-m", help="A model or model-set file (.skops with its .card.json beside it).")
WORKERS = typer.Option(2, "--workers", "-w", min=1, help="Scorer worker processes.")
INTERVAL = typer.Option(1.0, "--interval", min=0.05, help="Reporting interval, seconds.")
THRESHOLD = typer.Option(0.5, help="Behaviour score under which the VM is called anomalous.")
VM_ID = typer.Option("vm-1", "--vm-id", help="The monitored VM's id (carried by every report).")
AVM_ID = typer.Option("avm-1", "--avm-id", help="This A-VM's id (from its keys when --remote is given).")


def _printer(as_json: bool, out_file: Path | None) -> Any:
    import sys

    from vims.avm.report import summary_line
    from vims.console import err, to_json

    handle = out_file.open("a") if out_file is not None else None

    def sink(report: dict[str, Any]) -> None:
        if as_json:  # JSON lines: one report per line, for `jq` and log shippers
            sys.stdout.write(to_json(report, indent=None) + "\n")
            sys.stdout.flush()
        else:
            err.print(summary_line(report), highlight=False)
        if handle is not None:
            handle.write(to_json(report, indent=None) + "\n")
            handle.flush()

    return sink


def _run(
    model: Path = MODEL,
    workers: int = WORKERS,
    interval: float = INTERVAL,
    threshold: float = THRESHOLD,
    duration: float = typer.Option(None, help="Stop after this many seconds (default: until Ctrl-C)."),
    guest: str = typer.Option("vims-guest", "--name", help="Trace this guest (started by `vims guest up`) "
                              "in the agent itself."),
    qmp: Path = typer.Option(None, "--qmp", help="Instead of --name: trace a VM that VIMS did not start, by its "
                             "QMP monitor socket or libvirt:DOMAIN (see `vims attach --list`); detached, as it was, "
                             "when the agent stops."),
    pull: str = typer.Option(None, "--pull", help="Instead of tracing the guest here, receive events and check "
                             "results from a collector in another process at this ZeroMQ endpoint "
                             "(`vims collect --push` to it), e.g. tcp://127.0.0.1:5600."),
    policy_file: Path = typer.Option(None, "--policy", help="Sampling policy of the tracer, JSON or TOML."),
    checks_every: float = typer.Option(10.0, "--checks-every", min=0.5, help="Seconds between two runs of "
                                       "the light static checks."),
    remote: str = typer.Option(None, "--remote", help="Send signed reports to REM-S at this endpoint "
                               "(needs --keys and --server-key)."),
    keys: Path = typer.Option(None, "--keys", help="This A-VM's secret key file (`vims avm init`); with --pull "
                              "its CURVE key also authenticates the collector's channel."),
    collector_key: Path = typer.Option(None, "--collector-key", help="With --pull and --keys: the only "
                                       "collector allowed to send, its public key file (JSON with curve_public)."),
    server_key: Path = typer.Option(None, "--server-key", help="REM-S's public key file (rems.public.json)."),
    vm_id: str = VM_ID,
    avm_id: str = AVM_ID,
    queue_size: int = typer.Option(16, min=1, help="Event batches that may wait per worker before drops."),
    output: Path = typer.Option(None, "--output", "-o", help="Also append every report to this JSON-lines file."),
    as_json: bool = JSON,
) -> None:
    """Run the A-VM agent: events from the collector -> scorer workers -> an integrity report every interval.

    Nothing on the collector side waits for a slow scorer: what a full queue cannot take is dropped and
    counted in the report, a scorer that dies is restarted and its gap reported. Reports go to stdout
    (--json), a file (-o) and REM-S (--remote).
    """
    from vims.avm.agent import Agent
    from vims.avm.assembly import AvmRun
    from vims.console import err

    identity, client = _client(remote, keys, server_key, model)
    if client is not None:
        avm_id = identity.avm_id
    agent = Agent(model, vm_id=vm_id, avm_id=avm_id, workers=workers, interval_s=interval, threshold=threshold,
                  queue_size=queue_size)
    run = AvmRun(agent, client, sinks=[_printer(as_json, output)])
    err.print(f"starting {workers} scorer worker(s)...", highlight=False)
    attached = None
    try:
        if pull is not None:
            run.start()
            run.pull(pull, *_pull_keys(identity, collector_key))
            where = f"listening at {pull}"
        else:
            policy = _tracing_policy(policy_file, run)
            if qmp is not None:
                from vims.collector.attach import AttachedVm

                attached = AttachedVm(qmp)
            run.trace(attached or guest, policy, vm_id, checks_every)
            where = f"tracing VM {attached.name!r} (attached)" if attached else f"tracing guest {guest!r}"
        err.print(f"A-VM agent {where}; a report every {interval:g} s (Ctrl-C stops)", highlight=False)
        run.run(duration)
    finally:
        run.close(join_s=5)
        if attached is not None:
            attached.detach()
    run.raise_failure()


def _client(remote: str | None, keys: Path | None, server_key: Path | None, model: Path) -> tuple[Any, Any]:
    """This A-VM's identity (from ``--keys``) and its REM-S client (with ``--remote``), or None."""
    from vims.errors import InputError

    if remote is not None and (keys is None or server_key is None):
        raise InputError("--remote needs --keys (avm.secret.json) and --server-key (rems.public.json)")
    if keys is None:
        return None, None
    from vims.remote.keys import AvmIdentity, load_server_public

    identity = AvmIdentity.load(keys)
    if remote is None or server_key is None:
        return identity, None
    from vims.remote.client import AvmClient

    return identity, AvmClient(identity, remote, load_server_public(server_key),
                               capabilities={"collectors": ["push"], "checks": [], "models": [str(model)]})


def _pull_keys(identity: Any, collector_key: Path | None) -> tuple[str | None, list[str] | None]:
    """``--pull``'s CURVE secret key (the A-VM's own, from ``--keys``) and the collectors allowed to send."""
    from vims.errors import InputError

    if identity is None:
        if collector_key is not None:
            raise InputError("--collector-key needs --keys (the A-VM's CURVE keys authenticate the channel)")
        return None, None
    if collector_key is None:
        return identity.curve_secret, None
    from vims.remote.keys import load_server_public

    return identity.curve_secret, [load_server_public(collector_key)]


def _tracing_policy(policy_file: Path | None, run: Any) -> Any:
    """The tracer's sampling policy: ``--policy``, else the tracing part of REM-S's policy, else the default."""
    from vims.console import err
    from vims.tracing_policy import Policy

    if policy_file is not None:
        run.start()
        return Policy.load(policy_file)
    if run.client is None:
        run.start()
        return None
    # REM-S decides how the guest is traced: its policy's tracing part, unless --policy overrides it.
    policy = Policy.from_dict((run.start(wait_policy=30) or {}).get("tracing", {}), where="REM-S policy")
    err.print(f"tracing as REM-S's policy says: {policy.to_dict()}", highlight=False)
    return policy


def _replay(
    data: Path = typer.Argument(..., help="An event table (`vims collect -o`) or a trace table "
                                "(`vims datasets import`), Parquet."),
    model: Path = MODEL,
    workers: int = WORKERS,
    interval: float = INTERVAL,
    threshold: float = THRESHOLD,
    pace: bool = typer.Option(False, "--pace/--full-speed", help="Replay at the recorded pace (event times), "
                              "or as fast as the pipeline takes it."),
    speed: float = typer.Option(1.0, help="With --pace: this many times faster than recorded."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Events per batch sent to the scorers."),
    drop: bool = typer.Option(False, "--drop", metavar="",
                              help="Drop (and count) what the scorers cannot take, like the "
                              "live collector, instead of waiting for them."),
    scores: Path = typer.Option(None, "--scores", "-o", help="Write the final per-trace (or per-process) "
                                "scores to this Parquet file (the `vims score` columns for a trace table)."),
    vm_id: str = VM_ID,
    as_json: bool = JSON,
) -> None:
    """Feed recorded events or traces through the A-VM pipeline, with reports, as `vims avm run` would."""
    from vims.avm.agent import Agent
    from vims.avm.replay import load, replay, score_table
    from vims.console import err, out, progress, to_json
    from vims.tables import write_table

    events, traces = load(data, vm_id=vm_id)
    # a trace table's pids are its traces: no cutting at execve/exit (its numbers may not be x86-64)
    agent = Agent(model, vm_id=vm_id, workers=workers, interval_s=interval, threshold=threshold,
                  segment=traces is None)
    agent.sinks.append(_printer(as_json, None))
    err.print(f"starting {workers} scorer worker(s)...", highlight=False)
    with agent:
        with progress() as bar:
            task = bar.add_task(f"replaying {events.num_rows:,} events", total=events.num_rows)
            run = replay(agent, events, batch_size=batch_size, pace=pace, speed=speed, lossless=not drop,
                         on_batch=lambda n: bar.advance(task, n))
        final = agent.report()
        table = score_table(agent, traces)
        if scores is not None:
            write_table(table, scores)
    summary = {**run, "report": final["seq"], "behaviour": final["behaviour"]["score"],
               "events_total": final["events"], "processes_scored": table.num_rows,
               "anomalous": int(sum(table.column("anomalous").to_pylist())), "scores": str(scores) if scores else None}
    if as_json:
        print(to_json({"summary": summary}, indent=None), flush=True)
    else:
        ev = final["events"]
        out.print(f"replayed {run['events']:,} events in {run['seconds']:.2f} s ({run['events_per_s']:,.0f}/s): "
                  f"{ev['scored']:,} scored, {ev['dropped']:,} dropped, {ev['missing']:,} missing; "
                  f"{summary['anomalous']:,} of {table.num_rows:,} processes anomalous"
                  + (f" -> {scores}" if scores else ""))


def register(avm_app: typer.Typer) -> None:
    avm_app.command("run")(_run)
    avm_app.command("replay")(_replay)
