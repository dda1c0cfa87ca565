"""Static integrity checks of a running guest (``vims check``): each a small unit yielding rows.

See :mod:`vims.collector.checks.base` for the framework; one module per check. A check registers
itself when its module is imported; a new check module is added to :data:`MODULES`.
"""

import importlib

from vims.collector.checks.base import Check, Context, Reference, Row, registry, rows_table, run_checks, select

#: The check modules, in the order their checks run and are listed.
MODULES = ("kernel_text", "syscall_table", "process_binaries", "hidden_processes", "kernel_modules", "idt",
           "credentials", "hooks")
for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Check", "Context", "Reference", "Row", "registry", "rows_table", "run_checks", "select"]
