"""``vims remote``: REM-S's keys, enrolments, policies, the server, its status and history.

REM-S keeps its files in one folder (``--home``; default ``$VIMS_REMOTE_HOME`` or
``~/.cache/vims/remote``): ``rems.secret.json``/``rems.public.json`` (CURVE keys, 0600) and
``rems.sqlite`` (the history). ``--store`` (or ``$VIMS_REMOTE_STORE``) puts the history elsewhere: another
SQLite file, or a PostgreSQL database (``postgresql://...``, docs/remote-store.md). The commands that change
enrolments or policies work while ``vims remote serve`` runs: the server picks the change up within a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from vims.errors import InputError, VimsError

remote_app = typer.Typer(help="REM-S, the remote attestation server: keys, enrolment, serving, history.",
                         no_args_is_help=True)

HOME_HELP = "REM-S's folder (keys and history); default $VIMS_REMOTE_HOME or ~/.cache/vims/remote."
STORE_HELP = ("The history: a SQLite file (or sqlite:///PATH) or postgresql://USER@HOST/DB (password from "
              "~/.pgpass or $PGPASSWORD, not the command line); default rems.sqlite in --home.")
STORE_ENV = "VIMS_REMOTE_STORE"


def _home(home: Path | None) -> Path:
    from vims.paths import home_dir

    return home_dir(home, "VIMS_REMOTE_HOME", "remote")


def _store(home: Path, store: str | None = None, must_exist: bool = True) -> Any:
    """Open the history: ``--store`` if given, else ``rems.sqlite`` in the home."""
    from vims.remote.store import Store

    location = store or home / "rems.sqlite"
    if must_exist and not store and not Path(location).exists():
        raise VimsError(f"no REM-S database in {home} (run `vims remote init` first)")
    return Store(location, create=not must_exist)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def _read_policy(path: Path) -> dict[str, Any]:
    from vims.jsonfile import read_json

    obj = read_json(path, "policy file")
    if not isinstance(obj, dict):
        raise InputError("a policy is a JSON object", where=path)
    return obj


@remote_app.command("init")
def init(home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
         store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
         force: bool = typer.Option(False, "--force", metavar="", help="Replace existing keys (enrolled A-VMs must "
                                                           "then be given the new public key)."),
         json_out: bool = typer.Option(False, "--json", metavar="", help="Print the result as JSON.")) -> None:
    """Create REM-S's CURVE keypair (files 0600) and its history database."""
    from vims.console import out, print_json
    from vims.remote.keys import ServerKeys

    folder = _home(home)
    keys = ServerKeys.generate()
    public = keys.write(folder, force=force)
    opened = _store(folder, store, must_exist=False)
    opened.close()
    result = {"home": str(folder), "public_key_file": str(public), "curve_public": keys.public,
              "database": opened.display}
    if json_out:
        print_json(result)
    else:
        out.print(f"REM-S keys in {folder}; give A-VMs [bold]{public}[/]")


#: The fields of each line of a bulk enrolment file (``vims remote enroll --from FILE``).
ENROL_FIELDS = ("avm_id", "vm_id", "gate_port", "curve_public", "sign_public")


def _read_enrolments(path: Path) -> list[Any]:
    """Every A-VM a bulk enrolment file lists, each checked; the first malformed line is a user error
    naming it (``FILE:LINE: ...``), so nothing is enrolled from a file with one.

    The file is JSON lines (one object a line, with :data:`ENROL_FIELDS`; an ``avm.public.json``'s own
    ``kind`` may stay) or CSV whose first line names the same columns (in any order). Blank lines and
    lines starting with ``#`` are skipped. An A-VM, VM, gate port or CURVE key listed twice is refused.
    """
    import csv
    import json

    from vims.remote.keys import AvmPublic, check_id
    from vims.remote.store import Enrolment

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise VimsError(f"{path}: no such enrolment file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the enrolment file: {exc}", where=path) from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise InputError("no A-VMs in the enrolment file (JSON lines or CSV with a header line "
                         f"{','.join(ENROL_FIELDS)})", where=path)
    header: list[str] | None = None
    if not numbered[0][1].lstrip().startswith("{"):
        n, line = numbered.pop(0)
        header = [h.strip() for h in next(csv.reader([line]))]
        if sorted(header) != sorted(ENROL_FIELDS):
            raise InputError(f"a CSV enrolment file starts with the header {','.join(ENROL_FIELDS)} "
                             f"(any order), not {line.strip()!r}", where=f"{path}:{n}")
    entries: list[Enrolment] = []
    seen: dict[tuple[str, object], int] = {}
    for n, line in numbered:
        where = f"{path}:{n}"
        if header is None:
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise InputError(f"not a JSON object: {exc}", where=where) from None
            if not isinstance(obj, dict):
                raise InputError("not a JSON object", where=where)
            extra = sorted(set(obj) - set(ENROL_FIELDS) - {"kind"})
            if extra:
                raise InputError(f"unknown field {extra[0]!r} (fields: {', '.join(ENROL_FIELDS)})", where=where)
        else:
            cells = next(csv.reader([line]))
            if len(cells) != len(header):
                raise InputError(f"{len(cells)} fields, the header has {len(header)}", where=where)
            obj = {h: c.strip() for h, c in zip(header, cells, strict=True)}
        pub = AvmPublic.parse(obj, where)
        if "vm_id" not in obj:
            raise InputError("missing field 'vm_id'", where=where)
        try:
            vm_id = check_id(obj["vm_id"], "VM id")
        except InputError as exc:
            raise InputError(exc.message, where=where) from None
        port = obj.get("gate_port")
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InputError(f"gate_port {obj.get('gate_port')!r} is not a TCP port", where=where)
        for key in (("A-VM", pub.avm_id), ("VM", vm_id), ("gate port", port), ("CURVE key", pub.curve_public)):
            if key in seen:
                raise InputError(f"{key[0]} {key[1]} is listed twice (also on line {seen[key]})", where=where)
            seen[key] = n
        entries.append(Enrolment(pub, vm_id, port, where))
    return entries


@remote_app.command("enroll")
def enroll(public_file: Path | None = typer.Argument(None, help="The A-VM's avm.public.json (from `vims avm "
                                                     "init`); or give --from."),
           vm: str | None = typer.Option(None, "--vm", help="The id of the VM this A-VM watches."),
           gate_port: int | None = typer.Option(None, "--gate-port", help="The loopback port the VM's client "
                                                "connections arrive on (for the bundled guest: its serial line)."),
           from_file: Path | None = typer.Option(None, "--from", help="Enrol every A-VM this file lists, all or "
                                                 "none: JSON lines or CSV with a header line, fields avm_id, "
                                                 "vm_id, gate_port, curve_public, sign_public."),
           policy: Path | None = typer.Option(None, "--policy", help="A policy JSON file (default policy "
                                              "otherwise); with --from, every VM's."),
           force: bool = typer.Option(False, "--force", metavar="", help="Replace an enrolment of the same A-VM id."),
           home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
           store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
           json_out: bool = typer.Option(False, "--json", metavar="", help="Print the result as JSON.")) -> None:
    """Register an A-VM (its id, the VM it watches, its public keys and the VM's gate port), or every A-VM
    a file lists (--from)."""
    from vims.console import out, print_json
    from vims.remote.keys import AvmPublic
    from vims.remote.store import Enrolment

    if from_file is not None:
        if public_file is not None or vm is not None or gate_port is not None:
            raise InputError("give --from FILE, or an avm.public.json with --vm and --gate-port, not both")
        entries = _read_enrolments(from_file)
    else:
        if public_file is None or vm is None or gate_port is None:
            raise InputError("give an avm.public.json with --vm and --gate-port (or --from FILE)")
        entries = [Enrolment(AvmPublic.load(public_file), vm, gate_port)]
    with _store(_home(home), store) as opened:
        results = opened.enroll_many(entries, _read_policy(policy) if policy else None, force=force)
    if from_file is not None:
        if json_out:
            print_json({"file": str(from_file), "enrolled": results})
        else:
            out.print(f"enrolled {len(results)} A-VMs from {from_file}")
    elif json_out:
        print_json(results[0])
    else:
        r = results[0]
        out.print(f"enrolled A-VM {r['avm_id']} for VM {r['vm_id']}, gate port {r['gate_port']}, "
                  f"policy v{r['policy_version']}")


@remote_app.command("revoke")
def revoke(avm_id: str = typer.Argument(..., help="The A-VM to revoke."),
           home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
           store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
           json_out: bool = typer.Option(False, "--json", metavar="", help="Print the result as JSON.")) -> None:
    """Revoke an A-VM: its key is refused, its VM's open connections are cut, new ones refused."""
    from vims.console import out, print_json

    with _store(_home(home), store) as opened:
        opened.revoke(avm_id)
    if json_out:
        print_json({"avm_id": avm_id, "revoked": True})
    else:
        out.print(f"revoked A-VM {avm_id}")


@remote_app.command("policy")
def policy_cmd(vm: str = typer.Argument(..., help="The VM id."),
               set_file: Path | None = typer.Option(None, "--set", help="Store this policy JSON as the VM's "
                                                    "new policy (a running server pushes it at once)."),
               home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
               store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
               json_out: bool = typer.Option(False, "--json", metavar="", help="Print the policy as JSON.")) -> None:
    """Show a VM's policy, or set a new one."""
    from vims.console import out, print_json

    with _store(_home(home), store) as opened:
        if set_file is not None:
            opened.set_policy(vm, _read_policy(set_file), where=str(set_file))
        current = opened.policy(vm)
    if json_out:
        print_json(current)
    else:
        out.print_json(data=current)


@remote_app.command("serve")
def serve(home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
          store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
          control: str = typer.Option("tcp://127.0.0.1:5555", "--control",
                                      help="ZeroMQ endpoint of the control channel (CURVE)."),
          service: str | None = typer.Option(None, "--service", help="HOST:PORT of the protected service "
                                             "allowed connections are relayed to."),
          demo_service: bool = typer.Option(False, "--demo-service", metavar="", help="Protect a small line service of "
                                            "our own on loopback (answers each line with 'data: ...')."),
          metrics_port: int = typer.Option(9464, "--metrics-port", help="Prometheus endpoint on loopback "
                                           "(0: any free port)."),
          seconds: float | None = typer.Option(None, "--seconds", help="Stop after this many seconds."),
          quiet: bool = typer.Option(False, "--quiet", metavar="", help="Log only warnings."),
          json_out: bool = typer.Option(False, "--json", metavar="", help="Print the bound endpoints as one JSON line "
                                        "when ready (for scripts)."),
          console: str | None = typer.Option(None, "--console", help="Serve the web console at HOST:PORT "
                                             "(e.g. 127.0.0.1:8480; off by default). Every request needs "
                                             "the access token printed at start."),
          verifier_id: str | None = typer.Option(None, "--verifier-id", help="This verifier's name among those "
                                                 "sharing the store (default: host, pid and a random tag)."),
          lease_s: float = typer.Option(10.0, "--lease-s", help="Lease period (s): how long this verifier holds "
                                        "an A-VM after its last renewal; a killed verifier's A-VMs are taken "
                                        "over by another within about this much."),
          keep_history: float | None = typer.Option(None, "--keep-history", min=0.0, metavar="DAYS",
                                                    help="Prune history older than this many days (every "
                                                    "minute), even where a VM's policy keeps it longer; "
                                                    "the latest verdicts stay."),
          write_group: int = typer.Option(64, "--write-group", min=1, max=10000, metavar="N",
                                          help="Write up to N accepted reports that queue up together in one "
                                          "transaction (one commit); 1: a commit per report."),
          ) -> None:
    """Run REM-S: the control channel, one gate per enrolled VM and the metrics endpoint."""
    import asyncio
    import logging
    import sys

    from vims.console import err, to_json
    from vims.remote.keys import SECRET_REMS, ServerKeys, check_id
    from vims.remote.server import RemsServer

    folder = _home(home)
    keys = ServerKeys.load(folder / SECRET_REMS)
    if service and demo_service:
        raise InputError("give --service or --demo-service, not both")
    target = _host_port(service) if service else None
    console_at = _host_port(console) if console else None
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")

    async def main() -> None:
        opened = _store(folder, store)
        svc = None
        nonlocal target
        if demo_service:
            from vims.remote.service import start_line_service

            svc = await start_line_service()
            target = ("127.0.0.1", svc.sockets[0].getsockname()[1])
        if verifier_id is not None:
            check_id(verifier_id, "verifier id")
        server = RemsServer(opened, keys, control=control, service=target, metrics_port=metrics_port,
                            verifier_id=verifier_id, lease_s=lease_s, keep_history_days=keep_history,
                            write_group=write_group)
        web = None
        if console_at is not None:  # before the server, so a console that cannot bind starts nothing
            from vims.remote.console import ConsoleServer

            web = ConsoleServer(opened.location, *console_at, live=server.live).start()
        try:
            await server.start()
        except BaseException:
            if web is not None:
                web.stop()
            raise
        info = {"control": server.endpoint, "curve_public": keys.public, "gates": server.gate_ports(),
                "metrics": f"http://127.0.0.1:{server.metrics_bound}/metrics",
                "service": f"{target[0]}:{target[1]}" if target else None, "store": opened.display,
                "verifier_id": server.verifier_id, "lease_s": server.lease_s,
                "console": web.url if web else None, "console_token": web.token if web else None}
        if json_out:  # one line, so a script can read it while the server runs
            sys.stdout.write(to_json(info, indent=None) + "\n")
            sys.stdout.flush()
        else:
            err.print(f"REM-S on {info['control']}, gates {info['gates']}, metrics {info['metrics']}, "
                      f"service {info['service']}, history {info['store']}")
            if web is not None:
                err.print(f"console on {web.url}/?token={web.token}")
        try:
            if seconds is None:
                await asyncio.Event().wait()
            else:
                await asyncio.sleep(seconds)
        finally:
            if web is not None:
                web.stop()
            await server.stop()
            if svc is not None:
                svc.close()
            opened.close()

    asyncio.run(main())


@remote_app.command("prune")
def prune(older_than: float | None = typer.Option(None, "--older-than", min=0.0, metavar="DAYS",
                                                  help="Also prune history older than this many days where a "
                                                  "VM's policy keeps it longer."),
          max_unattributed: int | None = typer.Option(None, "--max-unattributed", min=0,
                                                      help="The most rows kept of refused unknown keys "
                                                      "(default: as `serve` keeps)."),
          home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
          store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
          json_out: bool = typer.Option(False, "--json", metavar="", help="Print the counts as JSON.")) -> None:
    """Prune the history now, as `serve` does every minute: each VM's reports and decisions older than its
    policy's history_days (or --older-than), documents beyond its history_documents. The latest verdict of
    every A-VM and the latest decision of every VM stay, however old."""
    from vims.console import out, print_json
    from vims.remote.policy import retention
    from vims.remote.store import MAX_UNATTRIBUTED

    with _store(_home(home), store) as opened:
        limits = {a["vm_id"]: retention(opened.policy(a["vm_id"])) for a in opened.avms() if a["revoked_at"] is None}
        pruned = opened.prune(limits, MAX_UNATTRIBUTED if max_unattributed is None else max_unattributed,
                              max_days=older_than)
    if json_out:
        print_json({"older_than_days": older_than, "pruned": pruned})
    else:
        out.print("pruned " + ", ".join(f"{n} {what}" for what, n in pruned.items()))


@remote_app.command("simulate")
def simulate(keys: Path | None = typer.Option(None, "--keys", help="The A-VM's avm.secret.json (default "
                                              "$VIMS_AVM_HOME or ~/.cache/vims/avm)."),
             server_key: Path | None = typer.Option(None, "--server-key", help="REM-S's rems.public.json "
                                                    "(default: in --home)."),
             control: str = typer.Option("tcp://127.0.0.1:5555", "--control", help="REM-S's control channel."),
             score: float = typer.Option(0.95, "--score", min=0.0, max=1.0, help="Behaviour score to report."),
             fail_check: str | None = typer.Option(None, "--fail-check", help="Report this check as failing."),
             seconds: float = typer.Option(30.0, "--seconds", help="How long to run."),
             home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
             json_out: bool = typer.Option(False, "--json", metavar="",
                                           help="Print the counts as JSON at the end.")) -> None:
    """Run a simulated A-VM (real keys, real protocol, made-up measurements): to try REM-S without a guest."""
    import time

    from vims.console import err, out, print_json
    from vims.remote.keys import PUBLIC_REMS, SECRET_AVM, AvmIdentity, avm_home, load_server_public
    from vims.remote.simavm import SimulatedAvm

    ident = AvmIdentity.load(keys or avm_home(None) / SECRET_AVM)
    server_public = load_server_public(server_key or _home(home) / PUBLIC_REMS)
    avm = SimulatedAvm(ident, control, server_public, score=score)
    avm.failing_check = fail_check
    with avm:
        policy = avm.wait_policy(20)
        err.print(f"A-VM {ident.avm_id} connected, policy v{policy['version']}; reporting for {seconds:g} s")
        time.sleep(seconds)
    result = {"avm_id": ident.avm_id, "sent": avm.sent, "accepted": avm.session.accepted,
              "rejected": dict(avm.session.rejected), "policy_version": policy["version"]}
    if json_out:
        print_json(result)
    else:
        out.print(result)


def _when(t: float | None) -> str:
    import datetime

    return "-" if t is None else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float | None) -> str:
    """A duration for a table: ``4.2 s``, ``3.5 min``, ``2.0 h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    return sign + (f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


@remote_app.command("status")
def status(home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
           store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
           json_out: bool = typer.Option(False, "--json", metavar="", help="Print as JSON.")) -> None:
    """Every enrolled A-VM: its VM, gate port, policy, last report, last decision and the verifier holding
    its lease; the verifiers sharing the store; and totals."""
    from rich.table import Table

    from vims.console import out, print_json
    from vims.remote.views import fleet

    with _store(_home(home), store) as opened:
        view = fleet(opened)
    rows, counts = view["avms"], view["totals"]
    if json_out:
        print_json(view)
        return
    table = Table("A-VM", "VM", "state", "gate", "policy", "acked", "last seq", "last report", "last decision",
                  "verifier", "lease age", "expires in")
    for r in rows:
        rep = r["last_report"]
        dec = r["last_decision"]
        lease = r["lease"]
        table.add_row(
            r["avm_id"] + (" [red](revoked)[/]" if r["revoked"] else ""), r["vm_id"], r["state"],
            str(r["gate_port"]),
            f"v{r['policy_version']}", f"v{r['acked_version']}" if r["acked_version"] else "-", str(r["last_seq"]),
            "-" if rep is None else f"{_when(rep['received_at'])} {rep['status']} {rep['reason'] or ''}",
            "-" if dec is None else f"{_when(dec['time'])} {dec['kind']}: {dec['reason']}",
            "-" if lease is None else lease["verifier_id"] + (" (expired)" if lease["expired"] else ""),
            "-" if lease is None else _age(lease["age_s"]),
            "-" if lease is None else _age(lease["expires_in_s"]))
    out.print(table)
    if view["verifiers"]:
        verifiers = Table("verifier", "state", "control", "host", "pid", "heartbeat", "lease period", "leases",
                          title="verifiers")
        for v in view["verifiers"]:
            verifiers.add_row(v["verifier_id"], v["state"], v["endpoint"] or "-", v["host"] or "-",
                              str(v["pid"] or "-"), f"{_age(v['heartbeat_s_ago'])} ago", _age(v["lease_s"]),
                              str(v["leases"]))
        out.print(verifiers)
    out.print(f"reports: {counts['reports']}  decisions: {counts['decisions']}")


@remote_app.command("history")
def history(vm: str = typer.Argument(..., help="The VM id."),
            limit: int = typer.Option(50, "--limit", help="How many of the latest reports and decisions."),
            home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
            store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
            json_out: bool = typer.Option(False, "--json", metavar="", help="Print as JSON.")) -> None:
    """A VM's latest reports and gate decisions, each with its reason (newest first)."""
    from rich.table import Table

    from vims.console import out, print_json
    from vims.remote.views import history as history_view

    with _store(_home(home), store) as opened:
        hist = history_view(opened, vm, limit)
    if json_out:
        print_json(hist)
        return
    reports = Table("time", "seq", "status", "score", "verdict / reason", title=f"reports of {vm}")
    for r in hist["reports"]:
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        reports.add_row(_when(r["received_at"]), str(r["seq"] or "-"), r["status"], score,
                        f"{r['verdict'] or r['reason']}: {r['detail'] or ''}")
    decisions = Table("time", "connection", "decision", "reason", "latency", title=f"decisions on {vm}")
    for d in hist["decisions"]:
        lat = "-" if d["latency_s"] is None else f"{d['latency_s'] * 1000:.1f} ms"
        decisions.add_row(_when(d["time"]), d["conn_id"], d["kind"], d["reason"], lat)
    out.print(reports)
    out.print(decisions)


@remote_app.command("decisions")
def decisions_cmd(search: str = typer.Option("", "--search", help="Only decisions whose VM, kind, reason, "
                                             "connection or peer contains this (any case)."),
                  limit: int = typer.Option(100, "--limit", help="How many of the latest decisions."),
                  home: Path | None = typer.Option(None, "--home", help=HOME_HELP),
                  store: str | None = typer.Option(None, "--store", envvar=STORE_ENV, help=STORE_HELP),
                  json_out: bool = typer.Option(False, "--json", metavar="", help="Print as JSON.")) -> None:
    """The gate decisions on every VM, newest first, searchable."""
    from rich.table import Table

    from vims.console import out, print_json
    from vims.remote.views import decisions

    with _store(_home(home), store) as opened:
        view = decisions(opened, search, limit)
    if json_out:
        print_json(view)
        return
    table = Table("time", "VM", "connection", "decision", "reason")
    for d in view["decisions"]:
        table.add_row(_when(d["time"]), d["vm_id"], d["conn_id"], d["kind"], d["reason"])
    out.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(remote_app, name="remote")
