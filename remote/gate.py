"""The connection gate: one loopback TCP listener per VM in front of the protected service.

A connection that arrives on a VM's gate port (fixed at enrolment; for the bundled guest, the loopback
port QEMU connects its serial line to, ``-chardev socket,host=127.0.0.1,port=GATE,reconnect=1``) comes
from that VM, whatever it says. Each accepted TCP connection is one attempt:

1. REM-S sends the VM's A-VM a fresh nonce and waits up to the policy's ``attest_timeout_s`` for an
   accepted report carrying it (a refused report carrying it ends the wait at once);
2. it decides with :func:`vims.remote.policy.evaluate` (every check passes, score >= threshold);
3. allowed: bytes are relayed both ways to the protected service (nothing is added to the stream);
   refused: the client reads one line ``VIMS DENY <reason>`` and the connection closes;
4. while open, the connection is cut (the client reads ``VIMS CUT <reason>``, then EOF) as soon as an
   accepted report of its VM fails the policy, the A-VM is revoked, or no report was accepted for the
   policy's ``deadline_s``: REM-S fails closed.

Every decision (allow, deny, cut) is recorded with its reason and latency, by the history writer
(:mod:`vims.remote.history`), never on the event loop. A cut closes the sockets first and records after;
cuts run concurrently (each drains its client for at most a second, in a task of its own). An allow is
recorded before the first byte is relayed: when it cannot be, the connection is refused, and while the
history cannot be written every new connection is refused. :class:`Gate` is composed by
:class:`vims.remote.server.RemsServer`, which gives it the decision (``attest``) and the latest verdict.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vims.errors import VimsError
from vims.remote.history import HistoryWriter
from vims.remote.metrics import Metrics
from vims.remote.policy import one_line

log = logging.getLogger("vims.remote.server")

#: How long a connection waits for its decision to be recorded before it is refused.
RECORD_WAIT_S = 2.0

Attest = Callable[[str], Awaitable[tuple[bool, str, int | None]]]
Verdict = Callable[[str], tuple[bool, str] | None]


@dataclass
class OpenConn:
    conn_id: str
    vm_id: str
    peer: str
    opened: float
    client: asyncio.StreamWriter
    service: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False


class Gate:
    """The gate's listeners and open connections.

    Parameters
    ----------
    history : HistoryWriter
        Where decisions are recorded.
    metrics : Metrics
        REM-S's counters.
    attest : callable
        ``await attest(vm_id) -> (allowed, reason, report_seq)``: the decision on a new connection.
    verdict : callable
        ``verdict(vm_id) -> (allowed, reason) or None``: the verdict on the VM's latest accepted report.
    service : tuple of (str, int), optional
        The protected service (None: allowed connections get one ``VIMS ALLOW`` line).
    host : str
        Where the gates listen.
    max_connections : int
        The most connections one VM may have at once, waiting for their decision or relayed; one more
        is refused (``VIMS DENY``, counted as ``vims_gate_refused_total{reason="busy"}``), so no VM can
        exhaust REM-S's sockets and tasks for the others.
    """

    def __init__(self, history: HistoryWriter, metrics: Metrics, attest: Attest, verdict: Verdict,
                 service: tuple[str, int] | None = None, host: str = "127.0.0.1",
                 max_connections: int = 256) -> None:
        self.history = history
        self.metrics = metrics
        self.attest = attest
        self.verdict = verdict
        self.service = service
        self.host = host
        self.servers: dict[int, asyncio.Server] = {}
        self.port_vm: dict[int, str] = {}
        self.open: dict[str, OpenConn] = {}
        self.max_connections = max_connections
        self.active: collections.Counter[str] = collections.Counter()  # vm_id -> connections being served
        self._conn_ids = itertools.count(1)
        self._closers: set[asyncio.Task[None]] = set()

    def ports(self) -> dict[str, int]:
        """vm_id -> the port its gate listens on."""
        return {vm: port for port, vm in self.port_vm.items()}

    async def listen(self, port: int, vm_id: str) -> None:
        """Listen on ``port`` for ``vm_id`` (no-op when it already does)."""
        if self.port_vm.get(port) == vm_id:
            return
        old = self.servers.pop(port, None)
        if old is not None:
            old.close()
        try:
            server = await asyncio.start_server(functools.partial(self._connection, vm_id), self.host, port)
        except OSError as exc:
            raise VimsError(f"cannot listen on gate port {self.host}:{port} for VM {vm_id}: {exc}") from None
        self.servers[port] = server
        self.port_vm[port] = vm_id
        log.info("gate for VM %s on %s:%d", vm_id, self.host, port)

    def unlisten(self, vm_id: str) -> None:
        """Stop listening for ``vm_id`` (its A-VM's lease went to another verifier); open ones stay."""
        for port in [p for p, vm in self.port_vm.items() if vm == vm_id]:
            server = self.servers.pop(port, None)
            if server is not None:
                server.close()
            self.port_vm.pop(port, None)
            log.info("gate for VM %s on port %d closed (another verifier holds its A-VM)", vm_id, port)

    async def close(self, reason: str) -> None:
        """Cut every open connection, stop listening, wait (briefly) for the cut clients to drain."""
        for conn in list(self.open.values()):
            self.cut(conn, reason)
        for server in self.servers.values():
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        if self._closers:
            await asyncio.wait(list(self._closers), timeout=2.0)

    async def _record(self, *, retry: bool, **kwargs: object) -> bool:
        """Record a decision; True once written (waits at most :data:`RECORD_WAIT_S`)."""
        future = self.history.submit("record_decision", retry=retry, **kwargs)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), RECORD_WAIT_S)
        except Exception:
            return False
        return True

    async def _decide(self, vm_id: str) -> tuple[bool, str, int | None, tuple[asyncio.StreamReader,
                                                                              asyncio.StreamWriter] | None]:
        trouble = self.history.trouble()
        if trouble is not None:
            return False, one_line(f"history cannot be written ({trouble})"), None, None
        allowed, reason, seq = await self.attest(vm_id)
        service_rw = None
        if allowed and self.service is not None:
            try:
                service_rw = await asyncio.wait_for(asyncio.open_connection(*self.service), 5.0)
            except (OSError, TimeoutError) as exc:
                allowed, reason = False, f"protected service unavailable ({exc.__class__.__name__})"
            verdict = self.verdict(vm_id)
            if allowed and verdict is not None and not verdict[0]:
                # A failing report arrived while the service connection was being opened.
                allowed, reason = False, verdict[1]
            if not allowed and service_rw is not None:
                service_rw[1].close()
                service_rw = None
        return allowed, reason, seq, service_rw

    async def _connection(self, vm_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = time.monotonic()
        conn_id = f"{vm_id}#{next(self._conn_ids)}"
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        self.active[vm_id] += 1
        try:
            if self.active[vm_id] > self.max_connections:
                self.metrics.inc("vims_gate_refused_total", reason="busy")
                allowed, reason, seq, service_rw = False, (f"too many connections from VM {vm_id} "
                                                           f"(limit {self.max_connections})"), None, None
            else:
                allowed, reason, seq, service_rw = await self._decide(vm_id)
            latency = time.monotonic() - t0
            record = {"vm_id": vm_id, "conn_id": conn_id, "reason": reason, "peer": peer, "latency_s": latency,
                      "report_seq": seq, "at": time.time()}
            # An allow that cannot be recorded is not given: fail closed.
            if allowed and not await self._record(retry=False, kind="allow", **record):
                if service_rw is not None:
                    service_rw[1].close()
                    service_rw = None
                allowed = False
                reason = one_line(f"history cannot be written ({self.history.trouble() or 'allow not recorded'})")
                record["reason"] = reason
            kind = "allow" if allowed else "deny"
            if not allowed:
                await self._record(retry=True, kind="deny", **record)
            self.metrics.inc("vims_decisions_total", kind=kind)
            self.metrics.observe("vims_decision_latency_seconds", latency)
            log.info("%s %s: %s", kind, conn_id, reason)
            if not allowed or service_rw is None:
                await _last_word(reader, writer, f"VIMS {'ALLOW' if allowed else 'DENY'} {reason}\n")
                return
            await self._relay(conn_id, vm_id, peer, reader, writer, *service_rw)
        except (ConnectionError, OSError):
            pass
        except Exception:
            log.exception("gate connection %s", conn_id)
        finally:
            self.active[vm_id] -= 1
            writer.close()

    async def _relay(self, conn_id: str, vm_id: str, peer: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, s_reader: asyncio.StreamReader,
                     s_writer: asyncio.StreamWriter) -> None:
        conn = OpenConn(conn_id, vm_id, peer, time.monotonic(), writer, s_writer)
        self.open[conn_id] = conn
        self.metrics.set("vims_open_connections", len(self.open))
        loop = asyncio.get_running_loop()
        conn.tasks = [loop.create_task(_pump(reader, s_writer)), loop.create_task(_pump(s_reader, writer))]
        try:
            # Both directions end: a side that half-closes still gets the other side's answer.
            await asyncio.wait(conn.tasks, return_when=asyncio.ALL_COMPLETED)
        finally:
            for task in conn.tasks:
                task.cancel()
            s_writer.close()
            if not conn.closed:
                self.open.pop(conn_id, None)
                self.metrics.set("vims_open_connections", len(self.open))

    def cut(self, conn: OpenConn, reason: str) -> None:
        """Cut ``conn`` now: stop relaying and close both sides first, then record the cut (never blocks)."""
        if conn.closed:
            return
        conn.closed = True
        at = time.time()
        line = one_line(reason)
        for task in conn.tasks:
            task.cancel()
        conn.service.close()
        with contextlib.suppress(Exception):
            conn.client.write(f"\nVIMS CUT {line}\n".encode())
        if conn.client.can_write_eof():
            with contextlib.suppress(Exception):
                conn.client.write_eof()
        self.open.pop(conn.conn_id, None)
        self.metrics.set("vims_open_connections", len(self.open))
        self.metrics.inc("vims_decisions_total", kind="cut")
        log.info("cut %s: %s", conn.conn_id, reason)
        # Drain the client's last line in the background: one slow client delays no other cut.
        task = asyncio.get_running_loop().create_task(_close_after_drain(conn.client))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)
        self.history.submit("record_decision", vm_id=conn.vm_id, conn_id=conn.conn_id, kind="cut", reason=line,
                            peer=conn.peer, latency_s=time.monotonic() - conn.opened, at=at)

    def cut_vm(self, vm_id: str, reason: str) -> None:
        """Cut every open connection of ``vm_id``."""
        for conn in [c for c in self.open.values() if c.vm_id == vm_id]:
            self.cut(conn, reason)


async def _close_after_drain(writer: asyncio.StreamWriter, timeout: float = 1.0) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), timeout)
    writer.close()

async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the half-close on (the other direction keeps flowing)."""
    with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
        while True:
            data = await reader.read(65536)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                break
            writer.write(data)
            await writer.drain()


async def _last_word(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str) -> None:
    """Write ``line`` and close so that the client can read it.

    Closing a socket with unread input makes the kernel send a reset, which can destroy the line before
    the client reads it: half-close first, then read (and drop) what the client sent, for a second at most.
    """
    with contextlib.suppress(Exception):
        writer.write(line.encode())
        await asyncio.wait_for(writer.drain(), 2.0)
        if writer.can_write_eof():
            writer.write_eof()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            data = await asyncio.wait_for(reader.read(65536), max(0.01, end - time.monotonic()))
            if not data:
                break
