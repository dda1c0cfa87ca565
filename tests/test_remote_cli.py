"""``vims remote`` and ``vims avm init`` end to end: key files, enrolment, a real ``serve`` process."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import urllib.request

from typer.testing import CliRunner

from vims.cli import app
from vims.net import free_port
from vims.remote.keys import AvmIdentity, load_server_public
from vims.remote.simavm import SimulatedAvm
from vims.remote.testing import read_line, wait_until


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def run(*args: str, env: dict[str, str]) -> dict:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_init_enroll_serve_status_history(tmp_path):
    env = {"VIMS_REMOTE_HOME": str(tmp_path / "rems"), "VIMS_AVM_HOME": str(tmp_path / "avm")}
    rems = run("remote", "init", "--json", env=env)
    avm = run("avm", "init", "--id", "avm-a", "--json", env=env)
    for folder in ("rems", "avm"):
        for path in (tmp_path / folder).glob("*.json"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    port = free_port()
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"interval_s": 0.5, "deadline_s": 2.0, "threshold": 0.6}))
    enrolled = run("remote", "enroll", avm["public_key_file"], "--vm", "vm-a", "--gate-port", str(port),
                   "--policy", str(policy), "--json", env=env)
    assert enrolled == {"avm_id": "avm-a", "vm_id": "vm-a", "gate_port": port, "policy_version": 1}
    assert run("remote", "policy", "vm-a", "--json", env=env)["threshold"] == 0.6

    proc = subprocess.Popen(
        [sys.executable, "-m", "vims.cli", "remote", "serve", "--control", f"tcp://127.0.0.1:{free_port()}",
         "--demo-service", "--metrics-port", "0", "--seconds", "120", "--quiet", "--json"],
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["gates"] == {"vm-a": port} and info["curve_public"] == rems["curve_public"]
        ident = AvmIdentity.load(tmp_path / "avm" / "avm.secret.json")
        server_key = load_server_public(tmp_path / "rems" / "rems.public.json")
        with SimulatedAvm(ident, info["control"], server_key) as client:
            client.wait_policy(20)
            wait_until(lambda: client.session.accepted >= 1, what="an accepted report")
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
                conn.sendall(b"over the gate\n")
                assert read_line(conn) == b"data: over the gate\n"
        idle = f'vims_open_connections{{verifier="{info["verifier_id"]}"}} 0'
        wait_until(lambda: idle in _scrape(info["metrics"]), what="the relay to end")
        sim = run("remote", "simulate", "--control", info["control"], "--seconds", "1", "--json", env=env)
        assert sim["accepted"] >= 1 and sim["rejected"] == {}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    status = run("remote", "status", "--json", env=env)
    assert status["avms"][0]["last_decision"]["kind"] == "allow"
    assert status["totals"]["decisions"] == {"allow": 1}
    hist = run("remote", "history", "vm-a", "--json", env=env)
    assert hist["reports"] and all(r["status"] == "accepted" for r in hist["reports"])
    human = CliRunner().invoke(app, ["remote", "history", "vm-a"], env=env)
    assert human.exit_code == 0 and "allow" in human.stdout


def test_user_mistakes_are_one_line_errors(tmp_path):
    env = {**os.environ, "VIMS_REMOTE_HOME": str(tmp_path / "none")}
    proc = subprocess.run([sys.executable, "-m", "vims.cli", "remote", "status"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "vims remote init" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad.json").write_text("{")
    proc = subprocess.run([sys.executable, "-m", "vims.cli", "remote", "enroll", str(tmp_path / "bad.json"),
                           "--vm", "v", "--gate-port", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "bad.json" in proc.stderr and "Traceback" not in proc.stderr
