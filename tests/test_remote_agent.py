"""The real A-VM agent (:mod:`vims.avm.agent`) talking to REM-S through :class:`AvmClient`."""

from __future__ import annotations

import threading
import time

import numpy as np

from vims.avm import agent as agent_mod
from vims.avm.remote_sink import RemoteSink
from vims.models import stide
from vims.models.persist import save_model
from vims.remote.client import AvmClient
from vims.remote.testing import Deployment, read_line, wait_until


def test_agent_reports_are_accepted_and_let_its_client_through(tmp_path, live_collector):
    rng = np.random.default_rng(0)
    traces = [list(rng.integers(0, 10, 200)) for _ in range(20)]
    detector = stide.Stide(k=4).fit(traces)
    dep = Deployment(tmp_path, vms=1, policy={"interval_s": 0.5, "deadline_s": 3.0, "attest_timeout_s": 10.0})
    dep.start()
    client = AvmClient(dep.avms["vm-1"], dep.endpoint, dep.keys.public, capabilities={"checks": []})
    stop = threading.Event()
    try:
        save_model(detector, tmp_path / "model.skops")  # REM-S accepts reports that name their model file
        with agent_mod.Agent(tmp_path / "model.skops", vm_id="vm-1", avm_id="avm-1", workers=1,
                             interval_s=0.5) as agent, \
                live_collector(agent, traces):
            RemoteSink(agent, client)  # stamps, signs and sends every report
            client.start()

            def every_interval() -> None:
                while not stop.is_set():
                    agent.report()
                    time.sleep(0.5)

            thread = threading.Thread(target=every_interval, daemon=True)
            thread.start()
            wait_until(lambda: client.session.accepted >= 2, what="the agent's reports to be accepted")
            conn = dep.connect("vm-1")
            conn.sendall(b"hello\n")
            assert read_line(conn) == b"data: hello\n"
            conn.close()
            stop.set()
            thread.join(10)
    finally:
        stop.set()
        client.stop()
        dep.stop()
    counts = dep.store().counts()
    assert counts["decisions"].get("allow") == 1 and set(counts["reports"]) == {"accepted"}
