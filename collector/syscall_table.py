"""The guest kernel's ``sys_call_table``: where it is, how many entries it has, what each one names.

The tracer names the calls it records from it (:func:`guest_syscall_names`) and the
``syscall-table`` check compares its entries with their handlers; both size it with
:func:`table_size`.
"""

from __future__ import annotations

from typing import Any

from vims.collector.kernel import unpack_u64s
from vims.collector.memory import GuestMemoryError
from vims.errors import VimsError

#: The most entries a table is read with (x86-64 numbers stay below it).
MAX_ENTRIES = 1024
#: Prefixes of handler symbols, stripped to name the call.
_PREFIXES = ("__x64_sys_", "__do_sys_", "sys_")


def table_size(profile: Any, limit: int = MAX_ENTRIES) -> int:
    """Entries of ``sys_call_table``: up to where the next symbol begins, at most ``limit``.

    A linear scan of the symbols (sorting them all for a bisect costs ten times more, and a check
    does it once per process).
    """
    table = int(profile.symbol("sys_call_table"))
    following = [a for a in profile.symbols().values() if table < a < table + 8 * limit]
    return min(limit, (min(following) - table) // 8) if following else limit


def guest_syscall_names(view: Any, profile: Any) -> dict[int, str]:
    """``{nr: name}`` from the guest's own ``sys_call_table``, each entry named through the profile.

    Entries pointing at ``sys_ni_syscall`` (unimplemented) are left out. Empty if the table cannot
    be read.
    """
    if not profile.has_symbol("sys_call_table"):
        return {}
    table = profile.symbol("sys_call_table")
    count = table_size(profile)
    try:
        entries = unpack_u64s(view.read(table, 8 * count))
    except GuestMemoryError:
        return {}
    names: dict[int, str] = {}
    for nr, ptr in enumerate(entries):
        try:
            name, off = profile.symbol_at(ptr)
        except VimsError:
            continue
        if off != 0:
            continue
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if name != "ni_syscall":
            names[nr] = name
    return names
