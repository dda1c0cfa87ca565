"""The stamp of a report made without REM-S: :class:`LocalStamp`.

A report is its content (what :class:`~vims.avm.report.ReportBuilder` measured) plus a stamp: ``vm_id``,
``avm_id``, ``seq``, ``time``, ``nonce``, ``interval_s``, ``policy_version``. Exactly one stamper stamps
an agent's reports: this one, or, with REM-S, the REM-S session (:class:`vims.avm.remote_sink.RemoteSink`),
whose sequence numbers, nonces and policy version are the ones REM-S checks. Both add the stamp with
:func:`vims.remote.client.stamped`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from vims.remote.client import stamped

Report = dict[str, Any]


class Stamp(Protocol):
    """What stamps a report's content: ``stamp(content, nonce) -> report``."""

    def __call__(self, content: Report, nonce: str | None = None) -> Report: ...


class LocalStamp:
    """Stamp reports no REM-S session stamps: ``seq`` from 1, the nonce given (or null), no policy version.

    Parameters
    ----------
    vm_id, avm_id : str
        Who the reports are about and who makes them.
    interval_s : callable
        The reporting interval now (it may change while the agent runs).

    >>> stamp = LocalStamp("vm-1", "avm-1", lambda: 2.0)
    >>> r = stamp({"checks": []})
    >>> r["seq"], r["nonce"], r["interval_s"], r["policy_version"], stamp({"checks": []})["seq"]
    (1, None, 2.0, None, 2)
    """

    def __init__(self, vm_id: str, avm_id: str, interval_s: Callable[[], float]) -> None:
        self.vm_id = vm_id
        self.avm_id = avm_id
        self.interval_s = interval_s
        self.seq = 0

    def __call__(self, content: Report, nonce: str | None = None) -> Report:
        self.seq += 1
        return stamped(content, self.vm_id, self.avm_id, self.seq, nonce, self.interval_s(), None)
