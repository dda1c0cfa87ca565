"""The A-VM side of the control channel: hello, policy, nonce requests, signed reports.

Two layers:

- :class:`AvmSession`: the protocol state without any I/O (sequence numbers, the latest nonce, the
  policy, signing). Feed it the frames REM-S sends, send the frames it returns. The load benchmark drives
  a hundred of these from one event loop.
- :class:`AvmClient`: a ZeroMQ DEALER (CURVE client) in a background thread, for the A-VM agent. It says
  hello, acknowledges every policy, moves to the next of its verifiers when the current one stops
  answering (*Failover* below), and either

  * calls ``source(nonce)`` to build a report (periodically, every policy ``interval_s``, with the latest
    nonce, and at once when REM-S sends a nonce request), or
  * leaves reports to the agent: events arrive on :attr:`AvmClient.events` (or ``on_event``) as
    ``(kind, body)`` with kind ``policy``, ``nonce``, ``ack`` or ``error``, and the agent calls
    :meth:`AvmClient.send_report` (thread-safe, never blocks) with the report's content; it returns the
    document it sent.

Failover: an A-VM is given a list of verifier endpoints (several ``endpoint`` arguments, or one string of
endpoints separated by commas, as ``--remote`` takes them; each verifier's policy message adds the live
verifiers it knows of). It talks to one at a time, the first first. When nothing has come back from it
for ``failover_s`` (default :data:`FAILOVER_S`, 5 s) after something was sent (REM-S answers each
report at once, ack or refusal), it closes that connection, connects to the next in the list (round
the list), and says hello again; the verifier there takes the A-VM's lease over once the old one's
has expired (it answers ``not_leaseholder`` until then, which counts as an answer).

A report's content is what the A-VM measured: ``behaviour``, ``checks``, ``events``, ``collector``,
``measured_at``, ``model`` (see :mod:`vims.remote.protocol`). The session *stamps* it once
(:func:`stamped`: ``vm_id``, ``avm_id``, ``seq``, ``time``, ``nonce``, ``interval_s``,
``policy_version``, from its own state), encodes it once and signs those bytes
(:func:`~vims.remote.protocol.seal_report`).

>>> from vims.remote.keys import AvmIdentity
>>> s = AvmSession(AvmIdentity.generate("avm-1"), {"checks": ["kernel-text"]})
>>> parse_envelope(s.hello())["type"]
'hello'
>>> policy = envelope("policy", "rem-s", 1, {"vm_id": "vm-1", "policy": {"interval_s": 1.0}, "version": 1,
...                                          "last_seq": 41, "nonce": "ab"})
>>> events, replies = s.handle(policy)
>>> events[0][0], parse_envelope(replies[0])["type"], s.next_seq
('policy', 'policy_ack', 42)
>>> report = parse_envelope(s.report({"behaviour": {"score": 1.0, "threshold": 0.5}, "checks": []}))["body"]
>>> report["seq"], report["nonce"], report["vm_id"]
(42, 'ab', 'vm-1')
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import zmq

from vims.errors import VimsError
from vims.remote.keys import AvmIdentity
from vims.remote.protocol import MAX_MESSAGE, SERVER_TYPES, ProtocolError, envelope, parse_envelope, seal_report

log = logging.getLogger(__name__)

Event = tuple[str, dict[str, Any]]


def stamped(content: dict[str, Any], vm_id: str, avm_id: str, seq: int, nonce: str | None, interval_s: float,
            policy_version: int | None) -> dict[str, Any]:
    """A report document: who, which, when and under what policy (the *stamp*), then ``content``.

    The one place the stamp's keys are added, for reports to REM-S (:meth:`AvmSession.seal`) and for
    reports made without it (:class:`vims.avm.stamp.LocalStamp`). ``time`` is now.

    >>> doc = stamped({"checks": []}, "vm-1", "avm-1", 7, None, 1.0, 2)
    >>> [k for k in doc if k != "time"]
    ['vm_id', 'avm_id', 'seq', 'nonce', 'interval_s', 'policy_version', 'events', 'collector', 'checks']
    """
    doc: dict[str, Any] = {"vm_id": vm_id, "avm_id": avm_id, "seq": seq, "time": time.time(), "nonce": nonce,
                           "interval_s": float(interval_s), "policy_version": policy_version,
                           "events": {"seen": 0, "dropped": 0, "missing": 0}, "collector": {}, "checks": []}
    doc.update(content)
    return doc


class Sealed(NamedTuple):
    """A stamped report, its canonical encoding and the signature over it."""

    doc: dict[str, Any]
    text: bytes
    sig: str


class AvmSession:
    """Protocol state of one A-VM towards REM-S, without I/O.

    Parameters
    ----------
    identity : AvmIdentity
        The A-VM's id and keys.
    capabilities : dict, optional
        What the A-VM can do: ``{"checks": [...], "collectors": [...], "models": [...]}``.
    first_seq : int
        The first report sequence number; REM-S's ``last_seq`` in the policy moves it forward.
    """

    def __init__(self, identity: AvmIdentity, capabilities: dict[str, Any] | None = None,
                 first_seq: int = 1) -> None:
        self.identity = identity
        self.capabilities = capabilities or {}
        self.signing_key = identity.signing_key
        self.next_seq = first_seq
        self.out_seq = 0
        self.in_seq = 0
        self.gaps = 0
        self.policy: dict[str, Any] | None = None
        self.vm_id: str | None = None
        self.verifiers: list[str] = []  # the live verifiers' endpoints, as the last policy named them
        self.nonce: str | None = None
        self.accepted = 0
        self.rejected: collections.Counter[str] = collections.Counter()

    def _frame(self, kind: str, body: dict[str, Any] | bytes, sig: str | None = None) -> bytes:
        self.out_seq += 1
        return envelope(kind, self.identity.avm_id, self.out_seq, body, sig)

    def hello(self) -> bytes:
        """The first message of a connection (again after REM-S forgot us)."""
        self.in_seq = 0
        return self._frame("hello", {"capabilities": self.capabilities, "software": "vims-avm"})

    def handle(self, frame: bytes) -> tuple[list[Event], list[bytes]]:
        """Take one frame from REM-S; return the events for the agent and the frames to send back."""
        msg = parse_envelope(frame, SERVER_TYPES)
        if self.in_seq and msg["seq"] != self.in_seq + 1 and msg["type"] != "error":
            self.gaps += 1
        if msg["type"] != "error":
            self.in_seq = msg["seq"]
        body = msg["body"]
        replies: list[bytes] = []
        kind = msg["type"]
        if kind == "policy":
            if not isinstance(body.get("policy"), dict) or not isinstance(body.get("version"), int):
                raise ProtocolError("malformed", "policy message without policy/version")
            self.policy = {**body["policy"], "version": body["version"]}
            self.vm_id = str(body.get("vm_id"))
            self.verifiers = [v for v in body.get("verifiers", []) if isinstance(v, str)][:64] \
                if isinstance(body.get("verifiers"), list) else []
            last = body.get("last_seq")
            if isinstance(last, int) and last + 1 > self.next_seq:
                self.next_seq = last + 1
            self._take_nonce(body)
            replies.append(self._frame("policy_ack", {"version": body["version"]}))
        elif kind == "nonce":
            self._take_nonce(body)
        elif kind == "ack":
            if body.get("accepted"):
                self.accepted += 1
            else:
                self.rejected[str(body.get("reason"))] += 1
            self._take_nonce(body)
        return [(kind, body)], replies

    def _take_nonce(self, body: dict[str, Any]) -> None:
        if isinstance(body.get("nonce"), str):
            self.nonce = body["nonce"]

    def seal(self, content: dict[str, Any], nonce: str | None = None) -> Sealed:
        """Stamp and sign a report (:class:`Sealed`); :meth:`frame` makes its message when it is sent.

        The session's state is the truth for the stamp (:func:`stamped`): ``seq`` is its next sequence
        number, ``nonce`` defaults to the latest one from REM-S not yet used (a nonce goes into one report
        only), ``policy_version`` is the version it acknowledged. The document is encoded once for both
        the signature and the frame.

        >>> from vims.remote.keys import AvmIdentity
        >>> s = AvmSession(AvmIdentity.generate("avm-1"))
        >>> _ = s.handle(envelope("policy", "rem-s", 1, {"vm_id": "vm-1", "policy": {}, "version": 3, "nonce": "ab"}))
        >>> sealed = s.seal({"checks": []})
        >>> sealed.doc["seq"], sealed.doc["nonce"], sealed.doc["policy_version"], s.nonce
        (1, 'ab', 3, None)
        >>> parse_envelope(s.frame(sealed))["body"] == sealed.doc
        True
        """
        if self.policy is None or self.vm_id is None:
            raise VimsError("no policy from REM-S yet: cannot report")
        nonce = nonce or self.nonce
        doc = stamped(content, self.vm_id, self.identity.avm_id, self.next_seq, nonce,
                      float(self.policy.get("interval_s", 1.0)), self.policy["version"])
        text, sig = seal_report(doc, self.signing_key)  # raises on an unencodable report: seq, nonce unused
        self.next_seq += 1
        if nonce is not None and nonce == self.nonce:
            self.nonce = None  # each REM-S nonce is answered at most once
        return Sealed(doc, text, sig)

    def frame(self, sealed: Sealed) -> bytes:
        """The ``report`` message of a sealed report (next in this connection's message sequence)."""
        return self._frame("report", sealed.text, sealed.sig)

    def report(self, content: dict[str, Any], nonce: str | None = None) -> bytes:
        """Stamp, sign and frame a report (:meth:`seal`, then :meth:`frame`)."""
        return self.frame(self.seal(content, nonce))


#: Silence (s) after a message to a verifier, with nothing back, before the client moves to the next one.
FAILOVER_S = 5.0

#: Sealed reports waiting to be sent at most (at one a second, over a quarter of an hour of REM-S away).
OUTBOX_MAX = 1000


def endpoints(given: str | Sequence[str]) -> list[str]:
    """The verifier endpoints in ``given`` (one string, endpoints separated by commas, or several), in
    order, without repeats; a user error when there are none.

    >>> endpoints("tcp://a:1, tcp://b:2,tcp://a:1")
    ['tcp://a:1', 'tcp://b:2']
    """
    parts = [given] if isinstance(given, str) else list(given)
    out: list[str] = []
    for part in parts:
        for item in str(part).split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    if not out:
        from vims.errors import InputError

        raise InputError(f"no REM-S endpoint in {given!r}")
    return out


def dealer(ctx: zmq.Context[Any], identity: AvmIdentity, server_public: str, endpoint: str) -> zmq.Socket[Any]:
    """A DEALER socket set up as the CURVE client of REM-S, connected to ``endpoint``."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_secretkey = identity.curve_secret.encode()
    sock.curve_publickey = identity.curve_public.encode()
    sock.curve_serverkey = server_public.encode()
    sock.sndhwm = 1000
    sock.maxmsgsize = MAX_MESSAGE + 4096  # REM-S sends policies, nonces and acks: nothing near this
    sock.connect(endpoint)
    return sock


class AvmClient:
    """The A-VM's connection to REM-S, run by a background thread.

    Parameters
    ----------
    identity : AvmIdentity
        The A-VM's id and keys (``vims avm init``).
    endpoint : str or sequence of str
        REM-S's control channel, e.g. ``tcp://127.0.0.1:5555``; several (or a comma-separated string):
        verifiers to fail over to, tried in order.
    server_public : str
        REM-S's CURVE public key (Z85, from ``rems.public.json``).
    capabilities : dict, optional
        Sent in the hello.
    source : callable, optional
        ``source(nonce) -> content or None``: builds a report's content; called every policy interval
        (``nonce`` None: the latest one is used) and on every nonce request. Returning None sends nothing.
        Runs in the client thread: keep it quick.
    on_event : callable, optional
        ``on_event(kind, body)`` for every message from REM-S, in the client thread. Without it, events
        go to the queue :attr:`events`.
    failover_s : float, optional
        Silence (nothing received since a message was sent) after which it moves to the next verifier
        (default :data:`FAILOVER_S`).
    """

    def __init__(self, identity: AvmIdentity, endpoint: str | Sequence[str], server_public: str,
                 capabilities: dict[str, Any] | None = None,
                 source: Callable[[str | None], dict[str, Any] | None] | None = None,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 context: zmq.Context[Any] | None = None, failover_s: float | None = None) -> None:
        self.identity = identity
        self.endpoints = endpoints(endpoint)
        self.current = 0  # index in endpoints of the verifier talked to
        self.failover_s = failover_s
        self.failovers = 0
        self._unanswered_since: float | None = None
        self.server_public = server_public
        self.session = AvmSession(identity, capabilities)
        self.source = source
        self.on_event = on_event
        self.events: queue.Queue[Event] = queue.Queue(maxsize=10000)
        self.sent = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self._ctx = context or zmq.Context.instance()
        self._outbox: queue.Queue[Sealed] = queue.Queue(maxsize=OUTBOX_MAX)  # sealed reports, in seq order
        self._lock = threading.Lock()  # the session: the client thread and send_report's callers
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = threading.Event()
        self._has_policy = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"avm-client-{identity.avm_id}", daemon=True)

    @property
    def endpoint(self) -> str:
        """The verifier it talks to now."""
        return self.endpoints[self.current]

    def _silence_limit(self) -> float:
        return FAILOVER_S if self.failover_s is None else self.failover_s

    @property
    def policy(self) -> dict[str, Any] | None:
        """The policy REM-S gave (with its ``version``), or None before the first."""
        return self.session.policy

    def start(self) -> AvmClient:
        """Start the client thread (again: no effect)."""
        if not self._thread.is_alive() and not self._stopping.is_set():
            self._thread.start()
        return self

    def wait_policy(self, timeout: float = 10.0) -> dict[str, Any]:
        """Block until REM-S has sent a policy; raise :class:`~vims.errors.VimsError` on timeout."""
        if not self._has_policy.wait(timeout):
            raise VimsError(f"no policy from REM-S at {self.endpoint} within {timeout:g} s "
                            "(is it running, and is this A-VM enrolled?)")
        assert self.session.policy is not None
        return self.session.policy

    def send_report(self, content: dict[str, Any], nonce: str | None = None) -> dict[str, Any] | None:
        """Stamp and sign a report and queue it (thread-safe, never blocks); return the document queued.

        None when nothing can be sent: no policy from REM-S yet, or content JSON cannot hold (both
        counted in :attr:`errors`), or :data:`OUTBOX_MAX` reports already wait to be sent (REM-S long
        unreachable: ``errors["outbox_full"]``). The client thread sends the queued frames in order.
        """
        if self._outbox.full():  # REM-S unreachable for long: refuse (counted) rather than grow
            self.errors["outbox_full"] += 1
            log.error("report not queued: %d reports wait to be sent already", OUTBOX_MAX)
            return None
        sealed = self._seal(content, nonce)
        if sealed is None:
            return None
        try:
            self._outbox.put_nowait(sealed)
        except queue.Full:  # filled by another caller meanwhile: its seq stays unused, REM-S allows gaps
            self.errors["outbox_full"] += 1
            return None
        self._wake()
        return sealed.doc

    def _seal(self, content: dict[str, Any], nonce: str | None) -> Sealed | None:
        with self._lock:
            if self.session.policy is None:  # REM-S has not answered the hello yet: nothing to sign for
                self.errors["no_policy_yet"] += 1
                return None
            try:
                return self.session.seal(content, nonce)
            except (TypeError, ValueError) as exc:  # NaN or an object JSON cannot hold: the agent's bug
                self.errors["unencodable_report"] += 1
                log.error("report not sent: %s", exc)
                return None

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(10)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> AvmClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the thread -----------------------------------------------------------------------------------

    def _deliver(self, kind: str, body: dict[str, Any]) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, body)
            except Exception:  # the agent's bug must not end the connection to REM-S
                self.errors["on_event_raised"] += 1
                log.exception("on_event(%r) raised", kind)
        else:
            with contextlib.suppress(queue.Full):
                self.events.put_nowait((kind, body))

    def _send(self, sock: zmq.Socket[Any], frame: bytes) -> None:
        try:
            sock.send(frame, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.errors["send_queue_full"] += 1
        if self._unanswered_since is None:
            self._unanswered_since = time.monotonic()

    def _produce(self, nonce: str | None) -> dict[str, Any] | None:
        assert self.source is not None
        try:
            return self.source(nonce)
        except Exception:
            self.errors["source_raised"] += 1
            log.exception("report source raised")
            return None

    def _report(self, sock: zmq.Socket[Any], content: dict[str, Any] | None, nonce: str | None) -> None:
        sealed = None if content is None else self._seal(content, nonce)
        if sealed is not None:
            self._send_report(sock, sealed)

    def _send_report(self, sock: zmq.Socket[Any], sealed: Sealed) -> None:
        with self._lock:
            frame = self.session.frame(sealed)
        self._send(sock, frame)
        self.sent += 1

    def _connect(self, poller: zmq.Poller) -> zmq.Socket[Any]:
        """A connection to the current verifier, registered in ``poller``, with the hello sent."""
        sock = dealer(self._ctx, self.identity, self.server_public, self.endpoint)
        poller.register(sock, zmq.POLLIN)
        self._unanswered_since = None
        with self._lock:
            hello = self.session.hello()
        self._send(sock, hello)
        return sock

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        sock = self._connect(poller)
        next_periodic = 0.0
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                since = self._unanswered_since
                if len(self.endpoints) > 1 and since is not None and now - since > self._silence_limit():
                    old = self.endpoint
                    poller.unregister(sock)
                    sock.close(linger=0)
                    self.current = (self.current + 1) % len(self.endpoints)
                    self.failovers += 1
                    log.warning("REM-S at %s silent for %.1f s: moving to %s", old, now - since, self.endpoint)
                    sock = self._connect(poller)
                wait = 0.2 if not (self.source and self.session.policy) else max(0.0, min(0.2, next_periodic - now))
                ready = dict(poller.poll(int(wait * 1000)))
                if self._wake_r.fileno() in ready or self._wake_r in ready:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                if sock in ready:
                    while True:
                        try:
                            frame = sock.recv(flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._unanswered_since = None
                        self._on_frame(sock, frame)
                while True:
                    try:
                        sealed = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    self._send_report(sock, sealed)
                if self.source and self.session.policy and time.monotonic() >= next_periodic:
                    next_periodic = time.monotonic() + float(self.session.policy.get("interval_s", 1.0))
                    self._report(sock, self._produce(None), None)
        finally:
            sock.close(linger=0)

    def _on_frame(self, sock: zmq.Socket[Any], frame: bytes) -> None:
        try:
            with self._lock:
                events, replies = self.session.handle(frame)
        except ProtocolError as exc:
            self.errors[exc.reason] += 1
            log.warning("unusable message from REM-S: %s", exc)
            return
        for reply in replies:
            self._send(sock, reply)
        for kind, body in events:
            if kind == "policy":
                self._has_policy.set()
                for endpoint in self.session.verifiers:  # verifiers to fail over to
                    if endpoint not in self.endpoints:
                        self.endpoints.append(endpoint)
            if kind == "nonce" and self.source is not None:
                self._report(sock, self._produce(body["nonce"]), body["nonce"])
            if kind == "error":
                log.warning("REM-S: %s: %s", body.get("reason"), body.get("detail"))
            self._deliver(kind, body)
