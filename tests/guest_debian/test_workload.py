"""The small-server workload on the Debian guest, and its client reaching the gate over TCP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vims.collector.guest import Guest
from vims.collector.guest.debian import CRON_JOBS
from vims.collector.guest.qemu import GATE_GUEST_ADDRESS
from vims.collector.guest.workload import KINDS, Action, Workload, plan
from vims.errors import InputError, VimsError


@contextlib.contextmanager
def gate_listener(port: int) -> Iterator[list[bytes]]:
    """A TCP server on 127.0.0.1:``port`` standing in for REM-S's gate: answers ``data: LINE``, then closes."""
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(30)
                line = conn.makefile("rb").readline()
                seen.append(line)
                conn.sendall(b"data: " + line)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        server.close()


def test_the_same_seed_gives_the_same_plan() -> None:
    first = plan(seed=5, rate=2.0, duration=30.0)
    assert first == plan(seed=5, rate=2.0, duration=30.0)
    assert first != plan(seed=6, rate=2.0, duration=30.0)
    assert {a.kind for a in first[: len(KINDS)]} == set(KINDS)  # the first round holds every kind
    assert all(isinstance(a, Action) and 0 <= a.at < 30.0 for a in first)
    assert [a.at for a in first] == sorted(a.at for a in first)


def test_every_kind_runs_without_failure_in_plan_order(debian: Guest) -> None:
    workload = Workload(debian, seed=0, rate=2.0)
    duration = workload.plan(60.0)[len(KINDS)].at  # just the first round: every kind once
    with gate_listener(debian.gate_address[1]) as seen:
        result = workload.run(duration)
    assert [r.error for r in result.failures()] == []
    assert all(count["ok"] >= 1 for count in result.counts().values()), result.counts()
    assert [r.action for r in result.results] == workload.plan(duration)
    gate_runs = [r for r in result.results if r.action.kind == "gate-client"]
    assert [r.outcome for r in gate_runs] == [f"data: {r.action.detail[0]}" for r in gate_runs]
    assert len(seen) == len(gate_runs)
    summary = result.as_dict()
    assert summary["failed"] == 0 and summary["actions"] == len(result.results)


def test_the_guests_client_reaches_the_gate_port_through_guestfwd(debian: Guest) -> None:
    host, port = GATE_GUEST_ADDRESS
    assert debian.status()["gate"] == {"guest": [host, port], "host_port": debian.gate_address[1]}
    with gate_listener(debian.gate_address[1]) as seen:
        reply = debian.run(f"printf 'ping 42\\nquit\\n' | nc -w 10 {host} {port}", check=True)
    assert seen == [b"ping 42\n"]
    assert reply.strip() == "data: ping 42"


def test_an_unanswered_gate_connection_is_a_failure_with_its_reason(debian: Guest) -> None:
    workload = Workload(debian, seed=0, rate=1.0)
    with pytest.raises(VimsError, match="unanswered"):  # nothing listens on the gate port now
        workload.perform(Action(0.0, "gate-client", ("HELLO alone",)))


def test_the_image_runs_its_cron_jobs_by_itself(debian: Guest) -> None:
    assert debian.run("systemctl is-enabled logrotate.timer cron").split() == ["enabled", "enabled"]
    assert set(CRON_JOBS) <= set(debian.run("cat /etc/cron.d/vims-site", check=True).replace("/", " ").split())
    for _ in range(60):  # cron starts the per-minute jobs at the next minute after boot
        log = debian.run("journalctl -u cron --no-pager -o cat | grep -F ' CMD '")
        if "site-health" in log and "site-report" in log:
            break
        time.sleep(2)
    assert "(root) CMD (/usr/local/bin/site-health)" in log
    assert "(www-data) CMD (/usr/local/bin/site-report)" in log
    assert "status.php 200" in debian.run("cat /var/log/vims-site/health.log /var/log/vims-site/health.log.1")


def test_bad_knobs_are_one_line_errors(debian: Guest) -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="rate"):
            Workload(debian, rate=bad)
    with pytest.raises(InputError, match="duration"):
        Workload(debian).plan(0)


def _vims(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VIMS_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "vims.cli", "guest", "workload", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--name", "no-such-guest"], "no guest named 'no-such-guest'"), (["--rate", "0"], "rate 0"),
     (["--rate", "-2", "--name", "no-such-guest"], "rate -2"), (["--duration", "0"], "duration 0")],
)  # fmt: skip
def test_the_cli_says_what_is_wrong_in_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    proc = _vims(*args, cache=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
