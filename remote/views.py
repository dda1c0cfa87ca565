"""What REM-S's history shows, built once: the CLI's ``--json`` and the web console both call these.

- :func:`fleet`: every enrolled A-VM with its state (``allowed``/``refused``/``revoked``/``unknown``),
  last report, last decision and its lease (which verifier holds it, since when), the verifiers sharing
  the store, and the totals (``vims remote status --json``);
- :func:`history`: one VM's latest reports and decisions, paged by id (``vims remote history --json``);
- :func:`vm_detail`: one VM's latest signed evidence (its least normal processes, its check results);
- :func:`decisions`: the decisions on every VM, searchable (``vims remote decisions --json``).
"""

from __future__ import annotations

import json
from typing import Any

from vims.remote.store import Store


def _state(row: dict[str, Any]) -> str:
    """allowed / refused / revoked / unknown, from the A-VM's last report and the VM's last decision."""
    if row["revoked"]:
        return "revoked"
    rep, dec = row["last_report"], row["last_decision"]
    refused_since = dec is not None and dec["kind"] in ("deny", "cut")
    if refused_since and (rep is None or rep["received_at"] <= dec["time"] or rep["verdict"] != "allow"):
        return "refused"
    if rep is None:
        return "unknown"
    if rep["status"] != "accepted" or rep["verdict"] != "allow":
        return "refused"
    return "allowed"


#: What each A-VM's ``lease`` shows of :meth:`Store.leases`'s row (ages by the database's clock).
LEASE_FIELDS = ("verifier_id", "endpoint", "generation", "age_s", "renewed_s_ago", "expires_in_s", "expired")


def _verifier_state(row: dict[str, Any]) -> str:
    """live / stopped (cleanly, leases given up) / silent (no heartbeat within its lease period)."""
    if row["stopped_at"] is not None:
        return "stopped"
    return "live" if row["heartbeat_s_ago"] <= row["lease_s"] else "silent"


def fleet(store: Store) -> dict[str, Any]:
    """Every enrolled A-VM (``avms``), the verifier processes sharing the store (``verifiers``) and the
    ``totals`` of reports and decisions.

    Each A-VM row has its ``state`` and its ``lease``: the verifier holding it (``verifier_id``, its
    ``endpoint``), ``generation`` (changes of holder), ``age_s`` (held by that verifier since),
    ``renewed_s_ago``, ``expires_in_s`` and ``expired``; None when no verifier ever took it. Each verifier
    row: ``verifier_id``, ``endpoint``, ``host``, ``pid``, ``lease_s``, ``heartbeat_s_ago``, ``stopped_at``,
    ``leases`` (held unexpired) and ``state`` (``live``, ``stopped`` or ``silent``).
    """
    rows = store.status()
    leases = {r["avm_id"]: {k: r[k] for k in LEASE_FIELDS} for r in store.leases()}
    for r in rows:
        r["state"] = _state(r)
        r["lease"] = leases.get(r["avm_id"])
    verifiers = store.verifiers()
    for v in verifiers:
        v["state"] = _verifier_state(v)
    return {"avms": rows, "verifiers": verifiers, "totals": store.counts()}


def history(store: Store, vm_id: str, limit: int = 50, before: int | None = None) -> dict[str, Any]:
    """The latest ``limit`` reports and decisions of ``vm_id`` (newest first), of ids below ``before``."""
    return store.history(vm_id, limit, before)


def vm_detail(store: Store, vm_id: str) -> dict[str, Any]:
    """What the VM's A-VM last signed: its score and threshold, least normal processes, check results."""
    row = store.latest_document(vm_id)
    out: dict[str, Any] = {"vm_id": vm_id, "report_id": None, "received_at": None, "measured_at": None,
                           "score": None, "threshold": None, "top_processes": [], "checks": [],
                           "failing_checks": []}
    if row is None:
        return out
    try:
        doc = json.loads(row["document"])
    except ValueError:
        return out
    behaviour = doc.get("behaviour") if isinstance(doc.get("behaviour"), dict) else {}
    checks = [c for c in doc.get("checks") or [] if isinstance(c, dict)]
    out.update(report_id=row["id"], received_at=row["received_at"], measured_at=doc.get("measured_at"),
               score=behaviour.get("score"), threshold=behaviour.get("threshold"),
               top_processes=[p for p in behaviour.get("top_processes") or [] if isinstance(p, dict)],
               checks=[{"check": c.get("check"), "target": c.get("target"), "status": c.get("status"),
                        "detail": c.get("detail"),
                        "at": c["ts_ns"] / 1e9 if isinstance(c.get("ts_ns"), int) else None} for c in checks],
               failing_checks=[str(c.get("check")) for c in checks if c.get("status") not in ("pass", "ok")])
    return out


def decisions(store: Store, search: str = "", limit: int = 100) -> dict[str, Any]:
    """The latest ``limit`` decisions on any VM whose VM, kind, reason, connection or peer holds ``search``."""
    return {"search": search, "decisions": store.decisions(search, limit)}
