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
