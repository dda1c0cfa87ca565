"""Static integrity checks of a running guest (``vims check``): each a small unit yielding rows.

See :mod:`vims.collector.checks.base` for the framework; one module per check.
"""

from vims.collector.checks.base import Check, Context, Reference, Row, registry, rows_table, run_checks, select

__all__ = ["Check", "Context", "Reference", "Row", "registry", "rows_table", "run_checks", "select"]
