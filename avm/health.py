"""Whether the agent's collector still delivers: ``collector.alive`` and ``collector.last_batch_age_s``."""

from __future__ import annotations

import time
from typing import Any

#: A collector is alive when its last batch came within this many reporting intervals.
ALIVE_INTERVALS = 2


def liveness(running: bool, last: list[float], interval_s: float) -> dict[str, Any]:
    """The liveness fields of a collector's health.

    Parameters
    ----------
    running : bool
        The source (tracer thread, ingest loop) is running.
    last : list of float
        Empty, or the ``time.monotonic()`` of the last batch delivered.
    interval_s : float
        The reporting interval.

    Returns
    -------
    dict
        ``alive`` (running and a batch within :data:`ALIVE_INTERVALS` intervals), ``last_batch_age_s``
        (None before the first batch), when not alive ``why_not``, and ``state`` when a running source went
        silent.
    """
    age = time.monotonic() - last[0] if last else None
    alive = running and age is not None and age <= ALIVE_INTERVALS * interval_s
    out: dict[str, Any] = {"alive": alive, "last_batch_age_s": None if age is None else round(age, 3)}
    if running and age is not None and not alive:
        out["state"] = f"silent: no batch for {age:.1f} s"
    if not alive:
        out["why_not"] = ("not running" if not running else "no batch yet" if age is None
                          else f"no batch for {age:.1f} s")
    return out
