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

Every decision (allow, deny, cut) is recorded with its reason and latency. :class:`GateMixin` is the
gate half of :class:`vims.remote.server.RemsServer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vims.errors import VimsError
from vims.remote.metrics import Metrics
from vims.remote.policy import one_line
from vims.remote.store import Store

if TYPE_CHECKING:
    from vims.remote.server import AvmState

log = logging.getLogger("vims.remote.server")


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


class GateMixin:
    """The gate's half of REM-S (state it shares with the control channel is declared here)."""

    store: Store
    metrics: Metrics
    service: tuple[str, int] | None
    gate_host: str
    avms: dict[str, AvmState]
    by_vm: dict[str, str]
    policies: dict[str, dict[str, Any]]
    waiters: dict[str, tuple[str, asyncio.Future[tuple[bool, str, int | None]]]]
    gates: dict[int, asyncio.Server]
    gate_vm: dict[int, str]
    open: dict[str, OpenConn]
    _conn_ids: itertools.count[int]

    def _send(self, st: AvmState, kind: str, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def _new_nonce(self, st: AvmState) -> str:
        raise NotImplementedError

    async def _open_gate(self, port: int, vm_id: str) -> None:
        if self.gate_vm.get(port) == vm_id:
            return
        old = self.gates.pop(port, None)
        if old is not None:
            old.close()
        try:
            server = await asyncio.start_server(functools.partial(self._gate_connection, vm_id),
                                                self.gate_host, port)
        except OSError as exc:
            raise VimsError(f"cannot listen on gate port {self.gate_host}:{port} for VM {vm_id}: {exc}") from None
        self.gates[port] = server
        self.gate_vm[port] = vm_id
        log.info("gate for VM %s on %s:%d", vm_id, self.gate_host, port)

    async def _check_deadlines(self) -> None:
        """Cut the open connections whose VM has no accepted report younger than its deadline."""
        now = time.monotonic()
        for conn in list(self.open.values()):
            avm_id = self.by_vm.get(conn.vm_id)
            st = self.avms.get(avm_id) if avm_id else None
            deadline = self.policies.get(conn.vm_id, {}).get("deadline_s", 0.0)
            if st is None:
                await self._cut(conn, "no A-VM enrolled for this VM")
            elif st.last_ok is None or now - st.last_ok > deadline:
                age = "never" if st.last_ok is None else f"{now - st.last_ok:.1f} s ago"
                await self._cut(conn, f"no fresh report within {deadline:g} s (last accepted {age})")

    async def _attest(self, vm_id: str) -> tuple[bool, str, int | None]:
        """Ask the VM's A-VM for a report on a fresh nonce and judge it."""
        avm_id = self.by_vm.get(vm_id)
        if avm_id is None:
            return False, f"no A-VM enrolled for VM {vm_id}", None
        st = self.avms[avm_id]
        if st.rid is None:
            return False, f"A-VM {avm_id} is not connected", None
        policy = self.policies[vm_id]
        if st.acked_version != policy["version"]:
            return False, f"A-VM {avm_id} has not acknowledged policy v{policy['version']}", None
        nonce = self._new_nonce(st)
        future: asyncio.Future[tuple[bool, str, int | None]] = asyncio.get_running_loop().create_future()
        self.waiters[nonce] = (avm_id, future)
        try:
            self._send(st, "nonce", {"nonce": nonce, "purpose": "connect"})
            return await asyncio.wait_for(future, policy["attest_timeout_s"])
        except TimeoutError:
            return False, f"no fresh report from A-VM {avm_id} within {policy['attest_timeout_s']:g} s", None
        finally:
            self.waiters.pop(nonce, None)

    async def _gate_connection(self, vm_id: str, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        t0 = time.monotonic()
        conn_id = f"{vm_id}#{next(self._conn_ids)}"
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            allowed, reason, seq = await self._attest(vm_id)
            service_rw = None
            if allowed and self.service is not None:
                try:
                    service_rw = await asyncio.wait_for(asyncio.open_connection(*self.service), 5.0)
                except (OSError, TimeoutError) as exc:
                    allowed, reason = False, f"protected service unavailable ({exc.__class__.__name__})"
                verdict = self._latest_verdict(vm_id)
                if allowed and verdict is not None and not verdict[0]:
                    # A failing report arrived while the service connection was being opened.
                    allowed, reason = False, verdict[1]
                if not allowed and service_rw is not None:
                    service_rw[1].close()
            latency = time.monotonic() - t0
            kind = "allow" if allowed else "deny"
            self.metrics.inc("vims_decisions_total", kind=kind)
            self.metrics.observe("vims_decision_latency_seconds", latency)
            self.store.record_decision(vm_id=vm_id, conn_id=conn_id, kind=kind, reason=reason, peer=peer,
                                       latency_s=latency, report_seq=seq)
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
            writer.close()

    def _latest_verdict(self, vm_id: str) -> tuple[bool, str] | None:
        avm_id = self.by_vm.get(vm_id)
        st = self.avms.get(avm_id) if avm_id else None
        return None if st is None else st.last_verdict

    async def _relay(self, conn_id: str, vm_id: str, peer: str, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, s_reader: asyncio.StreamReader,
                     s_writer: asyncio.StreamWriter) -> None:
        conn = OpenConn(conn_id, vm_id, peer, time.monotonic(), writer, s_writer)
        self.open[conn_id] = conn
        self.metrics.set("vims_open_connections", len(self.open))
        loop = asyncio.get_running_loop()
        conn.tasks = [loop.create_task(_pump(reader, s_writer)), loop.create_task(_pump(s_reader, writer))]
        try:
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in conn.tasks:
                task.cancel()
            s_writer.close()
            self.open.pop(conn_id, None)
            self.metrics.set("vims_open_connections", len(self.open))

    async def _cut(self, conn: OpenConn, reason: str, record: bool = True) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.open.pop(conn.conn_id, None)
        self.metrics.set("vims_open_connections", len(self.open))
        self.metrics.inc("vims_decisions_total", kind="cut")
        if record:
            self.store.record_decision(vm_id=conn.vm_id, conn_id=conn.conn_id, kind="cut", reason=one_line(reason),
                                       peer=conn.peer, latency_s=time.monotonic() - conn.opened)
        log.info("cut %s: %s", conn.conn_id, reason)
        with contextlib.suppress(Exception):
            conn.client.write(f"\nVIMS CUT {one_line(reason)}\n".encode())
        for task in conn.tasks:
            task.cancel()
        conn.service.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.client.drain(), 1.0)
        conn.client.close()

    async def _cut_vm(self, vm_id: str, reason: str) -> None:
        for conn in [c for c in self.open.values() if c.vm_id == vm_id]:
            await self._cut(conn, reason)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
        while True:
            data = await reader.read(65536)
            if not data:
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
