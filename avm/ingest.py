"""The agent's source for a collector in another process (``vims collect --push``): a PULL socket whose
``event`` batches go to the pipeline and whose ``check`` batches go to the report."""

from __future__ import annotations

import threading
import time
from typing import Any

from vims.avm.agent import Agent
from vims.avm.health import liveness


def ingest(agent: Agent, endpoint: str, stop: threading.Event, secret_key: str | None = None,
           allowed_keys: list[str] | None = None) -> dict[str, Any]:
    """Receive a remote collector's batches at ``endpoint`` until ``stop``; returns the receiver's counts.

    ``event`` batches go to the pipeline, ``check`` batches to the report. Sets the agent's collector
    health to the receiver's view (senders, gaps, the senders' own drops and those of their sources, such
    as the plugin tracer's full rings, whether batches still come).
    A message that cannot be read or used is counted in ``bad`` by reason, never fatal.

    Parameters
    ----------
    agent : Agent
        Where the batches go.
    endpoint : str
        ZeroMQ endpoint to bind.
    stop : threading.Event
        Ends the loop.
    secret_key : str, optional
        The A-VM's CURVE secret key (Z85): only senders that know its public key connect.
    allowed_keys : list of str, optional
        CURVE public keys of the collectors allowed to send (needs ``secret_key``).
    """
    from vims.collector.stream import BatchReceiver

    rx = BatchReceiver(endpoint, secret_key=secret_key, allowed_keys=allowed_keys)
    state: dict[str, Any] = {"state": "listening", "endpoint": rx.endpoint, "batches": 0, "bad": {},
                             "authenticated": secret_key is not None}
    last: list[float] = []

    def health() -> dict[str, Any]:
        senders = rx.stats()
        return {**state, "senders": senders, "gaps": rx.gaps, "rejected": rx.rejected,
                "dropped": sum(s["dropped_rows"] + s["source_dropped"] for s in senders.values()),
                "source_dropped": sum(s["source_dropped"] for s in senders.values()),
                **liveness(not stop.is_set(), last, agent.interval_s)}

    agent.collector_health = health
    try:
        while not stop.is_set():
            _receive_one(agent, rx, state, last)
    finally:
        rx.close()
        state["state"] = "stopped"
    return health()


def _receive_one(agent: Agent, rx: Any, state: dict[str, Any], last: list[float]) -> None:
    """Take one message (or time out) into the agent; a bad one is counted by reason, not raised."""
    try:
        msg = rx.recv(timeout=0.1)
    except Exception as exc:  # a header the receiver cannot take (e.g. "seq": 1e400): refuse it and go on
        _count_bad(state, f"unreadable: {type(exc).__name__}")
        return
    if msg is None:
        return
    try:
        if msg.kind == "check":
            agent.set_checks(msg.batch)
        else:
            agent.send(msg.batch)
    except Exception as exc:  # a batch of the wrong shape: refuse it and go on
        _count_bad(state, f"unusable {msg.kind or 'event'} batch: {type(exc).__name__}")
        return
    last[:] = [time.monotonic()]
    state["batches"] += 1
    state["state"] = "receiving"


def _count_bad(state: dict[str, Any], reason: str) -> None:
    state["bad"][reason] = state["bad"].get(reason, 0) + 1
