"""System call names by number, per ABI: x86-64 (Linux 6.1, ``unistd_64.h``) and 32-bit x86 (``unistd_32.h``).

The one table every part uses: the ``syscall-table`` check (which handler each entry should point to),
the evidence in integrity reports, ``vims score --explain``, the notebooks. The guest's own
``sys_call_table`` resolved through the kernel profile is the authority where the tracer has it; this
table is what the rest falls back on (replayed captures and data sets carry numbers only). ADFA-LD
traces use the 32-bit x86 numbering (``abi="i386"``); UNM's SunOS numbers have their own map
(:func:`vims.datasets.unm.syscall_map`).

>>> names()[0], names()[59], names()[450]
('read', 'execve', 'set_mempolicy_home_node')
>>> name(257), name(9999)
('openat', 'sys_9999')
>>> name(11, abi="i386"), name(102, abi="i386"), name(11)
('execve', 'socketcall', 'munmap')
>>> number("openat"), number("sys_257"), number(59)
(257, 257, 59)
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from vims.errors import InputError

#: The ABIs with a table, and the file each is read from.
ABIS = {"x86_64": "syscalls_x86_64.json", "i386": "syscalls_i386.json"}


@cache
def names(abi: str = "x86_64") -> tuple[str | None, ...]:
    """Every name by number in ``abi`` (``"x86_64"`` or ``"i386"``; None for numbers it leaves unused)."""
    if abi not in ABIS:
        raise InputError(f"unknown system call ABI {abi!r} (known: {', '.join(ABIS)})")
    text = resources.files("vims").joinpath(ABIS[abi]).read_text()
    return tuple(json.loads(text)["names"])


def name(nr: int, abi: str = "x86_64") -> str:
    """The name of system call ``nr`` in ``abi`` (``sys_<nr>`` when unknown)."""
    table = names(abi)
    nr = int(nr)
    return (table[nr] if 0 <= nr < len(table) else None) or f"sys_{nr}"


def number(call: str | int, abi: str = "x86_64") -> int:
    """The number of system call ``call``: a name of ``abi`` (``"openat"``, or ``"sys_257"`` as
    :func:`name` writes a number it has no name for) or a number (0-4095); an
    :class:`~vims.errors.InputError` names a call it does not know.

    >>> number("open_at")
    Traceback (most recent call last):
    ...
    vims.errors.InputError: unknown system call 'open_at' (x86_64 names such as 'openat', or numbers)
    """
    if isinstance(call, bool) or not isinstance(call, int | str):
        raise InputError(f"a system call is a name or a number, not {call!r}")
    if isinstance(call, str):
        table = names(abi)
        if call in table:
            return table.index(call)
        digits = call.removeprefix("sys_")
        if not (call.startswith("sys_") and digits.isdigit()):
            raise InputError(f"unknown system call {call!r} ({abi} names such as 'openat', or numbers)")
        call = int(digits)
    if not 0 <= call < 4096:
        raise InputError(f"system call number {call} is out of range (0-4095)")
    return call


#: x86-64 numbers of the calls that start a program (execve, execveat) and that end a task
#: (exit, exit_group): where every part cuts a process's calls into program runs.
EXECVE_CALLS = frozenset({59, 322})
EXIT_CALLS = frozenset({60, 231})
