"""REM-S's counters, served as Prometheus text on a loopback HTTP endpoint (``GET /metrics``).

Series:

- ``vims_reports_accepted_total{vm}``; ``vims_reports_rejected_total{reason}``
- ``vims_decisions_total{kind}`` (allow, deny, cut); ``vims_open_connections``
- ``vims_report_latency_seconds``: from a nonce request to the accepted report that carries it
- ``vims_decision_latency_seconds``: from a client's connect to the gate's decision
- ``vims_frame_gaps_total``: sequence gaps seen on the control channel
- ``vims_history_writable`` (1/0), ``vims_history_write_failures_total``: the history writer's health
- ``vims_metrics_refused_total``: metrics connections beyond the cap, closed at once
- ``vims_gate_listening{vm}`` (1/0), ``vims_gate_bind_failures_total{vm}``: a gate whose port is taken
- ``vims_gate_refused_total{reason}``: gate connections refused before any decision (``busy``: the VM's cap)
- ``vims_history_pruned_total{what}``: rows deleted and documents dropped by the retention policy
- ``vims_leases_held``: the A-VMs whose lease this verifier holds
- ``vims_store_listening`` (1/0), ``vims_store_notifications_total``: the store's notifications
  (PostgreSQL), and how many arrived

Every series of a verifier carries its ``verifier`` label (``Metrics(labels={"verifier": ID})``, as
REM-S makes it), so the metrics of several verifiers over one store add up and compare in Prometheus
without relying on the scrape target's ``instance``.

>>> m = Metrics(labels={"verifier": "v1"})
>>> m.inc("vims_reports_rejected_total", reason="replayed")
>>> m.observe("vims_report_latency_seconds", 0.003)
>>> text = m.render()
>>> 'vims_reports_rejected_total{reason="replayed",verifier="v1"} 1' in text
True
>>> 'vims_report_latency_seconds_bucket{le="0.005",verifier="v1"} 1' in text
True
>>> m.line("vims_open_connections") + " 0" in text
True
"""

from __future__ import annotations

import asyncio
import bisect
from collections import defaultdict

#: Series without labels, shown as 0 before their first change.
UNLABELLED = frozenset({"vims_open_connections", "vims_frame_gaps_total", "vims_internal_errors_total",
                        "vims_history_writable", "vims_history_write_failures_total"})

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HELP = {
    "vims_reports_accepted_total": ("counter", "Integrity reports accepted, by VM."),
    "vims_reports_rejected_total": ("counter", "Reports (and connecting keys) refused, by reason."),
    "vims_decisions_total": ("counter", "Gate decisions, by kind (allow, deny, cut)."),
    "vims_open_connections": ("gauge", "Client connections currently relayed."),
    "vims_frame_gaps_total": ("counter", "Sequence-number gaps seen on the control channel."),
    "vims_internal_errors_total": ("counter", "Messages whose handling hit a bug (the server carried on)."),
    "vims_history_writable": ("gauge", "1 while REM-S's history can be written; 0: new connections refused."),
    "vims_history_write_failures_total": ("counter", "Failed attempts to write the history."),
    "vims_metrics_refused_total": ("counter", "Metrics connections closed at once (too many at a time)."),
    "vims_gate_listening": ("gauge", "1 while the VM's gate listens; 0: its port could not be bound."),
    "vims_gate_bind_failures_total": ("counter", "Gate ports that could not be bound, by VM (once per error)."),
    "vims_gate_refused_total": ("counter", "Gate connections refused before a decision, by reason."),
    "vims_history_pruned_total": ("counter", "History rows deleted and documents dropped by retention."),
    "vims_leases_held": ("gauge", "A-VMs whose lease this verifier holds."),
    "vims_store_listening": ("gauge", "1 while the store's notifications arrive; 0: data_version is polled."),
    "vims_store_notifications_total": ("counter", "Notifications of the store (PostgreSQL) received."),
    "vims_report_latency_seconds": ("histogram", "Nonce request to accepted report carrying it."),
    "vims_decision_latency_seconds": ("histogram", "Client connect to gate decision."),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Counters, gauges and histograms kept in memory (one REM-S process).

    Parameters
    ----------
    max_clients : int
        The most scrapers served at once; more are closed at once (``vims_metrics_refused_total``).
    request_timeout_s : float
        How long one scrape may take.
    labels : dict of str to str, optional
        Labels every series carries (REM-S: ``verifier``), added when rendered; :meth:`inc`, :meth:`set`
        and :meth:`get` name only a series' own labels.
    """

    def __init__(self, max_clients: int = 32, request_timeout_s: float = 5.0,
                 labels: dict[str, str] | None = None) -> None:
        self.labels = dict(labels or {})
        self.max_clients = max_clients
        self.request_timeout_s = request_timeout_s
        self._clients = 0
        self.values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self.hist: dict[str, list[float]] = {}  # bucket counts + [sum, count]

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self.values[name]
        series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self.values[name][tuple(sorted(labels.items()))] = value

    def get(self, name: str, **labels: str) -> float:
        return self.values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def observe(self, name: str, value: float) -> None:
        h = self.hist.setdefault(name, [0.0] * (len(BUCKETS) + 2))
        i = bisect.bisect_left(BUCKETS, value)
        if i < len(BUCKETS):
            h[i] += 1
        h[-2] += value
        h[-1] += 1

    def line(self, name: str, **labels: str) -> str:
        """How the series ``name`` with ``labels`` (and :attr:`labels`) starts its line in :meth:`render`."""
        return f"{name}{_labels({**labels, **self.labels})}"

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []
        for name in sorted(set(self.values) | set(self.hist) | set(HELP)):
            kind, text = HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            if name in self.hist or kind == "histogram":
                h = self.hist.get(name, [0.0] * (len(BUCKETS) + 2))
                running = 0.0
                for bound, count in zip(BUCKETS, h, strict=False):
                    running += count
                    lines.append(f"{self.line(name + '_bucket', le=str(bound))} {running:g}")
                lines += [f"{self.line(name + '_bucket', le='+Inf')} {h[-1]:g}",
                          f"{self.line(name + '_sum')} {h[-2]:.6f}", f"{self.line(name + '_count')} {h[-1]:g}"]
                continue
            series = self.values.get(name) or ({(): 0.0} if name in UNLABELLED else {})
            for key, value in sorted(series.items()):
                lines.append(f"{self.line(name, **dict(key))} {value:g}")
        return "\n".join(lines) + "\n"

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        """Start the HTTP endpoint; ``server.sockets[0].getsockname()[1]`` is the port."""
        return await asyncio.start_server(self._handle, host, port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= self.max_clients:  # a cap on concurrent scrapers: the rest are closed at once
            self.inc("vims_metrics_refused_total")
            writer.close()
            return
        self._clients += 1
        try:
            # One timeout for the whole request (a slow sender cannot restart it line by line).
            request = await asyncio.wait_for(_read_request(reader), self.request_timeout_s)
            parts = request.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] in (b"/metrics", b"/"):
                body, status = self.render().encode(), b"200 OK"
            else:
                body, status = b"not found: GET /metrics\n", b"404 Not Found"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            await asyncio.wait_for(writer.drain(), self.request_timeout_s)
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._clients -= 1
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """The request line; the headers are read and dropped (nothing in them matters)."""
    request = await reader.readline()
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass
    return request
