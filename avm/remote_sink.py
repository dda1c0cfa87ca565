"""Where the agent's reports go to REM-S: :class:`RemoteSink` (and answers to REM-S's policy and nonces)."""

from __future__ import annotations

from typing import Any

from vims.avm.agent import Agent
from vims.avm.stamp import Report


class RemoteSink:
    """Stamp every report with the REM-S session and send it (:class:`vims.remote.client.AvmClient`).

    Made, it becomes the agent's stamp (:attr:`Agent.stamp`): the session's seq, nonce and policy version
    stamp each report, which is signed and queued at once, so the agent's sinks see the very document
    sent. Before REM-S's first policy (nothing can be sent), the agent's own stamp stamps it. It answers
    REM-S's nonce requests; the policy REM-S sends sets the agent's reporting interval (``interval_s``)
    and threshold (``threshold``) when it names them.
    """

    def __init__(self, agent: Agent, client: Any) -> None:
        self.agent = agent
        self.client = client
        self.local = agent.stamp
        agent.stamp = self.stamp
        client.on_event = self.on_event

    def stamp(self, content: Report, nonce: str | None = None) -> Report:
        """The report sent to REM-S (stamped by its session), or, when none could be, a local one."""
        sent = self.client.send_report(content, nonce)
        return sent if sent is not None else self.local(content, nonce)

    def on_event(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "policy":
            policy = body.get("policy") or {}
            if isinstance(policy.get("interval_s"), int | float) and policy["interval_s"] > 0:
                self.agent.set_interval(policy["interval_s"])
            if isinstance(policy.get("checks"), list):
                self.agent.check_plan = [c for c in policy["checks"] if isinstance(c, dict) and "check" in c]
            if isinstance(policy.get("threshold"), int | float):
                self.agent.builder.threshold = float(policy["threshold"])
            if isinstance(policy.get("tracing"), dict) and self.agent.tracer is not None:
                from vims.tracing_policy import Policy

                # REM-S validated it with the same parser; a bad one raises here and the client counts it.
                self.agent.tracer.set_policy(Policy.from_dict(policy["tracing"], where="REM-S policy: tracing"))
        elif kind == "nonce":
            # Answer at once with the latest full interval's findings (a fresh interval would be too short
            # to judge), carrying the nonce asked for.
            content = self.agent.last_content
            if content is None:
                self.agent.report(nonce=body.get("nonce"))
            else:
                self.stamp(content, body.get("nonce"))
