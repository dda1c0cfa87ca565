"""Tracing the real guest's system calls: the normal workload, the webshell attack, a model telling them
apart, the breakpoint fallback, the command line with its stream, and the guest dying mid-trace."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from vims.collector.backends import QemuBackend
from vims.collector.guest import Guest
from vims.collector.kernel import KernelView
from vims.collector.memory import PhysicalMemory
from vims.collector.recorder import TraceResult
from vims.collector.stream import BatchReceiver
from vims.collector.tracer import SyscallTracer
from vims.datasets.capture import traces_from_events
from vims.schemas import EVENT_SCHEMA, conform
from vims.tables import read_table
from vims.tracing_policy import Policy


@pytest.fixture(scope="module")
def view(guest: Guest) -> Iterator[KernelView]:
    memory = PhysicalMemory.open(guest.memory_path)
    yield KernelView(memory, guest.profile)
    memory.close()


def wait_for_events(tracer: SyscallTracer, count: int, timeout: float = 60.0) -> None:
    """Return once ``tracer`` has recorded ``count`` events (or after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while tracer.stats.get("events", 0) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def trace(guest: Guest, view: KernelView, seconds: float, during: Callable[[], Any] | None = None,
          **options: Any) -> tuple[TraceResult, SyscallTracer]:
    """Trace for ``seconds`` while ``during`` runs in the guest (started half a second in)."""
    failures: list[BaseException] = []

    def play() -> None:
        time.sleep(0.5)
        try:
            assert during is not None
            during()
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    with QemuBackend.from_guest(guest) as backend:
        tracer = SyscallTracer(backend, "test-vm", **options)
        player = threading.Thread(target=play) if during else None
        if player:
            player.start()
        result = tracer.run(duration=seconds)
        if player:
            player.join()
        assert backend.gdb.breakpoints() == []  # nothing left in the guest
    if failures:
        raise failures[0]
    return result, tracer


def normal_workload(guest: Guest) -> Callable[[], None]:
    def run() -> None:
        for _ in range(3):
            assert guest.scenario("normal").startswith("normal: ok")
    return run


@pytest.fixture(scope="module")
def normal_a(guest: Guest, view: KernelView) -> tuple[TraceResult, SyscallTracer]:
    return trace(guest, view, 10, normal_workload(guest))


@pytest.fixture(scope="module")
def normal_b(guest: Guest, view: KernelView) -> tuple[TraceResult, SyscallTracer]:
    return trace(guest, view, 10, normal_workload(guest))


@pytest.fixture(scope="module")
def webshell(guest: Guest, view: KernelView) -> Iterator[tuple[TraceResult, SyscallTracer]]:
    try:
        yield trace(guest, view, 8, lambda: guest.scenario("webshell"))
    finally:
        guest.reset()


def test_normal_scenario_events(guest: Guest, normal_a: tuple[TraceResult, SyscallTracer]) -> None:
    result, tracer = normal_a
    ev = result.events
    assert result.method == "watchpoint" and result.reason == "duration"
    assert ev.schema.equals(EVENT_SCHEMA) and conform(ev, EVENT_SCHEMA).num_rows == ev.num_rows > 100
    assert ev["seq"].to_pylist() == list(range(ev.num_rows))
    names = {tracer.syscall_name(nr) for nr in ev["nr"].to_pylist()}
    assert {"execve", "openat", "read", "write", "close", "clone", "wait4"} <= names
    rows = ev.to_pylist()
    programs = {r["comm"] for r in rows}
    assert {"httpd", "vims-scenario", "wget"} <= programs or {"httpd", "vims-scenario"} <= programs
    # Paths are read from the process's memory: httpd serves index.html, status.cgi is run.
    paths = {r["path"] for r in rows if r["path"]}
    assert any(p.endswith("index.html") for p in paths) and any("status.cgi" in p for p in paths)
    assert all(r["path"] is None for r in rows if tracer.syscall_name(r["nr"]) in ("read", "write"))
    # Call sites are offsets into the (static) busybox binary, the same in every process.
    sites = [r["site"] for r in rows if r["comm"] in ("httpd", "wget")]
    assert sites and all(s.startswith("busybox+0x") for s in sites)
    # pids and names: what the guest's own /proc says about the long-lived processes.
    last: dict[int, dict[str, Any]] = {}
    for r in rows:
        last[r["pid"]] = r
    alive = [pid for pid, r in last.items() if tracer.syscall_name(r["nr"]) not in ("execve", "exit_group")]
    listing = guest.run("for p in " + " ".join(map(str, alive)) + "; do [ -e /proc/$p/comm ] && "
                        "echo $p $(cat /proc/$p/status | grep -E '^Tgid' | cut -f2) $(cat /proc/$p/comm); done")
    seen = [line.split(maxsplit=2) for line in listing.splitlines() if line.strip()]
    assert len(seen) >= 3, listing
    for pid, tgid, comm in seen:
        assert last[int(pid)]["comm"] == comm and last[int(pid)]["tgid"] == int(tgid), (pid, comm)
    # the listening server: started at boot, so the lowest pid (pidof lists the newest first, and a child
    # httpd forked for a request after the trace ended cannot be in it); only the pids: the control line
    # once carried a late "cat: ..." of the listing above
    httpd_pid = min(int(p) for p in guest.run("pidof httpd").split() if p.isdigit())
    assert any(r["pid"] == httpd_pid and r["comm"] == "httpd" for r in rows)


def _descendants(rows: list[dict[str, Any]], root: int) -> set[int]:
    parent = {r["pid"]: r["ppid"] for r in rows}
    family = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in family and pid not in family:
                family.add(pid)
                changed = True
    return family


def _webshell_cgi(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The execve by which httpd's child became the exec.cgi script."""
    return next(r for r in rows if r["nr"] == 59 and r["comm"] == "httpd" and (r["path"] or "").endswith("exec.cgi"))


def test_webshell_shows_sh_under_httpd_and_the_shadow_file(webshell: tuple[TraceResult, SyscallTracer]) -> None:
    result, tracer = webshell
    rows = result.events.to_pylist()
    cgi = _webshell_cgi(rows)
    httpd = {r["pid"] for r in rows if r["comm"] == "httpd"}
    assert cgi["ppid"] in httpd  # httpd forked the CGI process...
    family = _descendants(rows, cgi["pid"])
    shells = [r for r in rows if r["nr"] == 59 and r["pid"] in family and (r["argv"] or "").startswith("sh -c")]
    assert shells, "no `sh -c` started below httpd's CGI"  # ...which ran a shell with the attacker's command
    assert "/etc/shadow" in shells[0]["argv"]
    shadow = [r for r in rows if r["path"] == "/etc/shadow" and tracer.syscall_name(r["nr"]) in ("open", "openat")]
    assert shadow and all(r["pid"] in family for r in shadow)
    assert any(r["path"] == "/www/owned.txt" for r in rows if r["pid"] in family)


def test_a_model_of_normal_captures_flags_the_webshell(
    normal_a: tuple[TraceResult, SyscallTracer], normal_b: tuple[TraceResult, SyscallTracer],
    webshell: tuple[TraceResult, SyscallTracer],
) -> None:
    from vims.models import stide
    train = traces_from_events(normal_a[0].events)
    held_out = traces_from_events(normal_b[0].events)
    rows = webshell[0].events.to_pylist()
    family = _descendants(rows, _webshell_cgi(rows)["pid"])
    traces = traces_from_events(webshell[0].events, label="attack")
    pids = [int(t.split(":")[2]) for t in traces["trace_id"].to_pylist()]
    attack = traces.filter(pa.array([p in family for p in pids]))
    assert attack.num_rows >= 2
    detector = stide.Stide(k=6).fit(train["syscalls"].to_pylist())
    normal_scores = detector.anomaly_score(held_out["syscalls"].to_pylist())
    attack_scores = detector.anomaly_score(attack["syscalls"].to_pylist())
    assert attack_scores.max() > np.quantile(normal_scores, 0.95)
    assert np.mean(attack_scores) > np.mean(normal_scores)


def test_duty_cycle_and_filters(guest: Guest, view: KernelView) -> None:
    policy = Policy(mode="duty-cycle", window_ms=200, period_ms=1000, exclude=("init", "cat"))
    busy = ("(timeout 3 cat /dev/zero > /dev/null &); "
            "timeout 3 dd if=/dev/zero of=/dev/null bs=1 count=100000000")
    result, _ = trace(guest, view, 4, lambda: guest.execute(busy, timeout=30), policy=policy)
    assert result.reason == "duration" and result.events.num_rows > 0
    assert 0.1 < result.stats["armed_fraction"] < 0.4
    comms = set(result.events["comm"].to_pylist())
    assert "dd" in comms and "cat" not in comms and "init" not in comms and result.stats["filtered"] > 10


def test_policy_changed_while_tracing_takes_effect(guest: Guest, view: KernelView) -> None:
    busy = "timeout 8 dd if=/dev/zero of=/dev/null bs=1 count=100000000"
    switched: list[int] = []
    dd_seen, dd_done, others_after, stop = threading.Event(), threading.Event(), threading.Event(), threading.Event()

    def look(batch: pa.RecordBatch) -> None:
        comms = batch.column("comm").to_pylist()
        if "dd" in comms:
            dd_seen.set()
        if dd_done.is_set() and any(c != "dd" for c in comms):
            others_after.set()

    with QemuBackend.from_guest(guest) as backend:
        tracer = SyscallTracer(backend, "test-vm", on_batch=look)

        def change() -> None:
            # As REM-S would: a new policy arrives while the trace runs (here: stop tracing dd). It waits
            # for dd's calls to be delivered, not for a time: a loaded host starts dd late.
            try:
                dd_seen.wait(60)
                switched.append(time.time_ns())
                tracer.set_policy(Policy(exclude=("dd",)))
                # The trace goes on under the new policy until dd has ended and other calls came in
                # (while dd runs it may hold the vCPU: the others' calls can wait for its end).
                player.join()
                others_after.wait(60)
            finally:
                stop.set()

        def play() -> None:
            try:
                guest.execute(busy, timeout=60)
            finally:
                dd_done.set()

        player = threading.Thread(target=play)
        changer = threading.Thread(target=change)
        player.start()
        changer.start()
        result = tracer.run(duration=90, stop=stop)
        player.join()
        changer.join()
    assert dd_seen.is_set(), result.stats
    ts = result.events["ts_ns"].to_numpy()
    comm = result.events["comm"].to_numpy(zero_copy_only=False)
    dd = comm == "dd"
    assert (dd & (ts < switched[0])).any()  # dd traced before the change
    # The order of events (how soon it takes effect is a duration, for benchmarks/): dd's calls were
    # dropped by the new policy (filtered) while the trace went on recording other calls after dd's last.
    assert result.stats["filtered"] > 0 and any("policy changed" in note for note in tracer.notes)
    assert (ts[~dd] > ts[dd].max()).any()


def test_breakpoint_fallback_works_too(guest: Guest, view: KernelView) -> None:
    result, _ = trace(guest, view, 4, lambda: guest.scenario("normal"), method="breakpoint")
    assert result.method == "breakpoint" and result.reason == "duration"
    assert result.events.num_rows > 5
    assert guest.run("echo still-here").strip() == "still-here"


def test_stop_leaves_the_guest_running_untouched(guest: Guest, view: KernelView) -> None:
    stop = threading.Event()
    with QemuBackend.from_guest(guest) as backend:
        tracer = SyscallTracer(backend, "test-vm")
        threading.Timer(1.0, stop.set).start()
        result = tracer.run(duration=60, stop=stop)
        assert result.reason == "interrupted" and backend.gdb.breakpoints() == [] and backend.gdb.running
    assert guest.run("echo alive").strip() == "alive"
    # A new client finds the guest running and free of traps: it can trace again from scratch.
    again, _ = trace(guest, view, 1)
    assert again.reason == "duration"


@pytest.fixture(scope="module")
def spare(guest_image: Any) -> Iterator[Guest]:
    """A second, detached guest (as `vims guest up` leaves one) for the command line and for killing."""
    g = Guest.start(guest_image, name=f"vims-test-spare-{os.getpid()}", detach=True)
    try:
        yield g
    finally:
        g.stop()


def test_collect_command_writes_parquet_and_streams(spare: Guest, tmp_path: Path) -> None:
    from vims.cli import app

    out = tmp_path / "events.parquet"
    with BatchReceiver("tcp://127.0.0.1:*") as rx:
        result = CliRunner().invoke(app, ["collect", "--name", spare.name, "-d", "3", "-o", str(out),
                                          "--push", rx.endpoint, "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        got = []
        while (m := rx.recv(timeout=2)) is not None:
            got.append(m)
    events = read_table(out, EVENT_SCHEMA)
    assert summary["events"] == events.num_rows > 0 and summary["reason"] == "duration"
    assert summary["stream"]["dropped_batches"] == 0 and rx.gaps == 0
    assert sum(m.batch.num_rows for m in got) == events.num_rows
    assert {m.sender for m in got} == {spare.name}


def test_collect_command_errors_are_one_line(tmp_path: Path) -> None:
    from vims.cli import app

    bad = tmp_path / "p.json"
    bad.write_text('{"mode": "never"}')
    r = CliRunner().invoke(app, ["collect", "-d", "1", "--name", "no-such-guest", "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "no guest named 'no-such-guest'" in str(r.exception)
    r = CliRunner().invoke(app, ["collect", "-d", "1", "--policy", str(bad), "-o", str(tmp_path / "x")])
    assert "field 'mode'" in str(r.exception)


def test_guest_dying_mid_trace_ends_cleanly(spare: Guest) -> None:
    with QemuBackend.from_guest(spare) as backend:
        tracer = SyscallTracer(backend, "spare")

        def kill_once_tracing() -> None:
            # Kill QEMU once events flow (a fixed delay races the tracer's start-up under load).
            wait_for_events(tracer, 10)
            os.kill(spare.pid, 9)

        threading.Thread(target=kill_once_tracing, daemon=True).start()
        result = tracer.run(duration=90)
    assert result.reason.startswith("guest-gone"), result.reason
    assert result.events.num_rows == result.stats["events"] > 0


def test_call_site_mappings_match_proc_maps(guest: Guest, view: KernelView) -> None:
    from vims.collector.callsite import CallSites

    httpd = next(t for t in view.tasks() if t.comm == "httpd")
    vmas = CallSites(view).vmas(httpd.mm)
    maps = guest.run(f"cat /proc/{httpd.pid}/maps").splitlines()
    expected = []
    for line in maps:
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        name = fields[5].rsplit("/", 1)[-1] if len(fields) > 5 else "[anon]"
        expected.append((start, end, int(fields[2], 16) >> 12 if len(fields) > 5 else 0, name))
    ours = [(v.start, v.end, v.pgoff if v.file_backed else 0, v.name) for v in vmas]
    # /proc names the vsyscall page too, which is not a VMA of the process's tree
    assert ours == [e for e in expected if e[3] != "[vsyscall]"]
    text = next(v for v in vmas if v.name == "busybox")
    assert text.token(text.start + 0x10) == f"busybox+{(text.pgoff << 12) + 0x10:#x}"
