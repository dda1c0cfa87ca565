"""A simulated A-VM: speaks the real protocol with made-up measurements (tests, benchmark, demo).

Its knobs can be turned while it runs: ``score`` (the behaviour score it reports), ``failing_check``
(a check name reported as ``fail``), ``silent`` (stops reporting and answering nonce requests, as a
crashed or blocked A-VM would), ``collector_alive`` (False: the collector stopped), ``missing_events``
(events lost per interval, of 100 seen), ``model_sha256``, ``measurement_age_s`` (how old the
measurements it signs are: an A-VM re-signing an earlier interval's results). Its reports carry complete evidence
(``measured_at``, check times, interval counts, collector health, model digest).
"""

from __future__ import annotations

import time
from typing import Any

from vims.remote.client import AvmClient
from vims.remote.keys import AvmIdentity

#: The model digest a simulated A-VM reports.
SIMULATED_MODEL = "5" * 64


class SimulatedAvm(AvmClient):
    """An :class:`~vims.remote.client.AvmClient` whose reports come from its knobs.

    Parameters
    ----------
    identity, endpoint, server_public
        As for :class:`~vims.remote.client.AvmClient`.
    score : float
        The behaviour score to report (1 = entirely normal).
    checks : list of str
        The static checks it claims to run (each reported ``pass`` unless it is ``failing_check``).
    """

    def __init__(self, identity: AvmIdentity, endpoint: str, server_public: str, score: float | None = 0.95,
                 checks: tuple[str, ...] = ("kernel-text", "syscall-table"), **kwargs: Any) -> None:
        super().__init__(identity, endpoint, server_public,
                         capabilities={"checks": list(checks), "collectors": ["simulated"], "models": []},
                         source=self._content, **kwargs)
        self.score = score
        self.check_names = tuple(checks)
        self.failing_check: str | None = None
        self.silent = False
        self.collector_alive = True
        self.missing_events = 0
        self.model_sha256 = SIMULATED_MODEL
        self.measurement_age_s = 0.0

    def _content(self, nonce: str | None) -> dict[str, Any] | None:
        if self.silent:
            return None
        threshold = float((self.policy or {}).get("threshold", 0.5))
        now = time.time()
        lost = self.missing_events
        return {
            "measured_at": now - self.measurement_age_s,
            "behaviour": {"score": self.score, "threshold": threshold,
                          "top_processes": [] if self.score is None else
                          [{"pid": 1, "comm": "init", "score": self.score, "evidence": []}]},
            "checks": [{"check": c, "target": "simulated",
                        "status": "fail" if c == self.failing_check else "pass",
                        "detail": "simulated failure" if c == self.failing_check else None,
                        "ts_ns": time.time_ns()}
                       for c in self.check_names],
            "events": {"seen": 100, "dropped": 0, "missing": lost,
                       "interval": {"seen": 100, "dropped": 0, "missing": lost}},
            "collector": {"kind": "simulated", "answering": nonce is not None, "alive": self.collector_alive,
                          "last_batch_age_s": 0.1 if self.collector_alive else 60.0},
            "model": {"sha256": self.model_sha256, "path": "simulated.skops"},
        }
