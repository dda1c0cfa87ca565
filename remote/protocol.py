"""The control channel between an A-VM and REM-S: envelopes, reports, signatures.

The text below is the reference (the lead copies it into ``docs/schemas.md``).

Control channel
---------------
ZeroMQ, REM-S binds a ROUTER, each A-VM connects a DEALER; CURVE encryption, and REM-S admits only the
CURVE public keys of enrolled, unrevoked A-VMs (a ZAP handler; a refused key is counted and recorded as
``unenrolled``). REM-S knows who sent a message by the CURVE key that authenticated the connection,
never by what the message says. Each message is one frame holding one JSON object, the *envelope*
(at most 1 MiB)::

    {"v": 1, "type": "report", "sender": "avm-1", "seq": 17, "body": {...}, "sig": "<hex>"}

- ``sender``: the A-VM id (``"rem-s"`` from REM-S); ``seq``: per sender and connection, starting at 1,
  +1 per message; a receiver counts gaps. ``sig`` only on reports.
- A-VM -> REM-S: ``hello`` (body ``{"capabilities": {"checks": [...], "collectors": [...],
  "models": [...]}, "software": "..."}``), ``policy_ack`` (``{"version": N}``), ``report`` (body: the
  report document below, ``sig``: its signature).
- REM-S -> A-VM: ``policy`` (``{"vm_id", "policy": {...}, "version", "last_seq", "nonce"}``: sent after
  hello and whenever the policy changes; ``last_seq`` is the last report sequence number REM-S accepted
  from this A-VM, so a restarted A-VM continues after it), ``nonce`` (``{"nonce", "purpose":
  "connect"}``: a client is connecting; answer *now* with a report carrying this nonce), ``ack``
  (``{"seq", "accepted", "reason", "nonce"}``: the verdict on a report and the nonce to carry in the
  next one), ``error`` (``{"reason", "detail"}``: a message REM-S could not use).

Policy (body ``policy`` of a ``policy`` message; :mod:`vims.remote.policy`)
--------------------------------------------------------------------------
::

    {"checks": [{"check": "kernel-text", "every_s": 10.0}],   # static checks to run and how often;
                                                              # each must appear in every report
     "tracing": {"mode": "duty-cycle",     # the tracer's sampling policy (vims.tracing_policy):
                 "window_ms": 200, "period_ms": 1000,   # full, or window_ms of every period_ms;
                 "include": [], "exclude": [],          # program name patterns;
                 "max_events_per_s": 5000},  # a cap; events beyond it are dropped and counted
     "model_set": "default",               # the fitted model set the A-VM scores with
     "threshold": 0.5,                     # behaviour.score must be >= this to connect
     "interval_s": 1.0,                    # report at least this often
     "deadline_s": 3.0,                    # no accepted report for this long: open connections are cut
     "attest_timeout_s": 2.0,              # a connecting client waits at most this for its report
     "version": 3}                         # set by REM-S; the A-VM acknowledges it (policy_ack)

Every key may be left out (defaults as above); ``deadline_s`` must exceed ``interval_s``. REM-S lets no
client through while the A-VM has not acknowledged the current version.

Integrity report (body of a ``report`` envelope)
------------------------------------------------
::

    {"vm_id": "vm-1", "avm_id": "avm-1",
     "seq": 17,                   # per A-VM, strictly increasing (gaps allowed, never reused)
     "time": 1764240000.25,       # unix seconds when the report was made (float)
     "nonce": "9f2c...",          # the latest nonce from REM-S (hex), or the one a nonce request named
     "interval_s": 1.0,           # the reporting interval the A-VM runs under
     "policy_version": 3,         # the policy version the report was made under (must be the current one)
     "measured_at": 1764240000.0, # unix seconds when the measured interval closed
     "behaviour": {"score": 0.97, # in [0, 1]; 1 = entirely normal
                   "threshold": 0.5,  # the A-VM's own threshold (REM-S decides with the policy's)
                   "top_processes": [{"pid": 812, "comm": "nc", "score": 0.2, "evidence": ["..."]}]},
     "checks": [{"check": "kernel-text", "target": "_text", "status": "pass", "detail": null,
                 "ts_ns": 1764239995000000000}],   # ts_ns: when this result was measured (unix ns)
     "events": {"seen": 5120, "dropped": 0, "missing": 0,       # totals since the A-VM started
                "interval": {"seen": 480, "dropped": 0, "missing": 0}},   # this interval
     "collector": {"alive": true, "last_batch_age_s": 0.2, ...},   # the collector's health
     "model": {"sha256": "<64 hex>", "path": "..."}}               # the model that scored

``checks`` holds the latest result of every static check the A-VM runs (``status`` is ``pass``,
``fail`` or ``error``). Other keys are allowed and signed, and kept in the history.

Signature: Ed25519 (the A-VM's enrolled key) over ``b"vims-report-v1\\n" + canonical(report)``, where
``canonical`` is the JSON text with sorted keys, no spaces (``","`` and ``":"``), UTF-8, no NaN or
infinity, numbers as Python's :mod:`json` writes them (:func:`canonical`). ``sig`` is 128 hex digits.

REM-S refuses a report, counts it by reason and records it, and keeps serving, when it is:
``malformed`` (not JSON, not an envelope, fields missing or of the wrong type or range), ``unsigned``
(no ``sig``), ``bad_signature`` (does not verify with the sender's enrolled key), ``wrong_sender``
(``avm_id``/``vm_id`` are not those enrolled for the key that sent it), ``replayed`` (a report REM-S
already accepted), ``out_of_sequence`` (``seq`` not above the last accepted one), ``stale`` (``time``
more than the policy's ``deadline_s`` from REM-S's clock, or a ``nonce`` that REM-S did not issue to
this A-VM within ``deadline_s``, or none), ``revoked`` (the A-VM was revoked). A connecting key that is
not enrolled is refused at the handshake (``unenrolled``).

Gate decision: a connection is allowed iff the report answering its nonce is accepted (signed, fresh,
in sequence), every entry of ``checks`` is ``pass``, every check the policy names is present, and
``behaviour.score >= policy.threshold``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, TypeGuard

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20
SIGN_CONTEXT = b"vims-report-v1\n"
SERVER_ID = "rem-s"

#: Types an A-VM may send, and types REM-S sends.
AVM_TYPES = frozenset({"hello", "policy_ack", "report"})
SERVER_TYPES = frozenset({"policy", "nonce", "ack", "error"})

#: Every reason a report (or a connecting key) can be refused for.
REJECT_REASONS = ("malformed", "unsigned", "bad_signature", "wrong_sender", "replayed", "out_of_sequence",
                  "stale", "wrong_policy", "unrecorded", "revoked", "unenrolled", "not_leaseholder")

CHECK_STATUSES = frozenset({"pass", "fail", "error"})
_HEX = re.compile(r"[0-9a-f]{2,256}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ProtocolError(ValueError):
    """A message REM-S (or an A-VM) cannot use; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


#: The one JSON encoder of the protocol: sorted keys, no spaces, UTF-8 text, no NaN or infinity.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(obj: Any) -> bytes:
    """The canonical encoding that signatures cover.

    >>> canonical({"b": 1.5, "a": [1, "é"]})
    b'{"a":[1,"\\xc3\\xa9"],"b":1.5}'
    """
    return _ENCODER.encode(obj).encode("utf-8")


def _encoded(report: dict[str, Any] | bytes) -> bytes:
    """``report``'s canonical encoding: bytes are taken as already canonical (encoded once by the caller)."""
    return report if isinstance(report, bytes) else canonical(report)


def digest(report: dict[str, Any] | bytes) -> str:
    """SHA-256 of the canonical report (hex): how the history tells a replay from a new report.

    ``report`` may be its canonical bytes already (:func:`canonical`), so a caller encodes it once.
    """
    return hashlib.sha256(_encoded(report)).hexdigest()


def sign_report(report: dict[str, Any] | bytes, key: Ed25519PrivateKey) -> str:
    """The hex Ed25519 signature of ``report`` (a document, or its canonical bytes).

    >>> key = Ed25519PrivateKey.generate()
    >>> sig = sign_report({"seq": 1}, key)
    >>> verify_report({"seq": 1}, sig, key.public_key())
    >>> verify_report(canonical({"seq": 1}), sig, key.public_key())
    >>> verify_report({"seq": 2}, sig, key.public_key())
    Traceback (most recent call last):
    ...
    vims.remote.protocol.ProtocolError: bad_signature: signature does not verify
    """
    return key.sign(SIGN_CONTEXT + _encoded(report)).hex()


def verify_report(report: dict[str, Any] | bytes, sig: Any, key: Ed25519PublicKey) -> None:
    """Raise :class:`ProtocolError` (``unsigned`` or ``bad_signature``) unless ``sig`` signs ``report``.

    ``report`` is the document, or its canonical bytes (:func:`canonical`) when the caller has them.
    """
    if sig is None or sig == "":
        raise ProtocolError("unsigned", "report carries no signature")
    if not isinstance(sig, str) or len(sig) != 128:
        raise ProtocolError("bad_signature", "signature is not 128 hex digits")
    try:
        raw = bytes.fromhex(sig)
    except ValueError:
        raise ProtocolError("bad_signature", "signature is not hex") from None
    try:
        key.verify(raw, SIGN_CONTEXT + _encoded(report))
    except InvalidSignature:
        raise ProtocolError("bad_signature", "signature does not verify") from None
    except ValueError as exc:  # a value canonical() refuses (cannot happen after json.loads)
        raise ProtocolError("malformed", str(exc)) from None


def envelope(kind: str, sender: str, seq: int, body: dict[str, Any] | bytes, sig: str | None = None) -> bytes:
    """Encode one message; ``body`` may be its canonical bytes already (a report encoded once, then signed).

    The result is ``canonical`` of the whole envelope either way (``body`` sorts first among its keys).

    >>> envelope("hello", "avm-1", 1, {"capabilities": {}})
    b'{"body":{"capabilities":{}},"sender":"avm-1","seq":1,"type":"hello","v":1}'
    >>> envelope("hello", "avm-1", 1, canonical({"capabilities": {}}))
    b'{"body":{"capabilities":{}},"sender":"avm-1","seq":1,"type":"hello","v":1}'
    >>> envelope("report", "avm-1", 2, b'{"seq":1}', "ab")
    b'{"body":{"seq":1},"sender":"avm-1","seq":2,"sig":"ab","type":"report","v":1}'
    """
    head: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": kind, "sender": sender, "seq": seq}
    if sig is not None:
        head["sig"] = sig
    return b'{"body":' + _encoded(body) + b"," + _ENCODER.encode(head).encode("utf-8")[1:]


def seal_report(report: dict[str, Any], key: Ed25519PrivateKey) -> tuple[bytes, str]:
    """``(canonical bytes, hex signature)`` of ``report``: encoded once, for the signature and the frame.

    Raises ``TypeError`` or ``ValueError`` for a report JSON cannot hold (NaN, an object).

    >>> key = Ed25519PrivateKey.generate()
    >>> text, sig = seal_report({"seq": 1}, key)
    >>> msg = parse_envelope(envelope("report", "avm-1", 3, text, sig))
    >>> verify_report(msg["body"], msg["sig"], key.public_key())
    """
    text = canonical(report)
    return text, sign_report(text, key)


def _is_int(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> TypeGuard[float]:
    return (isinstance(x, int | float) and not isinstance(x, bool)) and math.isfinite(x)


def parse_envelope(frame: bytes, allowed: frozenset[str] = AVM_TYPES) -> dict[str, Any]:
    """Decode and check one message; raise :class:`ProtocolError` ``malformed`` if it is not one.

    >>> parse_envelope(envelope("hello", "avm-1", 1, {}))["type"]
    'hello'
    >>> parse_envelope(b'{"v": 1, "seq": 1e400}')
    Traceback (most recent call last):
    ...
    vims.remote.protocol.ProtocolError: malformed: not UTF-8 JSON
    >>> parse_envelope(b"\\xff")
    Traceback (most recent call last):
    ...
    vims.remote.protocol.ProtocolError: malformed: not UTF-8 JSON
    """
    if len(frame) > MAX_MESSAGE:
        raise ProtocolError("malformed", f"message of {len(frame)} bytes exceeds {MAX_MESSAGE}")
    try:
        msg = json.loads(frame.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("malformed", "not UTF-8 JSON") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", "envelope is not a JSON object")
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("malformed", f"protocol version {msg.get('v')!r}, expected {PROTOCOL_VERSION}")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in allowed:
        raise ProtocolError("malformed", f"unknown message type {kind!r}"[:200])
    if not isinstance(msg.get("sender"), str):
        raise ProtocolError("malformed", "sender is not a string")
    seq = msg.get("seq")
    if not _is_int(seq) or not 0 < seq < 2**63:
        raise ProtocolError("malformed", "seq is not a positive integer")
    if not isinstance(msg.get("body"), dict):
        raise ProtocolError("malformed", "body is not a JSON object")
    return msg


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    # 1e400 parses to infinity, which the canonical encoding (and so a signature) cannot hold.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _require(cond: bool, detail: str) -> None:
    if not cond:
        raise ProtocolError("malformed", detail)


def check_report(report: dict[str, Any]) -> dict[str, Any]:
    """Raise :class:`ProtocolError` ``malformed`` unless ``report`` has the documented form.

    >>> r = example_report()
    >>> check_report(r) is r
    True
    >>> check_report({**r, "seq": -1})
    Traceback (most recent call last):
    ...
    vims.remote.protocol.ProtocolError: malformed: seq is not a positive integer
    """
    _require(isinstance(report, dict), "report is not a JSON object")
    for key in ("vm_id", "avm_id"):
        _require(isinstance(report.get(key), str) and 0 < len(report[key]) <= 64, f"{key} is not an id")
    seq = report.get("seq")
    _require(_is_int(seq) and 0 < seq < 2**63, "seq is not a positive integer")
    _require(_is_num(report.get("time")) and report["time"] > 0, "time is not unix seconds")
    nonce = report.get("nonce")
    _require(nonce is None or (isinstance(nonce, str) and bool(_HEX.fullmatch(nonce))), "nonce is not hex or null")
    _require(_is_num(report.get("interval_s")) and report["interval_s"] > 0, "interval_s is not positive")
    pv = report.get("policy_version")
    _require(pv is None or (_is_int(pv) and pv >= 0), "policy_version is not an integer")
    beh = report.get("behaviour")
    if not isinstance(beh, dict):
        raise ProtocolError("malformed", "behaviour is not an object")
    score = beh.get("score")
    _require(score is None or (_is_num(score) and 0.0 <= score <= 1.0), "behaviour.score is not in [0, 1] or null")
    _require(_is_num(beh.get("threshold")), "behaviour.threshold is not a number")
    top = beh.get("top_processes", [])
    _require(isinstance(top, list), "behaviour.top_processes is not a list")
    for i, p in enumerate(top):
        _require(isinstance(p, dict) and _is_int(p.get("pid")) and isinstance(p.get("comm"), str)
                 and _is_num(p.get("score")) and isinstance(p.get("evidence", []), list),
                 f"behaviour.top_processes[{i}] is not {{pid, comm, score, evidence}}")
    checks = report.get("checks")
    if not isinstance(checks, list):
        raise ProtocolError("malformed", "checks is not a list")
    for i, c in enumerate(checks):
        _require(isinstance(c, dict) and isinstance(c.get("check"), str) and isinstance(c.get("target"), str),
                 f"checks[{i}] lacks check/target")
        _require(isinstance(c.get("status"), str) and c["status"] in CHECK_STATUSES,
                 f"checks[{i}].status is not pass, fail or error")
        _require(c.get("detail") is None or isinstance(c.get("detail"), str), f"checks[{i}].detail is not text")
        _require(c.get("ts_ns") is None or (_is_int(c["ts_ns"]) and 0 <= c["ts_ns"] < 2**63),
                 f"checks[{i}].ts_ns is not unix nanoseconds")
    ev: Any = report.get("events")
    _require(isinstance(ev, dict) and all(_is_int(ev.get(k)) and ev[k] >= 0 for k in ("seen", "dropped", "missing")),
             "events is not {seen, dropped, missing} counts")
    interval = ev.get("interval")
    _require(interval is None or (isinstance(interval, dict) and all(
        _is_int(interval.get(k)) and interval[k] >= 0 for k in ("seen", "dropped", "missing"))),
        "events.interval is not {seen, dropped, missing} counts")
    col: Any = report.get("collector")
    _require(isinstance(col, dict), "collector is not an object")
    _require(col.get("alive") is None or isinstance(col["alive"], bool), "collector.alive is not true/false")
    age = col.get("last_batch_age_s")
    _require(age is None or (_is_num(age) and age >= 0), "collector.last_batch_age_s is not seconds")
    measured = report.get("measured_at")
    _require(measured is None or (_is_num(measured) and measured > 0), "measured_at is not unix seconds")
    model = report.get("model")
    _require(model is None or (isinstance(model, dict) and isinstance(model.get("sha256"), str)
                               and bool(_SHA256.fullmatch(model["sha256"])) and isinstance(model.get("path"), str)),
             "model is not {sha256, path}")
    return report


def example_report(**overrides: Any) -> dict[str, Any]:
    """A healthy report (for documentation, tests and the simulated A-VM).

    >>> example_report(seq=3)["seq"]
    3
    """
    t = overrides.get("time", 1764240000.25)
    now = float(t) if _is_num(t) else 1764240000.25
    report: dict[str, Any] = {
        "vm_id": "vm-1", "avm_id": "avm-1", "seq": 1, "time": now, "nonce": None,
        "interval_s": 1.0, "measured_at": now,
        "behaviour": {"score": 0.97, "threshold": 0.5,
                      "top_processes": [{"pid": 1, "comm": "init", "score": 0.97, "evidence": []}]},
        "checks": [{"check": "kernel-text", "target": "_text", "status": "pass", "detail": None,
                    "ts_ns": int(now * 1e9)}],
        "events": {"seen": 100, "dropped": 0, "missing": 0,
                   "interval": {"seen": 100, "dropped": 0, "missing": 0}},
        "collector": {"state": "running", "alive": True, "last_batch_age_s": 0.1},
        "model": {"sha256": "0" * 64, "path": "models/default.skops"},
    }
    report.update(overrides)
    return report
