"""REM-S: the control channel to the A-VMs, the connection gate and the metrics endpoint, in one loop.

One asyncio event loop serves everything:

- a ZeroMQ ROUTER (CURVE server) for the A-VMs, with its own ZAP handler that admits only the CURVE keys
  of enrolled, unrevoked A-VMs (refusals are counted and recorded as ``unenrolled``);
- one TCP listener per enrolled VM on loopback, the gate (:mod:`vims.remote.gate`): a connection is let
  through to the protected service only on a fresh, valid, passing report, and cut when reports stop
  or fail;
- the Prometheus endpoint (:mod:`vims.remote.metrics`);
- a watcher of the database: policies set and A-VMs enrolled or revoked with the CLI while the server
  runs take effect at once (a new policy is pushed to the A-VM). Over PostgreSQL it listens for the
  store's notifications (:meth:`vims.remote.store.Store.notifications`, on a thread of its own): a change
  of enrolments or policies, and a lease of one of its A-VMs taken by another verifier, which it cuts at
  once; it reads ``data_version`` every half second only while it cannot listen (and over SQLite);
- a heartbeat (every third of ``lease_s``) that keeps this verifier's leases on the A-VMs talking to it
  (:meth:`vims.remote.store.Store.heartbeat`), so that several verifier processes can share one store.

Several verifiers over one store: an A-VM's report is accepted only by the verifier holding its lease,
which it takes (atomically, in the store) when the lease is free or expired; the report is recorded in the
same transaction that renews the lease, and only when its sequence number is newer than every report
accepted of that A-VM by any verifier. A gate listens at the verifier holding its A-VM's lease (or, while
no verifier holds it, at every verifier that can bind its port), and allows a connection only when the
latest accepted report of its VM in the store, whoever accepted it, is the fresh one this verifier just
accepted, passes the policy, and the lease is still this verifier's. A verifier that dies stops renewing:
its leases expire after ``lease_s`` and the A-VMs that moved to another verifier are taken over there.

Nothing a peer sends stops the server: every message is handled inside a guard that records it as
rejected (``malformed`` at worst) and carries on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from zmq.utils import z85

from vims.errors import VimsError
from vims.remote.gate import RECORD_WAIT_S, Gate
from vims.remote.history import MAX_GROUP, HistoryWriter
from vims.remote.keys import ServerKeys, verify_key
from vims.remote.metrics import Metrics
from vims.remote.policy import evaluate, one_line, retention
from vims.remote.protocol import (
    MAX_MESSAGE,
    SERVER_ID,
    ProtocolError,
    canonical,
    check_report,
    digest,
    envelope,
    parse_envelope,
    verify_report,
)
from vims.remote.store import MAX_UNATTRIBUTED, Store, StoreError

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
NONCES_KEPT = 256
#: Refusals of unknown keys recorded per second at most, over all keys (the rest counted and summed up).
UNATTRIBUTED_PER_S = 5


@dataclass
class AvmState:
    """What REM-S knows about one enrolled A-VM while it runs."""

    avm_id: str
    vm_id: str
    curve_public: str
    verify: Ed25519PublicKey
    gate_port: int
    revoked: bool
    last_seq: int
    acked_version: int | None
    rid: bytes | None = None  # ZeroMQ routing id of its current connection
    out_seq: int = 0
    in_seq: int = 0
    nonces: collections.OrderedDict[str, float] = field(default_factory=collections.OrderedDict)  # unanswered
    used_nonces: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)
    last_ok: float | None = None  # monotonic time of the last accepted report
    last_verdict: tuple[bool, str] | None = None
    heard: float | None = None  # monotonic time of its last message to this verifier


class RemsServer:
    """REM-S.

    Parameters
    ----------
    store : Store
        The history (also the source of enrolments and policies).
    keys : ServerKeys
        REM-S's CURVE keypair.
    control : str
        ZeroMQ endpoint the ROUTER binds (``tcp://127.0.0.1:0`` picks a free port).
    service : tuple of (str, int), optional
        The protected service allowed connections are relayed to. Without one, allowed connections
        get one line ``VIMS ALLOW <reason>`` and are closed (useful to probe a decision).
    gate_host : str
        Where the gates listen (loopback by default: QEMU connects the guest's serial line there).
    metrics_port : int or None
        Port of the Prometheus endpoint on loopback (0: any free port; None: no endpoint).
    poll_s : float
        How often open connections are checked against the deadline and the database for changes.
    prune_every_s : float
        How often the history is pruned to each VM's retention (policy ``history_days``,
        ``history_documents``) and the rows of refused keys capped at ``max_unattributed``.
    max_unattributed : int
        The most rows kept that name no VM (refusals of unknown or revoked keys). Such refusals are
        also recorded at most :data:`UNATTRIBUTED_PER_S` a second in all (one per key per second); the
        rest are counted (``vims_reports_rejected_total``) and summed up in the next recorded one.
    max_connections_per_vm : int
        The most gate connections one VM may have at once (deciding or relayed); more are refused.
    verifier_id : str, optional
        This verifier's name among those sharing the store (default: host, pid and a random tag).
    lease_s : float
        The lease period: a verifier holds an A-VM for this long after its last renewal (a heartbeat
        every third of it, or an accepted report). A killed verifier's A-VMs are taken over by another
        one within about this much after they move to it.
    keep_history_days : float, optional
        The operator's cap on every VM's retention: history older than this many days is pruned even
        when a VM's policy keeps it longer (never the latest verdicts a gate decides from).
    write_group : int
        The most accepted reports that queue up together written in one transaction (1: one each).
    """

    def __init__(self, store: Store, keys: ServerKeys, control: str = "tcp://127.0.0.1:0",
                 service: tuple[str, int] | None = None, gate_host: str = "127.0.0.1",
                 metrics_port: int | None = 0, poll_s: float = 0.1, prune_every_s: float = 60.0,
                 max_unattributed: int = MAX_UNATTRIBUTED, max_connections_per_vm: int = 256,
                 verifier_id: str | None = None, lease_s: float = 10.0,
                 keep_history_days: float | None = None, write_group: int = MAX_GROUP) -> None:
        if not lease_s > 0:
            raise VimsError(f"lease period {lease_s} s: give a positive number of seconds")
        self.store = store
        self.verifier_id = verifier_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.lease_s = float(lease_s)
        self.leased: set[str] = set()  # A-VMs whose lease this verifier held at its last heartbeat/report
        self.foreign: set[str] = set()  # A-VMs leased (unexpired) by other verifiers
        self.peers: list[str] = []  # control endpoints of the live verifiers (given to A-VMs)
        self._lease_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rem-s-lease")
        self._lease_store: Store | None = None
        self._last_beat: float | None = None
        self._listening = False  # the store's notifications arrive (then data_version is not polled)
        self._stopping = threading.Event()
        self._listener: threading.Thread | None = None
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False
        self._spawned: set[asyncio.Task[None]] = set()
        self.keys = keys
        self.control = control
        self.service = service
        self.gate_host = gate_host
        self.metrics_port = metrics_port
        self.poll_s = poll_s
        self.prune_every_s = prune_every_s
        self.max_unattributed = max_unattributed
        if keep_history_days is not None and not keep_history_days >= 0:
            raise VimsError(f"keep history {keep_history_days} days: give a number of days (0 or more)")
        self.keep_history_days = keep_history_days
        self.metrics = Metrics(labels={"verifier": self.verifier_id})
        self.avms: dict[str, AvmState] = {}
        self.by_key: dict[str, str] = {}  # CURVE public (Z85) of unrevoked A-VMs -> avm_id
        self.by_vm: dict[str, str] = {}  # vm_id -> unrevoked avm_id
        self.policies: dict[str, dict[str, Any]] = {}
        self.waiters: dict[str, tuple[str, asyncio.Future[tuple[bool, str, int | None]]]] = {}
        self.history = HistoryWriter(store.location, self.metrics, max_group=write_group)
        self.gate = Gate(self.history, self.metrics, self._attest, self._latest_verdict, service, gate_host,
                         max_connections=max_connections_per_vm)
        self.endpoint = ""
        self.metrics_bound: int | None = None
        self._unenrolled_logged: dict[str, float] = {}
        self._unattributed = (0, 0, 0)  # (second, records in it, refusals not recorded since the last)
        self.gate_errors: dict[str, str] = {}  # vm_id -> why its gate does not listen
        self._data_version = -1
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_server: asyncio.Server | None = None
        self.ready = threading.Event()

    # -- life cycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind everything; after this ``endpoint``, ``gate_ports()`` and ``metrics_bound`` are set."""
        self.ctx = zmq.asyncio.Context()
        self.zap = self.ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)  # before the ROUTER binds, so no handshake escapes the check
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.curve_server = True
        self.router.curve_secretkey = self.keys.secret.encode()
        self.router.zap_domain = b"vims"
        self.router.maxmsgsize = MAX_MESSAGE + 4096
        self.router.sndhwm = 10000
        try:
            self.router.bind(self.control)
        except zmq.ZMQError as exc:
            raise VimsError(f"cannot bind the control channel at {self.control}: {exc}") from None
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        await self._reload()
        if self.metrics_port is not None:
            self._metrics_server = await self.metrics.serve("127.0.0.1", self.metrics_port)
            self.metrics_bound = self._metrics_server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        await self._beat()
        self._listener = threading.Thread(target=self._listen_thread, args=(loop,), daemon=True,
                                          name="rem-s-notifications")
        self._listener.start()
        for coro in (self._zap_loop(), self._control_loop(), self._watch_loop(), self._lease_loop()):
            self._tasks.append(loop.create_task(coro))
        self.ready.set()
        log.info("REM-S control channel at %s, metrics on port %s", self.endpoint, self.metrics_bound)

    async def stop(self) -> None:
        self._stopping.set()
        await self.gate.close("REM-S shutting down")
        if self._listener is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._listener.join, 5.0)
        for spawned in list(self._spawned):
            spawned.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._metrics_server is not None:
            self._metrics_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._metrics_server.wait_closed(), 2.0)
        await asyncio.get_running_loop().run_in_executor(None, self.history.close)
        with contextlib.suppress(Exception):  # give the leases up: others take these A-VMs over at once
            await asyncio.get_running_loop().run_in_executor(self._lease_pool, self._release_all)
        self._lease_pool.shutdown(wait=True)
        self.router.close(linger=0)
        self.zap.close(linger=0)
        self.ctx.term()

    # -- leases ---------------------------------------------------------------------------------------

    def _lease_db(self) -> Store:
        """The lease thread's own connection to the store."""
        if self._lease_store is None:
            self._lease_store = Store(self.store.location)
        return self._lease_store

    def _heartbeat(self, keep: list[str], release: list[str]) -> tuple[set[str], set[str], list[str]]:
        db = self._lease_db()
        held = db.heartbeat(self.verifier_id, self.lease_s, keep, release, endpoint=self.endpoint)
        others = {r["avm_id"] for r in db._rows(
            f"SELECT avm_id FROM leases WHERE verifier_id != ? AND expires_at >= {db._now}", (self.verifier_id,))}
        peers = [r["endpoint"] for r in db.verifiers(live_only=True) if r["endpoint"]]
        return held, others, peers

    def _release_all(self) -> None:
        db = self._lease_db()
        try:
            db.stop_verifier(self.verifier_id)
        finally:
            db.close()
            self._lease_store = None

    async def _beat(self) -> None:
        """One heartbeat: renew the leases of the A-VMs heard from within a lease period, give up the
        others', learn which A-VMs other verifiers hold; cut and stop listening for those lost."""
        now = time.monotonic()
        keep = [a for a, st in self.avms.items() if not st.revoked and st.rid is not None
                and st.heard is not None and now - st.heard <= self.lease_s]
        release = sorted(self.leased - set(keep))
        try:
            held, others, peers = await asyncio.get_running_loop().run_in_executor(
                self._lease_pool, self._heartbeat, keep, release)
        except Exception as exc:
            self.metrics.inc("vims_lease_heartbeat_failures_total")
            log.error("lease heartbeat of verifier %s failed: %s", self.verifier_id, one_line(str(exc)))
            if self._lease_store is not None:
                with contextlib.suppress(Exception):
                    self._lease_store.close()
                self._lease_store = None
            if self._last_beat is not None and time.monotonic() - self._last_beat <= self.lease_s:
                return
            held, others, peers = set(), self.foreign, self.peers  # every lease may have expired
        else:
            self._last_beat = now
        for avm_id in sorted(self.leased - held):
            st = self.avms.get(avm_id)
            if st is not None:
                log.info("lease of A-VM %s no longer held by verifier %s", avm_id, self.verifier_id)
                if avm_id in release:  # given up: the A-VM went silent here
                    reason = (f"no fresh report from A-VM {avm_id} within the lease period ({self.lease_s:g} s): "
                              f"verifier {self.verifier_id} released its lease")
                else:
                    reason = f"A-VM {avm_id}'s lease is no longer held by verifier {self.verifier_id}"
                self.gate.cut_vm(st.vm_id, reason)
        self.leased, self.foreign, self.peers = held, others - held, peers
        self.metrics.set("vims_leases_held", len(held))
        await self._listen_gates()

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._beat()
            except Exception:
                log.exception("lease loop")

    def gate_ports(self) -> dict[str, int]:
        """vm_id -> the port its gate listens on."""
        return self.gate.ports()

    def live(self) -> dict[str, Any]:
        """What only the running server knows, per VM: open connections, whether its A-VM is connected.

        Safe to call from another thread (the web console's): it only copies.
        """
        open_by_vm = collections.Counter(c.vm_id for c in list(self.gate.open.values()))
        return {"now": time.time(), "vms": {
            st.vm_id: {"open_connections": open_by_vm.get(st.vm_id, 0), "avm_connected": st.rid is not None}
            for st in list(self.avms.values())}}

    # -- the store's notifications --------------------------------------------------------------------

    def _listen_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the store's notices to the loop; listen again (after a second) when the connection is lost."""
        while not self._stopping.is_set():
            try:
                feed = self.store.notifications()
            except Exception as exc:
                loop.call_soon_threadsafe(self._listening_changed, False, one_line(str(exc)))
                self._stopping.wait(1.0)
                continue
            if feed is None:
                return
            loop.call_soon_threadsafe(self._listening_changed, True, "")
            try:
                while not self._stopping.is_set():
                    notices = feed.wait(0.5)
                    if notices:
                        loop.call_soon_threadsafe(self._on_notices, notices)
            except Exception as exc:
                loop.call_soon_threadsafe(self._listening_changed, False, one_line(str(exc)))
                self._stopping.wait(1.0)
            finally:
                feed.close()

    def _listening_changed(self, up: bool, why: str) -> None:
        if up == self._listening and (up or not why):
            return
        self.metrics.set("vims_store_listening", 1 if up else 0)
        if up:
            log.info("verifier %s listens for the store's notifications", self.verifier_id)
            self._listening = True
            self._want_reload()  # what changed while nobody listened
        else:
            if self._listening:
                log.error("store notifications lost (reading data_version until they are back): %s", why)
            self._listening = False

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)

    def _on_notices(self, notices: list[dict[str, Any]]) -> None:
        """Act on notices: read enrolments and policies again; check the leases of this verifier's A-VMs
        said to have another holder now."""
        self.metrics.inc("vims_store_notifications_total", len(notices))
        if any(n.get("kind") != "lease" for n in notices):
            self._want_reload()
        taken = sorted({str(n.get("avm_id")) for n in notices if n.get("kind") == "lease"
                        and n.get("avm_id") in self.leased and n.get("holder") not in (None, self.verifier_id)})
        if taken:
            self._spawn(self._lease_taken(taken))

    def _want_reload(self) -> None:
        """Read enrolments and policies again, once more after a reload that is under way."""
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_until_settled())

    async def _reload_until_settled(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self._reload()
            except Exception:
                log.exception("reload after a notification")
            if not self._reload_again:
                return

    async def _lease_taken(self, avm_ids: list[str]) -> None:
        """The store says another verifier took these A-VMs' leases: where the store still says so, cut
        their VMs' connections here and stop listening at their gates (the holder listens)."""
        try:
            holders = await asyncio.get_running_loop().run_in_executor(
                self._lease_pool, lambda: {a: self._lease_db().lease_holder(a) for a in avm_ids})
        except Exception as exc:  # the next heartbeat decides; an allow needs the store anyway
            log.error("lease lookup after a notification failed: %s", one_line(str(exc)))
            return
        lost = False
        for avm_id in avm_ids:
            holder = holders.get(avm_id)
            if holder is None or holder["verifier_id"] == self.verifier_id or avm_id not in self.leased:
                continue
            self.leased.discard(avm_id)
            self.foreign.add(avm_id)
            lost = True
            st = self.avms.get(avm_id)
            log.info("lease of A-VM %s taken by verifier %s", avm_id, holder["verifier_id"])
            if st is not None:
                self.gate.cut_vm(st.vm_id, f"A-VM {avm_id}'s lease was taken by verifier {holder['verifier_id']}")
        if lost:
            self.metrics.set("vims_leases_held", len(self.leased))
            await self._listen_gates()

    # -- decisions ------------------------------------------------------------------------------------

    def _check_deadlines(self) -> None:
        """Cut the open connections whose VM has no accepted report younger than its deadline."""
        now = time.monotonic()
        for conn in list(self.gate.open.values()):
            avm_id = self.by_vm.get(conn.vm_id)
            st = self.avms.get(avm_id) if avm_id else None
            deadline = self.policies.get(conn.vm_id, {}).get("deadline_s", 0.0)
            if st is None:
                self.gate.cut(conn, "no A-VM enrolled for this VM")
            elif st.last_ok is None or now - st.last_ok > deadline:
                age = "never" if st.last_ok is None else f"{now - st.last_ok:.1f} s ago"
                self.gate.cut(conn, f"no fresh report within {deadline:g} s (last accepted {age})")

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
            allowed, reason, seq = await asyncio.wait_for(future, policy["attest_timeout_s"])
        except TimeoutError:
            return False, f"no fresh report from A-VM {avm_id} within {policy['attest_timeout_s']:g} s", None
        finally:
            self.waiters.pop(nonce, None)
        if not allowed:
            return allowed, reason, seq
        return (*self._confirm(vm_id, avm_id, seq), seq)

    def _read_latest(self, vm_id: str) -> dict[str, Any] | None:
        """:meth:`Store.latest_verdict`, read again once on a fresh connection when the first read
        lost its connection (a read is safe to repeat; a second failure raises)."""
        try:
            return self.store.latest_verdict(vm_id)
        except StoreError:
            return self.store.latest_verdict(vm_id)

    def _confirm(self, vm_id: str, avm_id: str, seq: int | None) -> tuple[bool, str]:
        """Whether the store still says allow: the VM's latest accepted report (by any verifier) is
        ``seq`` of ``avm_id``, its verdict allow, and this verifier holds the A-VM's lease."""
        try:
            latest = self._read_latest(vm_id)
        except Exception as exc:  # the shared store unreadable: no allow
            return False, one_line(f"the store cannot be read ({exc})")
        if latest is None or latest["avm_id"] != avm_id or latest["seq"] != seq:
            return False, "a newer report of this VM was accepted meanwhile" if latest else "no report in the store"
        if latest["verdict"] != "allow":
            return False, str(latest["detail"] or "the latest report fails the policy")
        if latest["holder"] != self.verifier_id:
            return False, f"A-VM {avm_id}'s lease is held by verifier {latest['holder']} now"
        return True, str(latest["detail"] or "allowed")

    def _latest_verdict(self, vm_id: str) -> tuple[bool, str] | None:
        """The verdict on the VM's latest accepted report, read from the shared store (None: none)."""
        try:
            latest = self._read_latest(vm_id)
        except Exception as exc:
            return False, one_line(f"the store cannot be read ({exc})")
        if latest is None:
            return None
        if latest["verdict"] != "allow":
            return False, str(latest["detail"] or "the latest report fails the policy")
        if latest["holder"] != self.verifier_id:
            return False, f"A-VM {latest['avm_id']}'s lease is held by verifier {latest['holder']} now"
        return True, str(latest["detail"] or "allowed")

    # -- enrolments and policies ----------------------------------------------------------------------

    async def _reload(self) -> None:
        """Bring enrolments, revocations and policies in line with the database."""
        self._data_version = self.store.data_version()
        rows = self.store.avms()
        by_key: dict[str, str] = {}
        by_vm: dict[str, str] = {}
        for row in rows:
            st = self.avms.get(row["avm_id"])
            revoked = row["revoked_at"] is not None
            if st is None or st.curve_public != row["curve_public"] or st.vm_id != row["vm_id"]:
                st = AvmState(row["avm_id"], row["vm_id"], row["curve_public"], verify_key(row["sign_public"]),
                              row["gate_port"], revoked, row["last_seq"], row["acked_version"])
                self.avms[row["avm_id"]] = st
            st.verify = verify_key(row["sign_public"])
            st.last_seq = max(st.last_seq, row["last_seq"])
            st.gate_port = row["gate_port"]
            if revoked and not st.revoked:
                st.rid = None
                log.warning("A-VM %s revoked", st.avm_id)
                self.gate.cut_vm(st.vm_id, f"A-VM {st.avm_id} revoked")
            st.revoked = revoked  # enrolled again (--force) after a revocation: admitted again
            if not revoked:
                by_key[row["curve_public"]] = st.avm_id
                by_vm[row["vm_id"]] = st.avm_id
        self.by_key, self.by_vm = by_key, by_vm
        for vm_id, avm_id in by_vm.items():
            policy = self.store.policy(vm_id)
            old = self.policies.get(vm_id)
            self.policies[vm_id] = policy
            st = self.avms[avm_id]
            if old is not None and old["version"] != policy["version"] and st.rid is not None:
                log.info("pushing policy v%d to %s", policy["version"], avm_id)
                self._send_policy(st)
        await self._listen_gates()

    async def _listen_gates(self) -> None:
        """Make every enrolled VM's gate listen; one VM's failure does not hold back the others.

        A gate that cannot listen (its port taken) is logged and recorded once per new error (a
        ``gate_error`` decision, shown by ``vims rems status``), counted in
        ``vims_gate_bind_failures_total`` and shown as ``vims_gate_listening{vm} 0``; the watch loop
        tries again every second. Its VM's clients cannot connect meanwhile: nothing is let through.
        """
        for vm_id, avm_id in list(self.by_vm.items()):
            await self._listen_gate(vm_id, avm_id)

    async def _listen_gate(self, vm_id: str, avm_id: str) -> None:
        """One VM's part of :meth:`_listen_gates`: listen at its gate, or stop where another verifier
        holds its A-VM."""
        port = self.avms[avm_id].gate_port
        if avm_id in self.foreign:  # the gate is at the verifier holding its A-VM
            if self.gate.port_vm.get(port) == vm_id:
                self.gate.unlisten(vm_id)
            self.gate_errors.pop(vm_id, None)
            return
        try:
            await self.gate.listen(port, vm_id)
        except VimsError as exc:
            if avm_id not in self.leased and len(self.peers) > 1:
                # Held by no verifier yet and others run: one of them may listen there.
                log.debug("%s (its A-VM is not leased here yet)", exc)
                return
            self.metrics.set("vims_gate_listening", 0, vm=vm_id)
            if self.gate_errors.get(vm_id) != str(exc):
                self.gate_errors[vm_id] = str(exc)
                self.metrics.inc("vims_gate_bind_failures_total", vm=vm_id)
                log.error("%s", exc)
                self.history.submit("record_decision", vm_id=vm_id, conn_id="-", kind="gate_error",
                                    reason=one_line(str(exc)))
            return
        if self.gate_errors.pop(vm_id, None) is not None:
            log.info("gate for VM %s listens again on port %d", vm_id, port)
        self.metrics.set("vims_gate_listening", 1, vm=vm_id)

    async def _watch_loop(self) -> None:
        """Cut connections whose VM has no fresh report; pick up changes made in the database."""
        last_db = last_retry = 0.0
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(self.poll_s)
            now = time.monotonic()
            try:
                self._check_deadlines()
                if now - last_prune >= self.prune_every_s:
                    last_prune = now
                    self._prune()
                if now - last_db >= 0.5:
                    last_db = now
                    if not self._listening and self.store.data_version() != self._data_version:
                        await self._reload()
                    elif self.gate_errors and now - last_retry >= 1.0:
                        last_retry = now
                        await self._listen_gates()
            except Exception:
                log.exception("watch loop")

    def _prune(self) -> None:
        """Queue a pruning of the history (in the writer's thread) to every VM's retention policy."""
        limits = {vm: retention(p) for vm, p in self.policies.items()}
        future = self.history.submit("prune", retry=False, limits=limits, max_unattributed=self.max_unattributed,
                                     max_days=self.keep_history_days)

        def done(f: Any) -> None:
            if f.exception() is None:
                for what, n in f.result().items():
                    if n:
                        self.metrics.inc("vims_history_pruned_total", n, what=what)

        future.add_done_callback(done)

    # -- ZAP: who may connect -------------------------------------------------------------------------

    async def _zap_loop(self) -> None:
        while True:
            frames = await self.zap.recv_multipart()
            try:
                reply = self._zap_reply(frames)
            except Exception:
                log.exception("ZAP request")
                reply = [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"internal error", b"", b""]
            await self.zap.send_multipart(reply)

    def _zap_reply(self, frames: list[bytes]) -> list[bytes]:
        version, request_id, _domain, address, _identity, mechanism = frames[:6]
        key = z85.encode(frames[6]).decode() if mechanism == b"CURVE" and len(frames) == 7 else ""
        avm_id = self.by_key.get(key)
        if avm_id is not None:
            return [version, request_id, b"200", b"OK", key.encode(), b""]
        self.metrics.inc("vims_reports_rejected_total", reason="unenrolled")
        now = time.monotonic()
        # A refused peer retries every few hundred ms, and anyone with REM-S's public key can make fresh
        # keys: count every refusal; record one per key per second and UNATTRIBUTED_PER_S in all.
        second, recorded, unrecorded = self._unattributed
        if int(now) != second:
            second, recorded = int(now), 0
        if now - self._unenrolled_logged.get(key, -10.0) < 1.0 or recorded >= UNATTRIBUTED_PER_S:
            self._unattributed = (second, recorded, unrecorded + 1)
            return [version, request_id, b"400", b"key not enrolled", b"", b""]
        self._unattributed = (second, recorded + 1, 0)
        self._unenrolled_logged[key] = now
        if len(self._unenrolled_logged) > 10000:
            self._unenrolled_logged.clear()
        revoked = any(st.curve_public == key for st in self.avms.values())
        also = f" ({unrecorded} more refusals counted, not recorded, since the last)" if unrecorded else ""
        self.history.submit("record_report", avm_id=None, vm_id=None, seq=None, status="rejected",
                            reason="unenrolled",
                            detail=one_line(f"{'revoked' if revoked else 'unknown'} CURVE key {key} "
                                            f"from {address.decode(errors='replace')}{also}"))
        log.warning("refused CURVE key %s from %s%s", key, address.decode(errors="replace"), also)
        return [version, request_id, b"400", b"key not enrolled", b"", b""]

    # -- the control channel --------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        while True:
            # libzmq delivers a multipart message whole (maxmsgsize bounds each frame, nothing bounds
            # their number), so only an enrolled A-VM's key can make REM-S hold a big one, briefly.
            frames = await self.router.recv_multipart(copy=False)
            received = time.time()
            try:
                await self._on_message(frames, received)
            except Exception:  # a bug must not take the server down with it
                log.exception("handling a control message")
                self.metrics.inc("vims_internal_errors_total")

    def _send(self, st: AvmState, kind: str, body: dict[str, Any]) -> None:
        if st.rid is None:
            return
        st.out_seq += 1
        try:
            self.router.send_multipart([st.rid, envelope(kind, SERVER_ID, st.out_seq, body)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone or its queue full: it will say hello again
            log.warning("cannot send %s to %s: %s", kind, st.avm_id, exc)

    def _send_raw_error(self, rid: bytes, reason: str, detail: str) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.router.send_multipart([rid, envelope("error", SERVER_ID, 1, {"reason": reason, "detail": detail})],
                                       flags=zmq.NOBLOCK)

    def _new_nonce(self, st: AvmState) -> str:
        nonce = secrets.token_hex(16)
        st.nonces[nonce] = time.monotonic()
        while len(st.nonces) > NONCES_KEPT:
            st.nonces.popitem(last=False)
        return nonce

    def _send_policy(self, st: AvmState) -> None:
        policy = self.policies[st.vm_id]
        self._send(st, "policy", {"vm_id": st.vm_id, "policy": policy, "version": policy["version"],
                                  "last_seq": st.last_seq, "nonce": self._new_nonce(st),
                                  "verifiers": self.peers or [self.endpoint]})

    async def _write(self, method: str, **kwargs: Any) -> bool:
        """Record through the history writer and wait (at most RECORD_WAIT_S) for it; True once written."""
        future = self.history.submit(method, **kwargs)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), RECORD_WAIT_S)
        except Exception:
            return False
        return True

    async def _reject(self, st: AvmState | None, reason: str, detail: str, *, seq: int | None = None,
                      nonce: str | None = None, document: str | None = None, received: float | None = None) -> None:
        self.metrics.inc("vims_reports_rejected_total", reason=reason)
        detail = one_line(detail)
        await self._write("record_report", avm_id=st.avm_id if st else None, vm_id=st.vm_id if st else None,
                          seq=seq, status="rejected", reason=reason, detail=detail, nonce=nonce,
                          document=document, received_at=received)
        log.info("rejected message from %s: %s: %s", st.avm_id if st else "?", reason, detail)

    async def _on_message(self, frames: list[zmq.Frame], received: float) -> None:
        rid = frames[0].bytes
        try:
            key = str(frames[-1].get("User-Id"))
        except zmq.ZMQError:
            key = ""
        avm_id = self.by_key.get(key)
        if avm_id is None:
            # Admitted at the handshake, revoked since: nothing it says counts any more.
            st = next((s for s in self.avms.values() if s.curve_public == key), None)
            await self._reject(st, "revoked" if st else "unenrolled", "message from a key no longer enrolled",
                         received=received)
            self._send_raw_error(rid, "revoked", "this A-VM is no longer enrolled")
            return
        st = self.avms[avm_id]
        if len(frames) != 2:
            await self._reject(st, "malformed", f"{len(frames) - 1} frames, expected 1", received=received)
            self._send_raw_error(rid, "malformed", "expected one frame")
            return
        raw = frames[1].bytes
        try:
            msg = parse_envelope(raw)
            if msg["sender"] != avm_id:
                raise ProtocolError("wrong_sender", f"sender {msg['sender']!r} on the key of {avm_id}")
        except ProtocolError as exc:
            await self._reject(st, exc.reason, exc.detail, document=raw[:1024].decode("utf-8", "replace"),
                         received=received)
            self._send_raw_error(rid, exc.reason, exc.detail)
            return
        st.heard = time.monotonic()
        if rid != st.rid:
            st.rid, st.out_seq, st.in_seq = rid, 0, 0
            if msg["type"] != "hello" and st.acked_version != self.policies[st.vm_id]["version"]:
                # Reconnected without a hello (REM-S restarted) under a policy changed meanwhile: push it.
                log.info("pushing policy v%d to %s on reconnect", self.policies[st.vm_id]["version"], avm_id)
                self._send_policy(st)
        if st.in_seq and msg["seq"] != st.in_seq + 1:
            self.metrics.inc("vims_frame_gaps_total")
        st.in_seq = msg["seq"]
        kind = msg["type"]
        if kind == "hello":
            with contextlib.suppress(Exception):  # another verifier may have accepted newer reports
                st.last_seq = max(st.last_seq, self.store.last_seq(avm_id))
            caps = msg["body"].get("capabilities", {})
            self.history.submit("record_hello", avm_id=avm_id, capabilities=caps)
            log.info("hello from %s (VM %s)", avm_id, st.vm_id)
            self._send_policy(st)
        elif kind == "policy_ack":
            version = msg["body"].get("version")
            if not isinstance(version, int) or isinstance(version, bool):
                await self._reject(st, "malformed", "policy_ack without an integer version", received=received)
                return
            if version != self.policies[st.vm_id]["version"]:
                await self._reject(st, "wrong_policy", f"policy_ack for v{version}, the current policy is "
                                   f"v{self.policies[st.vm_id]['version']}", received=received)
                return
            st.acked_version = version
            self.history.submit("record_ack", avm_id=avm_id, version=version)
        else:
            await self._on_report(st, msg, received)

    async def _on_report(self, st: AvmState, msg: dict[str, Any], received: float) -> None:
        body = msg["body"]
        nonce = body.get("nonce") if isinstance(body.get("nonce"), str) else None
        seq = body.get("seq") if isinstance(body.get("seq"), int) and not isinstance(body.get("seq"), bool) \
            and 0 <= body["seq"] < 2**63 else None
        text: str | None = None
        try:
            encoded = canonical(body)  # encoded once: the signature, the digest and the history all use it
            text = encoded.decode()
            verify_report(encoded, msg.get("sig"), st.verify)
            check_report(body)
            if body["avm_id"] != st.avm_id or body["vm_id"] != st.vm_id:
                raise ProtocolError("wrong_sender", f"report names {body['avm_id']}/{body['vm_id']}, the key "
                                                    f"is enrolled as {st.avm_id}/{st.vm_id}")
            d = digest(encoded)
            if body["seq"] <= st.last_seq:
                if self.store.seen_report(st.avm_id, body["seq"], d):
                    raise ProtocolError("replayed", f"report seq {body['seq']} was accepted before")
                raise ProtocolError("out_of_sequence", f"seq {body['seq']} <= last accepted {st.last_seq}")
            policy = self.policies[st.vm_id]
            if body.get("policy_version") != policy["version"]:
                raise ProtocolError("wrong_policy", f"report made under policy v{body.get('policy_version')}, "
                                                    f"the current one is v{policy['version']}")
            deadline = policy["deadline_s"]
            skew = received - body["time"]
            if abs(skew) > deadline:
                when = f"made {skew:.1f} s ago" if skew > 0 else f"dated {-skew:.1f} s in the future"
                raise ProtocolError("stale", f"report {when} by REM-S's clock (limit {deadline:g} s)")
            if nonce is None:
                raise ProtocolError("stale", "report carries no nonce")
            issued = st.nonces.pop(nonce, None)  # single use: a nonce answers one report
            if issued is None:
                why = "was answered before" if nonce in st.used_nonces else \
                    "was not issued to this A-VM (or is long gone)"
                raise ProtocolError("stale", f"nonce {why}")
            st.used_nonces[nonce] = None
            while len(st.used_nonces) > NONCES_KEPT:
                st.used_nonces.popitem(last=False)
            age = time.monotonic() - issued
            if age > deadline:
                raise ProtocolError("stale", f"nonce issued {age:.1f} s ago (limit {deadline:g})")
        except ProtocolError as exc:
            await self._reject(st, exc.reason, exc.detail, seq=seq, nonce=nonce, received=received,
                               document=text[:65536] if text is not None and exc.reason != "malformed" else None)
            self._answer_refusal(st, seq, nonce, exc.reason, exc.detail)
            return
        allowed, reason = evaluate(body, policy, received)
        # Recorded before answered; a report that cannot be recorded is not accepted (fail closed).
        # Recorded only while this verifier holds the A-VM's lease, under a seq newer than any verifier's.
        future = self.history.submit("accept_report", retry=False, verifier_id=self.verifier_id,
                                     lease_s=self.lease_s, avm_id=st.avm_id, vm_id=st.vm_id,
                                     seq=body["seq"], nonce=nonce, score=_score(body),
                                     verdict="allow" if allowed else "deny", detail=reason, digest=d,
                                     document=text, received_at=received)
        try:
            _, refused, why = await asyncio.wrap_future(future)
        except Exception as exc:
            detail = one_line(f"history cannot be written: {exc}")
            self.metrics.inc("vims_reports_rejected_total", reason="unrecorded")
            log.error("report %s of %s not accepted: %s", body["seq"], st.avm_id, detail)
            self._answer_refusal(st, seq, nonce, "unrecorded", detail)
            return
        if refused is not None:
            if refused == "out_of_sequence":
                st.last_seq = max(st.last_seq, self.store.last_seq(st.avm_id))
            else:
                self.leased.discard(st.avm_id)
            await self._reject(st, refused, why, seq=seq, nonce=nonce, received=received)
            self._answer_refusal(st, seq, nonce, refused, why)
            return
        if st.avm_id not in self.leased:  # taken here (from another verifier, or a free lease): its gate is here
            self.leased.add(st.avm_id)
            self.foreign.discard(st.avm_id)
            self._spawn(self._listen_gate(st.vm_id, st.avm_id))
        self.metrics.inc("vims_reports_accepted_total", vm=st.vm_id)
        st.last_seq = body["seq"]
        st.last_ok = time.monotonic()
        st.last_verdict = (allowed, reason)
        self._send(st, "ack", {"seq": body["seq"], "accepted": True, "reason": None, "verdict": reason,
                               "nonce": self._new_nonce(st)})
        waiter = self.waiters.get(nonce) if nonce else None
        if waiter is not None and waiter[0] == st.avm_id and not waiter[1].done():
            self.metrics.observe("vims_report_latency_seconds", time.monotonic() - issued)
            waiter[1].set_result((allowed, reason, body["seq"]))
        if not allowed:
            self.gate.cut_vm(st.vm_id, reason)

    def _answer_refusal(self, st: AvmState, seq: int | None, nonce: str | None, reason: str, detail: str) -> None:
        """Tell the A-VM its report was refused, and end the wait of a client whose nonce it carried."""
        self._send(st, "ack", {"seq": seq, "accepted": False, "reason": reason, "detail": detail,
                               "nonce": self._new_nonce(st)})
        waiter = self.waiters.get(nonce) if nonce else None
        if waiter is not None and waiter[0] == st.avm_id and not waiter[1].done():
            waiter[1].set_result((False, f"report refused ({reason}: {detail})", seq))


def _score(report: dict[str, Any]) -> float | None:
    score = report["behaviour"].get("score")
    return None if score is None else float(score)


class ServerThread:
    """Run a :class:`RemsServer` in a thread with its own event loop (tests, benchmarks, the demo).

    ``demo_service=True`` also starts :mod:`vims.remote.service` in the same loop and protects it.
    ``with ServerThread(path, keys, demo_service=True) as srv:`` then ``srv.server.gate_ports()``.
    """

    def __init__(self, store_path: Any, keys: ServerKeys, demo_service: bool = False, **kwargs: Any) -> None:
        self.store_path = store_path
        self.demo_service = demo_service
        self.service_server: asyncio.Server | None = None
        self.keys = keys
        self.kwargs = kwargs
        self.server: RemsServer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="rem-s", daemon=True)
        self._error: BaseException | None = None
        self._started = threading.Event()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        store = Store(self.store_path)
        if self.demo_service:
            from vims.remote.service import start_line_service

            self.service_server = await start_line_service()
            self.kwargs["service"] = ("127.0.0.1", self.service_server.sockets[0].getsockname()[1])
        self.server = RemsServer(store, self.keys, **self.kwargs)
        try:
            await self.server.start()
            self._started.set()
            await self._stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await self.server.stop()
            if self.service_server is not None:
                self.service_server.close()
            store.close()

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Any, timeout: float = 10.0) -> Any:
        """Run ``fn()`` in the server's loop and return its result (to read state safely)."""
        assert self._loop is not None

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
