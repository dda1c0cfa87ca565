"""The policy REM-S gives an A-VM, and the gate's decision on a report.

Policy document (JSON; REM-S adds ``version`` when it stores one; the text belongs in
``docs/schemas.md``)::

    {"checks": [{"check": "kernel-text", "every_s": 10.0}],   # static checks to run, how often;
                                                              # each must appear in every report
     "tracing": {"mode": "duty-cycle",    # the tracer's sampling policy (vims.tracing_policy):
                 "window_ms": 200,        # "full", or "duty-cycle": trace window_ms of every period_ms;
                 "period_ms": 1000,       # "include"/"exclude": program name patterns;
                 "max_events_per_s": 5000},   # a cap; events beyond it are dropped and counted
     "model_set": "default",              # the name of the fitted model set the A-VM scores with
     "threshold": 0.5,                    # behaviour.score must be >= this to connect
     "interval_s": 1.0,                   # report at least this often
     "deadline_s": 3.0,                   # an open connection is cut when no accepted report is newer
     "attest_timeout_s": 2.0,             # a connecting client waits at most this for its report
     "max_missing_share": 0.05,           # events.interval dropped + missing at most this share of seen
     "check_slack_s": 2.0,                # a check result may be every_s + this old (or this far ahead)
     "max_measurement_age_s": 5.0,        # measured_at at most this old when REM-S receives the report
     "models": [],                        # allowed model.sha256 digests (empty: any model)
     "history_days": 30.0,                # REM-S keeps this VM's reports and decisions this long,
     "history_documents": 1000}           # and the signed documents of only its latest this many

The evidence a report must carry to pass (else it is refused with the reason): a ``behaviour.score``
(null means no scored windows: "no behaviour evidence"), ``collector.alive`` true, the interval's event
counts with at most ``max_missing_share`` lost, every check the policy names with a ``ts_ns`` no older
than its ``every_s`` plus ``check_slack_s``, a ``measured_at`` no older than
``max_measurement_age_s`` and a ``model.sha256`` (one of ``models`` when the policy pins them).

Every key is optional; missing ones take :data:`DEFAULT_POLICY`'s value.

>>> p = normalise_policy({"threshold": 0.8})
>>> p["threshold"], p["interval_s"], p["tracing"]["mode"]
(0.8, 1.0, 'duty-cycle')
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from vims.errors import InputError
from vims.tracing_policy import Policy

_SHA256 = re.compile(r"[0-9a-f]{64}")

DEFAULT_POLICY: dict[str, Any] = {
    "checks": [{"check": "kernel-text", "every_s": 10.0}],
    "tracing": {"mode": "duty-cycle", "window_ms": 200, "period_ms": 1000, "max_events_per_s": 5000},
    "model_set": "default",
    "threshold": 0.5,
    "interval_s": 1.0,
    "deadline_s": 3.0,
    "attest_timeout_s": 2.0,
    "max_missing_share": 0.05,
    "check_slack_s": 2.0,
    "max_measurement_age_s": 5.0,
    "models": [],
    "history_days": 30.0,
    "history_documents": 1000,
}


def _num(obj: dict[str, Any], key: str, where: str, lo: float = 0.0, hi: float = math.inf,
         open_lo: bool = True) -> float:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{key} is not a number: {value!r}", where=where)
    if value < lo or (open_lo and value == lo) or value > hi:
        raise InputError(f"{key} = {value} is out of range", where=where)
    return float(value)


def normalise_policy(policy: Any, where: str = "policy") -> dict[str, Any]:
    """Fill defaults into ``policy`` and validate it; raise :class:`~vims.errors.InputError` naming the field.

    >>> normalise_policy({"deadline_s": 0.5, "interval_s": 1.0})
    Traceback (most recent call last):
    ...
    vims.errors.InputError: policy: deadline_s (0.5) must exceed interval_s (1.0)
    >>> normalise_policy({"tracing": {"mode": "sometimes"}})
    Traceback (most recent call last):
    ...
    vims.errors.InputError: policy: tracing: field 'mode': must be one of 'full', 'duty-cycle', not 'sometimes'
    """
    if not isinstance(policy, dict):
        raise InputError("a policy is a JSON object", where=where)
    unknown = set(policy) - set(DEFAULT_POLICY) - {"version"}
    if unknown:
        raise InputError(f"unknown policy keys: {', '.join(sorted(unknown))}", where=where)
    out = copy.deepcopy(DEFAULT_POLICY)
    for key, value in policy.items():
        if key == "tracing" and isinstance(value, dict):
            out["tracing"].update(value)  # missing tracing keys keep the defaults too
        elif key != "version":
            out[key] = copy.deepcopy(value)
    # The tracer's own document, checked by the tracer's own parser: what REM-S accepts, the A-VM applies.
    out["tracing"] = Policy.from_dict(out["tracing"], where=f"{where}: tracing").to_dict()
    if "version" in policy:
        out["version"] = policy["version"]
    if not isinstance(out["model_set"], str) or not out["model_set"]:
        raise InputError("model_set is not a name", where=where)
    out["threshold"] = _num(out, "threshold", where, 0.0, 1.0, open_lo=False)
    for key in ("interval_s", "deadline_s", "attest_timeout_s", "max_measurement_age_s"):
        out[key] = _num(out, key, where)
    out["max_missing_share"] = _num(out, "max_missing_share", where, 0.0, 1.0, open_lo=False)
    out["check_slack_s"] = _num(out, "check_slack_s", where, 0.0, open_lo=False)
    out["history_days"] = _num(out, "history_days", where)
    docs = out["history_documents"]
    if isinstance(docs, bool) or not isinstance(docs, int) or docs < 0:
        raise InputError(f"history_documents is not a count: {docs!r}", where=where)
    models = out["models"]
    if not isinstance(models, list) or not all(isinstance(m, str) and _SHA256.fullmatch(m) for m in models):
        raise InputError("models is not a list of SHA-256 digests (64 lowercase hex digits)", where=where)
    if out["deadline_s"] <= out["interval_s"]:
        raise InputError(f"deadline_s ({out['deadline_s']}) must exceed interval_s ({out['interval_s']})",
                         where=where)
    checks = out["checks"]
    if not isinstance(checks, list):
        raise InputError("checks is not a list", where=where)
    for i, c in enumerate(checks):
        if not isinstance(c, dict) or not isinstance(c.get("check"), str) or set(c) - {"check", "every_s"}:
            raise InputError(f"checks[{i}] is not {{check, every_s}}", where=where)
        c.setdefault("every_s", 10.0)
        _num(c, "every_s", f"{where}: checks[{i}]")
    return out


def retention(policy: dict[str, Any]) -> tuple[float, int]:
    """How long a VM's history is kept and how many signed documents: ``(history_days, history_documents)``
    of its (normalised) policy, as :meth:`~vims.remote.store.Store.prune` takes them.

    >>> retention(DEFAULT_POLICY)
    (30.0, 1000)
    """
    return float(policy["history_days"]), int(policy["history_documents"])


def evaluate(report: dict[str, Any], policy: dict[str, Any], now: float | None = None) -> tuple[bool, str]:
    """The gate's verdict on an accepted report: ``(allowed, reason)``; ``reason`` is one line.

    ``now`` is REM-S's clock (unix s) when the report arrived (default: the report's own ``time``).

    >>> from vims.remote.protocol import example_report
    >>> evaluate(example_report(), normalise_policy({}))
    (True, 'score 0.970 >= 0.500, 1 check(s) pass')
    >>> bad = example_report(behaviour={"score": 0.1, "threshold": 0.5,
    ...     "top_processes": [{"pid": 7, "comm": "nc", "score": 0.1, "evidence": []}]})
    >>> evaluate(bad, normalise_policy({}))
    (False, 'behaviour score 0.100 < threshold 0.500 (worst: nc pid 7)')
    >>> evaluate(example_report(), normalise_policy({"checks": [{"check": "syscall-table"}]}))
    (False, 'check syscall-table missing from the report')
    >>> evaluate(example_report(behaviour={"score": None, "threshold": 0.5}), normalise_policy({}))
    (False, 'no behaviour evidence (no scored windows)')
    """
    now = float(report["time"]) if now is None else now
    missing = _missing_evidence(report, policy, now) or _failing_checks(report, policy, now)
    if missing:
        return False, one_line(missing)
    score = float(report["behaviour"]["score"])
    threshold = float(policy["threshold"])
    if score < threshold:
        top = report["behaviour"].get("top_processes") or []
        worst = min(top, key=lambda p: p["score"], default=None)
        who = f" (worst: {worst['comm']} pid {worst['pid']})" if worst else ""
        return False, one_line(f"behaviour score {score:.3f} < threshold {threshold:.3f}{who}")
    return True, f"score {score:.3f} >= {threshold:.3f}, {len(report['checks'])} check(s) pass"


def _missing_evidence(report: dict[str, Any], policy: dict[str, Any], now: float) -> str | None:
    """Why the report lacks the evidence the policy demands (None: it has it)."""
    collector = report.get("collector") or {}
    if collector.get("alive") is not True:
        age = collector.get("last_batch_age_s")
        since = f", last batch {age:.1f} s ago" if isinstance(age, int | float) else ""
        return ("collector not alive" if "alive" in collector else "report does not say the collector is alive") \
            + since
    interval = (report.get("events") or {}).get("interval")
    if not isinstance(interval, dict):
        return "report carries no event counts for its interval (events.interval)"
    seen, lost = interval["seen"], interval["dropped"] + interval["missing"]
    if lost and (seen == 0 or lost / seen > policy["max_missing_share"]):
        return (f"{lost} of {seen} events dropped or missing in the interval "
                f"(limit {policy['max_missing_share']:.0%})")
    if report["behaviour"].get("score") is None:
        return "no behaviour evidence (no scored windows)"
    measured = report.get("measured_at")
    if measured is None:
        return "report does not say when it was measured (measured_at)"
    if now - measured > policy["max_measurement_age_s"] or measured - now > policy["check_slack_s"]:
        return f"measurement made {now - measured:.1f} s ago (limit {policy['max_measurement_age_s']:g} s)"
    model = report.get("model")
    if not isinstance(model, dict):
        return "report names no model (model.sha256)"
    if policy["models"] and model["sha256"] not in policy["models"]:
        return f"model {model['sha256'][:16]}... is not one the policy allows"
    return None


def _failing_checks(report: dict[str, Any], policy: dict[str, Any], now: float) -> str | None:
    if not report["checks"] and policy["checks"]:
        return "report carries no check results"
    for c in report["checks"]:
        if c["status"] != "pass":
            detail = f": {c['detail']}" if c.get("detail") else ""
            return f"check {c['check']} {c['status']} on {c['target']}{detail}"
    latest: dict[str, int | None] = {}
    for c in report["checks"]:
        ts = c.get("ts_ns")
        if c["check"] not in latest or (ts is not None and ts > (latest[c["check"]] or -1)):
            latest[c["check"]] = ts
    slack = policy["check_slack_s"]
    for c in policy["checks"]:
        if c["check"] not in latest:
            return f"check {c['check']} missing from the report"
        ts = latest[c["check"]]
        if ts is None:
            return f"check {c['check']} result carries no time (ts_ns)"
        age = now - ts / 1e9
        if age > c["every_s"] + slack:
            return f"check {c['check']} result is {age:.1f} s old (limit {c['every_s'] + slack:g} s)"
        if age < -slack:
            return f"check {c['check']} result is dated {-age:.1f} s in the future"
    return None


def one_line(text: str, limit: int = 200) -> str:
    """One printable line of at most ``limit`` characters (reasons go to clients and logs)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
