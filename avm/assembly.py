"""One A-VM, assembled: the agent, its REM-S client, one source thread and the reporting loop.

``vims avm run`` and ``vims demo`` both build their A-VM with :class:`AvmRun`, so there is one way to
wire an agent to its sources and to REM-S, and one order to take it down in.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vims.avm.agent import Agent
from vims.avm.remote_sink import RemoteSink


class AvmRun:
    """An :class:`~vims.avm.agent.Agent` with its sinks, an optional REM-S client and its source.

    Parameters
    ----------
    agent : Agent
        The agent (not started yet).
    client : vims.remote.client.AvmClient, optional
        Reports go to REM-S through it: a :class:`~vims.avm.remote_sink.RemoteSink` becomes the agent's
        stamp, so the sinks get the documents REM-S got.
    sinks : list of callable
        More places every report goes (printer, file, the demo's timeline).
    """

    def __init__(self, agent: Agent, client: Any = None,
                 sinks: Sequence[Callable[[dict[str, Any]], None]] = ()) -> None:
        self.agent = agent
        self.client = client
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        #: What ended a source or the reporting loop (raised again by :meth:`raise_failure`).
        self.failure: list[BaseException] = []
        agent.sinks.extend(sinks)
        if client is not None:
            RemoteSink(agent, client)  # the agent's stamp from now on

    def start(self, wait_policy: float | None = None) -> dict[str, Any] | None:
        """Start the scorer workers and the REM-S client; with ``wait_policy`` s, return REM-S's policy."""
        self.agent.start()
        if self.client is None:
            return None
        self.client.start()  # idempotent
        return self.client.wait_policy(timeout=wait_policy) if wait_policy is not None else None

    def _spawn(self, name: str, target: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        def guarded() -> None:
            try:
                target(*args, **kwargs)
            except BaseException as exc:  # raised again in the caller's thread: one red line for the user
                self.failure.append(exc)
                self.stop.set()

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def trace(self, guest: Any, policy: Any = None, vm_id: str | None = None, checks_every: float | None = 10.0,
              **kwargs: Any) -> None:
        """Trace ``guest`` into the agent in a thread (:func:`~vims.avm.guest_source.trace_guest`)."""
        from vims.avm.guest_source import trace_guest

        self._spawn("vims-tracer", trace_guest, self.agent, guest, self.stop, policy, vm_id, checks_every, **kwargs)

    def pull(self, endpoint: str, secret_key: str | None = None, allowed_keys: list[str] | None = None) -> None:
        """Receive a remote collector's batches at ``endpoint`` in a thread (:func:`~vims.avm.ingest.ingest`)."""
        from vims.avm.ingest import ingest

        self._spawn("vims-ingest", ingest, self.agent, endpoint, self.stop, secret_key, allowed_keys)

    def report_in_background(self) -> None:
        """Run the reporting loop in a thread (the demo drives the story in its own)."""
        self._spawn("vims-reports", self.agent.run, stop=self.stop)

    def run(self, duration: float | None = None) -> None:
        """Run the reporting loop here until ``duration`` s pass, a source fails or Ctrl-C."""
        with contextlib.suppress(KeyboardInterrupt):
            self.agent.run(duration, self.stop)

    def close(self, join_s: float = 30.0) -> None:
        """Stop the sources, then the client, then the workers (in that order)."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=join_s)
        if self.client is not None:
            self.client.stop()
        self.agent.close()

    def raise_failure(self) -> None:
        """Raise what ended a source, if anything did."""
        if self.failure:
            raise self.failure[0]
