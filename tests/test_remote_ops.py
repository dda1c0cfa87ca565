"""REM-S's operations for fleets (issue 17), on SQLite and a real PostgreSQL (tests/postgres_fixture.py).

- ``vims remote status`` across verifiers: which verifier holds which A-VM, lease ages, the verifiers;
- bulk enrolment from a file (``vims remote enroll --from FILE``): all or nothing;
- history retention (``vims remote prune``, ``serve --keep-history``): old history goes, the latest
  verdict of every A-VM (what a gate decides from) stays;
- Prometheus metrics labelled with the verifier.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.postgres_fixture import postgres_server, postgres_url  # noqa: F401  (fixtures)
from vims.cli import app
from vims.remote.keys import AvmIdentity
from vims.remote.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh store is (its tables made), on each backend, as ``--store`` takes it."""
    where = str(tmp_path / "rems.sqlite") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    Store(where).close()
    return where


def cli(*args: str, home: Path, code: int = 0) -> str:
    """``vims ARGS`` in this process; its stdout (its output when ``code`` is an error)."""
    result = CliRunner().invoke(app, [*args, "--home", str(home)])
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 else result.output


def cli_process(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``vims ARGS`` in a process of its own with a wide terminal (for the human tables)."""
    return subprocess.run([sys.executable, "-m", "vims.cli", *args, "--home", str(home)],
                          env={**os.environ, "COLUMNS": "300"}, capture_output=True, text=True, timeout=120)


# -- vims remote status across verifiers ------------------------------------------------------------------


def test_status_shows_which_verifier_holds_which_avm_and_lease_ages(location, tmp_path):
    home = tmp_path / "home"
    with Store(location) as s:
        for i in range(5):
            s.enroll(AvmIdentity.generate(f"avm-{i}").public, f"vm-{i}", 41000 + i)
        assert s.heartbeat("alpha", 30.0, ["avm-0", "avm-1"], endpoint="tcp://a:5555") == {"avm-0", "avm-1"}
        assert s.heartbeat("beta", 30.0, ["avm-1", "avm-2"], endpoint="tcp://b:5556") == {"avm-2"}  # avm-1 is alpha's
        assert s.take_lease("avm-3", "gamma", -1.0)  # taken, and already expired
        s.heartbeat("gamma", 30.0, [], endpoint="tcp://c:5557")
        s.heartbeat("delta", 30.0, [], endpoint="tcp://d:5558")
        s.stop_verifier("delta")
        # alpha took avm-0 100 s ago; gamma has been silent for 100 s (its heartbeats stopped: killed).
        s._exec("UPDATE leases SET acquired_at = acquired_at - 100 WHERE avm_id = 'avm-0'")
        s._exec("UPDATE verifiers SET heartbeat_at = heartbeat_at - 100 WHERE verifier_id = 'gamma'")
    view = json.loads(cli("remote", "status", "--json", "--store", location, home=home))
    lease = {r["avm_id"]: r["lease"] for r in view["avms"]}
    assert {a: (lease[a] or {}).get("verifier_id") for a in lease} == {
        "avm-0": "alpha", "avm-1": "alpha", "avm-2": "beta", "avm-3": "gamma", "avm-4": None}
    assert lease["avm-0"]["endpoint"] == "tcp://a:5555" and lease["avm-2"]["endpoint"] == "tcp://b:5556"
    assert 100 <= lease["avm-0"]["age_s"] < 160 and 0 <= lease["avm-1"]["age_s"] < 60
    for avm in ("avm-0", "avm-1", "avm-2"):
        assert not lease[avm]["expired"] and 0 < lease[avm]["expires_in_s"] <= 30
    assert lease["avm-3"]["expired"] and lease["avm-3"]["expires_in_s"] < 0
    verifiers = {v["verifier_id"]: v for v in view["verifiers"]}
    assert {v: (r["state"], r["leases"]) for v, r in verifiers.items()} == {
        "alpha": ("live", 2), "beta": ("live", 1), "gamma": ("silent", 0), "delta": ("stopped", 0)}
    assert verifiers["gamma"]["heartbeat_s_ago"] >= 100 and verifiers["alpha"]["endpoint"] == "tcp://a:5555"

    human = cli_process("remote", "status", "--store", location, home=home)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    row = {avm: next(line for line in lines if f" {avm} " in line) for avm in lease}
    assert " alpha " in row["avm-0"] and re.search(r" 1\d\d\.\d s ", row["avm-0"])  # held for 100 s
    assert " beta " in row["avm-2"] and "gamma (expired)" in row["avm-3"]
    assert not any(v in row["avm-4"] for v in ("alpha", "beta", "gamma", "delta"))
    assert any(" gamma " in line and "silent" in line for line in lines)
    assert any(" delta " in line and "stopped" in line for line in lines)


# -- bulk enrolment from a file ---------------------------------------------------------------------------


def _line(avm: AvmIdentity, vm_id: str, port: int) -> dict:
    return {"avm_id": avm.avm_id, "vm_id": vm_id, "gate_port": port, "curve_public": avm.curve_public,
            "sign_public": avm.sign_public}


def _csv(rows: list[dict], header: tuple[str, ...] = ("vm_id", "avm_id", "gate_port", "sign_public",
                                                     "curve_public")) -> str:
    return "\n".join([",".join(header), *(",".join(str(r[h]) for h in header) for r in rows)]) + "\n"


def enrol_error(location: str, home: Path, path: Path, *extra: str) -> str:
    """The user error of ``vims remote enroll --from PATH`` (raised as the CLI's main turns it into one line)."""
    result = CliRunner().invoke(app, ["remote", "enroll", "--from", str(path), "--store", location,
                                      "--home", str(home), *extra])
    assert result.exit_code != 0 and result.exception is not None, result.output
    from vims.errors import VimsError

    assert isinstance(result.exception, VimsError), repr(result.exception)
    return str(result.exception)


def test_bulk_enrolment_from_json_lines_and_csv(location, tmp_path):
    home = tmp_path / "home"
    avms = [AvmIdentity.generate(f"avm-{i}") for i in range(6)]
    jsonl = tmp_path / "fleet.jsonl"
    first = {**_line(avms[0], "vm-0", 42000), "kind": "vims-avm-public"}  # an avm.public.json, plus vm and port
    jsonl.write_text("# the first three\n" + json.dumps(first) + "\n\n"
                     + "\n".join(json.dumps(_line(a, f"vm-{i}", 42000 + i)) for i, a in enumerate(avms[1:3], 1)) + "\n")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"threshold": 0.75}))
    done = json.loads(cli("remote", "enroll", "--from", str(jsonl), "--policy", str(policy), "--json",
                          "--store", location, home=home))
    assert [(r["avm_id"], r["vm_id"], r["gate_port"]) for r in done["enrolled"]] == [
        ("avm-0", "vm-0", 42000), ("avm-1", "vm-1", 42001), ("avm-2", "vm-2", 42002)]
    csv_file = tmp_path / "fleet.csv"
    csv_file.write_text(_csv([_line(a, f"vm-{i}", 42000 + i) for i, a in enumerate(avms[3:], 3)]))
    assert "enrolled 3 A-VMs" in cli("remote", "enroll", "--from", str(csv_file), "--store", location, home=home)
    with Store(location) as s:
        enrolled = {a["avm_id"]: a for a in s.avms()}
        assert sorted(enrolled) == [f"avm-{i}" for i in range(6)]
        for i, avm in enumerate(avms):
            row = enrolled[avm.avm_id]
            assert (row["vm_id"], row["gate_port"], row["curve_public"], row["sign_public"]) == (
                f"vm-{i}", 42000 + i, avm.curve_public, avm.sign_public)
        assert [s.policy(f"vm-{i}")["threshold"] for i in range(6)] == [0.75] * 3 + [s.policy("vm-3")["threshold"]] * 3
        assert s.policy("vm-3")["threshold"] != 0.75  # the CSV's VMs got the default policy


def test_a_malformed_line_enrols_nothing_and_is_named(location, tmp_path):
    home = tmp_path / "home"
    avms = [AvmIdentity.generate(f"avm-{i}") for i in range(4)]
    rows = [_line(a, f"vm-{i}", 43000 + i) for i, a in enumerate(avms)]
    path = tmp_path / "fleet.csv"
    cases = [
        ({**rows[2], "curve_public": "short"}, ":4: curve_public: not a Z85 CURVE key"),
        ({**rows[2], "sign_public": "ab" * 31}, ":4: sign_public: not a 32-byte hex key"),
        ({**rows[2], "gate_port": "70000"}, ":4: gate_port '70000' is not a TCP port"),
        ({**rows[2], "vm_id": "vm 2"}, ":4: not a valid VM id: 'vm 2'"),
        ({**rows[2], "vm_id": "vm-0"}, ":4: VM vm-0 is listed twice (also on line 2)"),
        ({**rows[2], "avm_id": "avm-1"}, ":4: A-VM avm-1 is listed twice (also on line 3)"),
    ]
    for bad, message in cases:
        path.write_text(_csv([rows[0], rows[1], bad, rows[3]]))
        assert enrol_error(location, home, path).startswith(f"{path}{message}"), bad
    path.write_text(_csv(rows[:2]) + "a,b\n")
    assert enrol_error(location, home, path) == f"{path}:4: 2 fields, the header has 5"
    path.write_text("avm_id,vm_id,port\n")
    assert enrol_error(location, home, path).startswith(f"{path}:1: a CSV enrolment file starts with the header")
    jsonl = tmp_path / "fleet.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:-1] + "\n")
    assert enrol_error(location, home, jsonl).startswith(f"{jsonl}:2: not a JSON object")
    jsonl.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "vm": "x"}) + "\n")
    assert enrol_error(location, home, jsonl).startswith(f"{jsonl}:2: unknown field 'vm'")
    with Store(location) as s:
        assert s.avms() == []

    # A line that conflicts with what the store holds: the lines before it are not kept either.
    with Store(location) as s:
        s.enroll(AvmIdentity.generate("old").public, "vm-old", 43003)
    path.write_text(_csv(rows))
    assert enrol_error(location, home, path) == f"{path}:5: gate port 43003 already belongs to VM vm-old"
    with Store(location) as s:
        assert [a["avm_id"] for a in s.avms()] == ["old"]

    # As a user sees it: one line, exit status 2, nothing enrolled.
    path.write_text(_csv([rows[0], {**rows[1], "curve_public": "x"}]))
    proc = cli_process("remote", "enroll", "--from", str(path), "--store", location, home=home)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"error: {path}:3: curve_public: not a Z85 CURVE key (40 characters)"]
    with Store(location) as s:
        assert [a["avm_id"] for a in s.avms()] == ["old"]


def test_enroll_takes_a_file_or_one_avm_not_both(tmp_path):
    home, path = tmp_path / "home", tmp_path / "fleet.csv"
    path.write_text(_csv([_line(AvmIdentity.generate("a"), "vm-a", 44000)]))
    for args in (["--from", str(path), "--vm", "v"], ["x.json"], []):
        result = CliRunner().invoke(app, ["remote", "enroll", *args, "--home", str(home)])
        assert result.exit_code != 0 and "--from" in str(result.exception), (args, result.output)


# -- history retention ------------------------------------------------------------------------------------

DAY = 86400.0


def _old_history(s: Store, now: float) -> None:
    """vm-a: every report and decision old (the latest verdict 35 days old); vm-b: old and recent rows."""
    s.enroll(AvmIdentity.generate("avm-a").public, "vm-a", 45001)
    s.enroll(AvmIdentity.generate("avm-b").public, "vm-b", 45002)
    reports = [("avm-a", "vm-a", 1, "accepted", 40), ("avm-a", "vm-a", None, "rejected", 39),
               ("avm-a", "vm-a", 2, "accepted", 35), ("avm-a", "vm-a", None, "rejected", 34),
               ("avm-b", "vm-b", 1, "accepted", 40), ("avm-b", "vm-b", 2, "accepted", 20),
               ("avm-b", "vm-b", None, "rejected", 19), ("avm-b", "vm-b", 3, "accepted", 1)]
    for avm, vm, seq, status, age in reports:
        s.record_report(avm_id=avm, vm_id=vm, seq=seq, status=status, reason=None if seq else "stale",
                        verdict="allow" if seq else None, digest=f"{avm}-{age}", document="{}",
                        received_at=now - age * DAY)
    for vm, age in (("vm-a", 40), ("vm-a", 35), ("vm-b", 20), ("vm-b", 1)):
        s.record_decision(vm_id=vm, conn_id=f"{vm}#{age}", kind="allow", reason="ok", at=now - age * DAY)


def _ages(s: Store, now: float) -> dict[str, list[tuple[str, int]]]:
    """What is left: each VM's reports (status, age in days) and decisions (age in days)."""
    out: dict[str, list[tuple[str, int]]] = {}
    for r in s._rows("SELECT vm_id, status, received_at FROM reports ORDER BY id"):
        out.setdefault(r["vm_id"], []).append((r["status"], round((now - r["received_at"]) / DAY)))
    for d in s._rows("SELECT vm_id, time FROM decisions ORDER BY id"):
        out.setdefault(d["vm_id"] + " decisions", []).append(("decision", round((now - d["time"]) / DAY)))
    return out


def test_prune_keeps_the_latest_verdicts_however_old(location):
    now = 1_800_000_000.0
    with Store(location) as s:
        _old_history(s, now)
        verdicts = {vm: s.latest_verdict(vm) for vm in ("vm-a", "vm-b")}
        status = {r["vm_id"]: (r["last_report"], r["last_decision"]) for r in s.status()}
        limits = {vm: (30.0, 1000) for vm in ("vm-a", "vm-b")}
        out = s.prune(limits, now=now)
        assert out == {"reports": 3, "decisions": 1, "documents": 0, "unattributed": 0, "verifiers": 0}
        assert _ages(s, now) == {
            "vm-a": [("accepted", 35), ("rejected", 34)],  # older than 30 days, but the latest of avm-a
            "vm-b": [("accepted", 20), ("rejected", 19), ("accepted", 1)],
            "vm-a decisions": [("decision", 35)], "vm-b decisions": [("decision", 20), ("decision", 1)]}
        # The operator's cap (serve --keep-history, prune --older-than) is shorter than the policy's.
        out = s.prune(limits, now=now, max_days=10.0)
        assert out["reports"] == 2 and out["decisions"] == 1
        assert _ages(s, now)["vm-b"] == [("accepted", 1)] and _ages(s, now)["vm-a"] == [("accepted", 35),
                                                                                          ("rejected", 34)]
        # Bounded: pruning again, even to nothing older than 0 days, deletes nothing more.
        assert s.prune(limits, now=now, max_days=0.0) == dict.fromkeys(out, 0)
        assert {vm: s.latest_verdict(vm) for vm in ("vm-a", "vm-b")} == verdicts
        assert {r["vm_id"]: (r["last_report"], r["last_decision"]) for r in s.status()} == status
        assert s.last_seq("avm-a") == 2 and s.last_seq("avm-b") == 3  # old reports stay unreplayable


def test_prune_forgets_old_verifiers_without_leases(location):
    with Store(location) as s:
        s.enroll(AvmIdentity.generate("avm-a").public, "vm-a", 45001)
        s.heartbeat("old", 10.0, [])
        s.heartbeat("holding", 10.0, ["avm-a"])
        s.heartbeat("recent", 10.0, [])
        s._exec("UPDATE verifiers SET heartbeat_at = heartbeat_at - 40 * 86400 WHERE verifier_id != 'recent'")
        s._exec("UPDATE leases SET expires_at = expires_at - 40 * 86400")  # long expired, still its row
        assert s.prune({}, max_days=30.0)["verifiers"] == 1
        assert [v["verifier_id"] for v in s.verifiers()] == ["holding", "recent"]


def test_vims_remote_prune_uses_each_vms_policy(location, tmp_path):
    home, now = tmp_path / "home", 1_800_000_000.0
    with Store(location) as s:
        _old_history(s, now)
        s.set_policy("vm-b", {"history_days": 10.0})
        # The rows' times are moved to now, so the command's clock applies.
        shift = time.time() - now
        s._exec("UPDATE reports SET received_at = received_at + ?", (shift,))
        s._exec("UPDATE decisions SET time = time + ?", (shift,))
    done = json.loads(cli("remote", "prune", "--json", "--store", location, home=home))
    assert done["pruned"]["reports"] == 5 and done["pruned"]["decisions"] == 2  # vm-a at 30 days, vm-b at 10
    assert "pruned 0 reports" in cli("remote", "prune", "--older-than", "5", "--store", location, home=home)
    with Store(location) as s:
        left = _ages(s, now + shift)
        assert left["vm-a"] == [("accepted", 35), ("rejected", 34)] and left["vm-b"] == [("accepted", 1)]


def test_serve_keep_history_caps_every_vms_retention(tmp_path):
    from vims.remote.testing import Deployment, wait_until

    d = Deployment(tmp_path, vms=1)
    with d.store() as s:
        for age in (20, 2):
            s.record_decision(vm_id="vm-1", conn_id=f"c{age}", kind="deny", reason="x", at=time.time() - age * DAY)
    d.start(prune_every_s=0.2, keep_history_days=5.0)
    try:
        def decisions() -> list[str]:
            with d.store() as s:
                return [r["conn_id"] for r in s._rows("SELECT conn_id FROM decisions ORDER BY id")]

        wait_until(lambda: decisions() == ["c2"], what="the 20-day-old decision pruned (the policy keeps 30)")
        assert d.metric("vims_history_pruned_total", what="decisions") == 1
    finally:
        d.stop()


# -- Prometheus metrics per verifier ----------------------------------------------------------------------


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition: (name, labels, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-z_]+)(?:\{(.*)\})? (\S+)', line)
        assert m, line
        labels = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def test_every_series_on_the_metrics_endpoint_names_its_verifier(tmp_path):
    from vims.remote.simavm import SimulatedAvm
    from vims.remote.testing import Deployment, read_line, wait_until

    d = Deployment(tmp_path, vms=2, policy={"interval_s": 0.3, "deadline_s": 1.5, "attest_timeout_s": 5.0})
    d.start(verifier_id="ver-7", lease_s=3.0)
    try:
        with SimulatedAvm(d.avms["vm-1"], d.endpoint, d.keys.public) as avm:
            avm.wait_policy(20)
            wait_until(lambda: avm.session.accepted >= 1, what="an accepted report")
            with d.connect("vm-1") as client:
                client.sendall(b"hello\n")
                assert read_line(client) == b"data: hello\n"
            wait_until(lambda: d.metric("vims_leases_held") == 1, what="a heartbeat holding avm-1's lease")
            samples = _samples(d.scrape())
    finally:
        d.stop()
    assert samples and all(labels.get("verifier") == "ver-7" for _, labels, _ in samples), [
        s for s in samples if s[1].get("verifier") != "ver-7"]
    value = {(name, tuple(sorted((k, v) for k, v in labels.items() if k != "verifier"))): v
             for name, labels, v in samples}
    assert value[("vims_reports_accepted_total", (("vm", "vm-1"),))] >= 1
    assert value[("vims_decisions_total", (("kind", "allow"),))] == 1
    assert value[("vims_leases_held", ())] == 1
    assert value[("vims_decision_latency_seconds_count", ())] == 1
    assert value[("vims_decision_latency_seconds_bucket", (("le", "+Inf"),))] == 1
    assert value[("vims_gate_listening", (("vm", "vm-2"),))] == 1
