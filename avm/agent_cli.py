"""``vims avm run`` and ``vims avm replay``: the A-VM agent live, and recorded data through the same pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

JSON = typer.Option(False, "--json", help="Print every integrity report as one JSON line on stdout.")
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
    pull: str = typer.Option(None, "--pull", help="Instead of tracing the guest here, receive events and check "
                             "results from a collector in another process at this ZeroMQ endpoint "
                             "(`vims collect --push` to it), e.g. tcp://127.0.0.1:5600."),
    policy_file: Path = typer.Option(None, "--policy", help="Sampling policy of the tracer, JSON or TOML."),
    checks_every: float = typer.Option(10.0, "--checks-every", min=0.5, help="Seconds between two runs of "
                                       "the light static checks."),
    remote: str = typer.Option(None, "--remote", help="Send signed reports to REM-S at this endpoint "
                               "(needs --keys and --server-key)."),
    keys: Path = typer.Option(None, "--keys", help="This A-VM's secret key file (`vims avm init`)."),
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
    import threading

    from vims.avm.agent import Agent, RemoteSink, ingest, trace_guest
    from vims.console import err
    from vims.errors import InputError

    client = None
    if remote is not None:
        if keys is None or server_key is None:
            raise InputError("--remote needs --keys (avm.secret.json) and --server-key (rems.public.json)")
        from vims.remote.client import AvmClient
        from vims.remote.keys import AvmIdentity, load_server_public

        identity = AvmIdentity.load(keys)
        avm_id = identity.avm_id
        client = AvmClient(identity, remote, load_server_public(server_key),
                           capabilities={"collectors": ["push"], "checks": [], "models": [str(model)]})
    agent = Agent(model, vm_id=vm_id, avm_id=avm_id, workers=workers, interval_s=interval, threshold=threshold,
                  queue_size=queue_size)
    agent.sinks.append(_printer(as_json, output))
    if client is not None:
        agent.sinks.append(RemoteSink(agent, client))
    stop = threading.Event()
    err.print(f"starting {workers} scorer worker(s)...", highlight=False)
    agent.start()
    failure: list[BaseException] = []

    def source(target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:  # raised again below, in the main thread: one red line for the user
            failure.append(exc)
            stop.set()

    if pull is not None:
        thread = threading.Thread(target=source, args=(ingest, agent, pull, stop), name="vims-ingest", daemon=True)
        where = f"listening at {pull}"
    else:
        from vims.collector.policy import Policy

        policy = Policy.load(policy_file) if policy_file is not None else None
        if policy is None and client is not None:
            # REM-S decides how the guest is traced: its policy's tracing part, unless --policy overrides it.
            client.start()
            policy = Policy.from_dict(client.wait_policy(timeout=30).get("tracing", {}), where="REM-S policy")
            err.print(f"tracing as REM-S's policy says: {policy.to_dict()}", highlight=False)
        thread = threading.Thread(target=source, args=(trace_guest, agent, guest, stop, policy, vm_id, checks_every),
                                  name="vims-tracer", daemon=True)
        where = f"tracing guest {guest!r}"
    thread.start()
    if client is not None:
        client.start()  # idempotent: it may have started above to fetch the policy
    err.print(f"A-VM agent {where}; a report every {interval:g} s (Ctrl-C stops)", highlight=False)
    try:
        agent.run(duration, stop)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        thread.join(timeout=5)
        if client is not None:
            client.stop()
        agent.close()
    if failure:
        raise failure[0]


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
    drop: bool = typer.Option(False, "--drop", help="Drop (and count) what the scorers cannot take, like the "
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
