"""Where the agent's reports go to REM-S: :class:`RemoteSink` (and answers to REM-S's policy and nonces)."""

from __future__ import annotations

from typing import Any

from vims.avm.agent import Agent, Report
from vims.avm.report import SESSION_KEYS


def content_of(report: Report) -> Report:
    """The part of a report that REM-S's client sends (it fills in :data:`SESSION_KEYS` itself)."""
    return {k: v for k, v in report.items() if k not in SESSION_KEYS}


class RemoteSink:
    """Send every report to REM-S through :class:`vims.remote.client.AvmClient`, answer nonce requests.

    The policy REM-S sends sets the agent's reporting interval (``interval_s``) and threshold
    (``threshold``) when it names them.
    """

    def __init__(self, agent: Agent, client: Any) -> None:
        self.agent = agent
        self.client = client
        client.on_event = self.on_event

    def __call__(self, report: Report) -> None:
        self.client.send_report(content_of(report))

    def on_event(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "policy":
            policy = body.get("policy") or {}
            if isinstance(policy.get("interval_s"), int | float) and policy["interval_s"] > 0:
                self.agent.set_interval(policy["interval_s"])
            if isinstance(policy.get("threshold"), int | float):
                self.agent.builder.threshold = float(policy["threshold"])
            self.agent.policy_version = body.get("version")
            if isinstance(policy.get("tracing"), dict) and self.agent.tracer is not None:
                from vims.tracing_policy import Policy

                # REM-S validated it with the same parser; a bad one raises here and the client counts it.
                self.agent.tracer.set_policy(Policy.from_dict(policy["tracing"], where="REM-S policy: tracing"))
            self.agent.nonce = body.get("nonce") or self.agent.nonce
        elif kind == "ack":
            self.agent.nonce = body.get("nonce") or self.agent.nonce
        elif kind == "nonce":
            # Answer at once with the latest full interval's findings (a fresh interval would be too short
            # to judge), carrying the nonce asked for.
            last = self.agent.last
            if last is None:
                last = self.agent.report()
            self.client.send_report(content_of(last), nonce=body.get("nonce"))
