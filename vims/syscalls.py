"""x86-64 system call names by number (Linux 6.1), from the kernel's ``unistd_64.h``.

The one table every part uses: the ``syscall-table`` check (which handler each entry should point to),
the evidence in integrity reports, the notebooks. The guest's own ``sys_call_table`` resolved through
the kernel profile is the authority where the tracer has it; this table is what the rest falls back on
(replayed captures and data sets carry numbers only).

>>> names()[0], names()[59], names()[450]
('read', 'execve', 'set_mempolicy_home_node')
>>> name(257), name(9999)
('openat', 'sys_9999')
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def names() -> tuple[str | None, ...]:
    """Every name by number (None for numbers x86-64 leaves unused)."""
    text = resources.files("vims").joinpath("syscalls_x86_64.json").read_text()
    return tuple(json.loads(text)["names"])


def name(nr: int) -> str:
    """The name of system call ``nr`` (``sys_<nr>`` when unknown)."""
    table = names()
    nr = int(nr)
    return (table[nr] if 0 <= nr < len(table) else None) or f"sys_{nr}"


#: x86-64 numbers of the calls that start a program (execve, execveat) and that end a task
#: (exit, exit_group): where every part cuts a process's calls into program runs.
EXECVE_CALLS = frozenset({59, 322})
EXIT_CALLS = frozenset({60, 231})
