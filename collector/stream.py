"""Arrow record batches over ZeroMQ: a sender that never blocks its caller, a receiver that counts gaps.

The wire format is one ZeroMQ multipart message per batch::

    frame 0  b"vims/1"                         protocol tag
    frame 1  JSON header                       {"sender": str, "seq": int, "kind": str, "rows": int,
                                                "dropped_batches": int, "dropped_rows": int,
                                                "source_dropped": int, "ts_ns": int}
    frame 2  Arrow IPC stream (schema + batch)

``seq`` counts the batches a sender has *accepted* (0, 1, 2, ...), so a batch that the sender had to
drop because its queue was full shows at the receiver as a gap in ``seq``; the header also carries
the sender's running totals of dropped batches and rows, so the receiver can report them by name, and
``source_dropped``: the records its source lost before they became batches (the QEMU plugin tracer's
full rings, counted per vCPU there), when the sender was given that count (``upstream_dropped``).

:class:`BatchSender` (a PUSH socket) is what a VMI callback uses: :meth:`BatchSender.send` puts the
batch in a bounded queue and returns at once; a thread drains the queue onto the socket. When the
queue is full the batch is counted as dropped (``dropped_batches``, ``dropped_rows``) and the call
still returns at once. :class:`BatchReceiver` (a PULL socket) decodes messages and counts, per
sender, the batches received and the batches missing by sequence number.

CURVE: give the sender the server's public key (and its own key pair, or one is made), and the
receiver its secret key; :func:`curve_keypair` makes keys (Z85 text). A receiver given ``allowed_keys``
admits only those sender public keys (its own ZAP handler, in a ZeroMQ context of its own; a refused
key is counted as ``unknown_key``).

A message that is not a VIMS batch never makes :meth:`BatchReceiver.recv` raise: it is dropped and
counted by reason in :attr:`BatchReceiver.refused` (``not_vims``: wrong tag or frame count;
``bad_header``: not a JSON object with ``sender`` (a name) and ``seq`` (an integer >= 0), and integer
``rows``/``dropped_batches``/``dropped_rows``/``source_dropped``/``ts_ns`` and a text ``kind`` when present;
``bad_payload``: not an Arrow IPC stream, or not ``rows`` rows; ``unknown_key``).

>>> import pyarrow as pa
>>> rx = BatchReceiver("tcp://127.0.0.1:*")
>>> tx = BatchSender(rx.endpoint, sender="vm-1")
>>> tx.send(pa.record_batch({"x": [1, 2, 3]}))
True
>>> msg = rx.recv(timeout=5.0)
>>> (msg.sender, msg.seq, msg.batch.num_rows, rx.gaps)
('vm-1', 0, 3, 0)
>>> tx.close()
{'accepted': 1, 'sent': 1, 'dropped_batches': 0, 'dropped_rows': 0}
>>> rx.close()
"""

from __future__ import annotations

import collections
import json
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import zmq
from zmq.utils import z85

from vims.errors import InputError

PROTOCOL = b"vims/1"


def curve_keypair() -> tuple[str, str]:
    """A new CURVE key pair ``(public, secret)`` as Z85 text (40 characters each)."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def _key(value: str | bytes, name: str) -> bytes:
    key = value.encode() if isinstance(value, str) else value
    if len(key) != 40:
        raise InputError(f"{name}: a CURVE key is 40 characters of Z85 text, not {len(key)}")
    return key


def encode_batch(batch: pa.RecordBatch | pa.Table) -> bytes:
    """Serialise a batch (or a table) as an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write(batch)
    return sink.getvalue().to_pybytes()


def decode_batch(payload: bytes) -> pa.Table:
    """Read an Arrow IPC stream back into a table."""
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()


class BatchSender:
    """PUSH Arrow batches to ``endpoint`` without ever blocking the caller.

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint, e.g. ``tcp://127.0.0.1:5555``.
    sender : str
        The sender id carried by every message (the VM id, for the collector).
    kind : str
        What the batches are (``event``, ``check``, ...), carried in every header.
    queue_size : int
        Batches that may wait for the network; beyond this they are dropped and counted.
    bind : bool
        Bind instead of connecting (default: connect; the receiving pipeline binds).
    server_key : str, optional
        The receiver's CURVE public key: turns on CURVE encryption.
    public_key, secret_key : str, optional
        This sender's CURVE key pair (made afresh if omitted when ``server_key`` is given).
    hwm : int
        ZeroMQ's own send high-water mark, in messages.
    upstream_dropped : callable, optional
        ``upstream_dropped() -> int``: the running total of records the source lost before they reached
        :meth:`send` (e.g. ``lambda: tracer.stats["dropped"]``), carried in every header as
        ``source_dropped``. May also be set after construction (the tracer is often made after its sender).

    Attributes
    ----------
    sent, dropped_batches, dropped_rows : int
        Batches handed to ZeroMQ; batches (and their rows) dropped because the queue was full.
    """

    def __init__(self, endpoint: str, sender: str, kind: str = "event", queue_size: int = 256,
                 bind: bool = False, server_key: str | None = None, public_key: str | None = None,
                 secret_key: str | None = None, hwm: int = 1000,
                 context: zmq.Context[Any] | None = None,
                 upstream_dropped: Callable[[], int] | None = None) -> None:
        self.endpoint = endpoint
        self.upstream_dropped = upstream_dropped
        self.sender = sender
        self.kind = kind
        self.sent = 0
        self.dropped_batches = 0
        self.dropped_rows = 0
        self._seq = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[dict[str, Any], pa.RecordBatch | pa.Table] | None] = \
            queue.Queue(maxsize=queue_size)
        self._ctx = context or zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        if server_key is not None:
            if public_key is None or secret_key is None:
                public_key, secret_key = curve_keypair()
            self._socket.curve_serverkey = _key(server_key, "server_key")
            self._socket.curve_publickey = _key(public_key, "public_key")
            self._socket.curve_secretkey = _key(secret_key, "secret_key")
        try:
            if bind:
                self._socket.bind(endpoint)
                self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close(0)
            raise InputError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from exc
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._drain, name=f"vims-push-{sender}", daemon=True)
        self._thread.start()

    def send(self, batch: pa.RecordBatch | pa.Table) -> bool:
        """Queue ``batch`` for sending; return ``False`` (and count it) if the queue is full. Never blocks."""
        with self._lock:
            header = {"sender": self.sender, "seq": self._seq, "kind": self.kind, "rows": batch.num_rows,
                      "ts_ns": time.time_ns()}
            try:
                self._queue.put_nowait((header, batch))
            except queue.Full:
                self.dropped_batches += 1
                self.dropped_rows += batch.num_rows
                # The seq is spent all the same: the receiver sees the loss as a gap.
                self._seq += 1
                return False
            self._seq += 1
            return True

    @property
    def pending(self) -> int:
        """Batches waiting in the queue."""
        return self._queue.qsize()

    def _drain(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLOUT)
        while True:
            item = self._queue.get()
            if item is None:
                return
            header, batch = item
            header["dropped_batches"] = self.dropped_batches
            header["dropped_rows"] = self.dropped_rows
            if self.upstream_dropped is not None:
                header["source_dropped"] = max(0, int(self.upstream_dropped()))
            frames = [PROTOCOL, json.dumps(header).encode(), encode_batch(batch)]
            # Wait for the peer (or HWM room) in short steps so close() is never stuck behind it.
            while True:
                if self._closing.is_set():
                    self._count_lost(header["rows"])
                    break
                if poller.poll(100):
                    try:
                        # NOBLOCK: the peer may vanish between poll and send (a refused CURVE handshake).
                        self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        continue
                    self.sent += 1
                    break

    def _count_lost(self, rows: int) -> None:
        with self._lock:
            self.dropped_batches += 1
            self.dropped_rows += rows

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait up to ``timeout`` s for the queue to empty; ``True`` if it did."""
        deadline = time.monotonic() + timeout
        while not self._idle():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _idle(self) -> bool:
        # Every accepted seq number is either on the wire or counted as dropped.
        return self.sent + self.dropped_batches >= self._seq

    def close(self, timeout: float = 5.0) -> dict[str, int]:
        """Send what is queued (for up to ``timeout`` s), count the rest as dropped, close; return counts."""
        if not self._thread.is_alive():
            return self.stats()
        self.flush(timeout)
        self._closing.set()
        # Anything still queued after the timeout is lost: count it, never lose it silently.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._count_lost(item[0]["rows"])
        self._queue.put(None)
        self._thread.join()
        self._socket.close(0)
        return self.stats()

    def stats(self) -> dict[str, int]:
        """Counts so far: ``accepted`` (seq numbers used), ``sent``, ``dropped_batches``, ``dropped_rows``."""
        return {"accepted": self._seq, "sent": self.sent, "dropped_batches": self.dropped_batches,
                "dropped_rows": self.dropped_rows}

    def __enter__(self) -> BatchSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Message:
    """One received batch and its header."""

    sender: str
    seq: int
    kind: str
    batch: pa.Table
    header: dict[str, Any] = field(default_factory=dict)
    #: Batches missing from this sender just before this one (0 when in order).
    gap: int = 0


@dataclass
class SenderStats:
    """What a receiver knows about one sender."""

    received: int = 0
    rows: int = 0
    gaps: int = 0
    next_seq: int = 0
    #: The sender's own count of batches it dropped (queue full), from its latest header.
    dropped_batches: int = 0
    dropped_rows: int = 0
    #: Records the sender's source lost before batching (e.g. full plugin rings), from its latest header.
    source_dropped: int = 0


class BatchReceiver:
    """PULL Arrow batches and count, per sender, the ones missing by sequence number.

    Parameters
    ----------
    endpoint : str
        Where to listen (``tcp://127.0.0.1:*`` picks a free port; see :attr:`endpoint`).
    bind : bool
        Bind (default) or connect.
    secret_key : str, optional
        This receiver's CURVE secret key: turns on CURVE (the sender needs the matching public key).
    allowed_keys : list of str, optional
        CURVE public keys (Z85) of the senders allowed to connect (default: any sender that knows our key).
    max_message : int
        Largest message accepted, in bytes (ZeroMQ drops the connection of a peer that sends more).

    Attributes
    ----------
    senders : dict of str to SenderStats
        Per-sender counts; :attr:`gaps` sums their gaps.
    rejected : int
        Messages that were not VIMS batches (bad tag, header or payload); counted and skipped.
    refused : collections.Counter
        The same, and refused CURVE keys, by reason (see the module text).
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:*", bind: bool = True, secret_key: str | None = None,
                 allowed_keys: list[str] | None = None, hwm: int = 1000, max_message: int = 64 << 20,
                 context: zmq.Context[Any] | None = None) -> None:
        self.refused: collections.Counter[str] = collections.Counter()
        self.rejected = 0
        self.senders: dict[str, SenderStats] = {}
        self._zap: _Zap | None = None
        own = allowed_keys is not None and context is None  # one ZAP handler per context: our own
        self._own_ctx = zmq.Context() if own else None
        self._ctx = self._own_ctx or context or zmq.Context.instance()
        if allowed_keys is not None:
            if secret_key is None:
                raise InputError("allowed_keys needs secret_key (the allow-list is enforced by CURVE)")
            self._zap = _Zap(self._ctx, {_key(k, "allowed_keys") for k in allowed_keys}, self.refused)
        self._socket = self._ctx.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, max_message)
        if secret_key is not None:
            self._socket.curve_server = True
            self._socket.curve_secretkey = _key(secret_key, "secret_key")
            if self._zap is not None:
                self._socket.zap_domain = b"vims-batches"
        try:
            if bind:
                self._socket.bind(endpoint)
                endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                self._socket.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise InputError(f"cannot {'bind' if bind else 'connect'} {endpoint}: {exc}") from exc
        #: The endpoint actually bound (with the port chosen when ``*`` was asked for).
        self.endpoint = endpoint

    @property
    def gaps(self) -> int:
        """Batches missing, summed over senders."""
        return sum(s.gaps for s in self.senders.values())

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next batch, or ``None`` after ``timeout`` seconds (``None``: wait for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._socket.poll(None if left is None else int(left * 1000)):
                return None
            frames = self._socket.recv_multipart()
            message = self._decode(frames)
            if message is not None:
                return message
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _refuse(self, reason: str) -> None:
        self.rejected += 1
        self.refused[reason] += 1

    def _decode(self, frames: list[bytes]) -> Message | None:
        if len(frames) != 3 or frames[0] != PROTOCOL:
            self._refuse("not_vims")
            return None
        header = _header(frames[1])
        if header is None:
            self._refuse("bad_header")
            return None
        try:
            batch = decode_batch(frames[2])
        except Exception:  # whatever a corrupt Arrow stream raises
            self._refuse("bad_payload")
            return None
        if header.setdefault("rows", batch.num_rows) != batch.num_rows:
            self._refuse("bad_payload")
            return None
        sender, seq = header["sender"], header["seq"]
        stats = self.senders.setdefault(sender, SenderStats())
        gap = 0
        if seq >= stats.next_seq:
            gap = seq - stats.next_seq
            stats.next_seq = seq + 1
        # else: a late or repeated batch (a restarted sender starts again at 0); no gap to count.
        stats.gaps += gap
        stats.received += 1
        stats.rows += batch.num_rows
        stats.dropped_batches = header.get("dropped_batches", 0)
        stats.dropped_rows = header.get("dropped_rows", 0)
        stats.source_dropped = header.get("source_dropped", 0)
        return Message(sender, seq, header["kind"], batch, header, gap)

    def __iter__(self) -> Any:
        """Received messages, for ever."""
        while True:
            message = self.recv()
            if message is not None:
                yield message

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-sender counts as plain dicts (for ``--json`` reports)."""
        return {name: vars(s).copy() for name, s in self.senders.items()}

    def close(self) -> None:
        if getattr(self, "_socket", None) is not None:
            self._socket.close(0)
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
        if self._own_ctx is not None:
            self._own_ctx.term()
            self._own_ctx = None

    def __enter__(self) -> BatchReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _header(raw: bytes) -> dict[str, Any] | None:
    """The header of a batch message, or None when it is not a valid one."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    sender = header.get("sender")
    if not isinstance(sender, str) or not 0 < len(sender) <= 128:
        return None
    if not _count(header.get("seq")) or ("rows" in header and not _count(header["rows"])):
        return None
    header.setdefault("kind", "")
    if not isinstance(header["kind"], str):
        return None
    if not all(_count(header[k]) for k in ("dropped_batches", "dropped_rows", "source_dropped", "ts_ns")
               if k in header):
        return None
    return header


class _Zap:
    """A ZAP handler (a thread) admitting only the CURVE keys in ``keys``; refusals go to ``refused``."""

    def __init__(self, ctx: zmq.Context[Any], keys: set[bytes], refused: collections.Counter[str]) -> None:
        self.keys = keys
        self.refused = refused
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind("inproc://zeromq.zap.01")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vims-batch-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            frames = self._sock.recv_multipart()
            version, request_id = [*frames, b"", b""][:2]
            key = z85.encode(frames[6]) if len(frames) == 7 and frames[5] == b"CURVE" else b""
            if key and key in self.keys:
                self._sock.send_multipart([version, request_id, b"200", b"OK", key, b""])
            else:
                self.refused["unknown_key"] += 1
                self._sock.send_multipart([version, request_id, b"400", b"key not allowed", b"", b""])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
