"""Moved to :mod:`vims.tracing_policy` (the core reads it: REM-S and the collector); re-exported for now."""

from vims.tracing_policy import Policy, Sampler

__all__ = ["Policy", "Sampler"]
