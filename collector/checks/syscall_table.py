"""``syscall-table``: every ``sys_call_table`` entry points to the handler the kernel's symbols name.

The expected handler of system call ``NAME`` is ``__x64_sys_NAME`` (a few use another name, e.g.
``uname`` -> ``__x64_sys_newuname``), or ``__x64_sys_ni_syscall`` when the kernel does not have it.
Addresses are compared, not names, so symbol aliases do not matter. Numbers and names come from
the x86-64 ABI table of :mod:`vims.syscalls`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vims.collector.checks.base import Check, Column, Context, Row, symbol_name
from vims.collector.kernel import unpack_u64s
from vims.collector.memory import GuestMemoryError
from vims.collector.syscall_table import table_size
from vims.errors import VimsError
from vims.syscalls import names as syscall_names

if TYPE_CHECKING:
    from vims.collector.checks.kernel_modules import ModuleMap

#: Handlers whose symbol is not ``__x64_sys_<name>`` of the ABI name (arch/x86/entry/syscalls/syscall_64.tbl).
ALIASES = {"umount2": "umount", "uname": "newuname", "stat": "newstat", "lstat": "newlstat",
           "fstat": "newfstat", "sendfile": "sendfile64"}

#: Numbers the x86-64 table leaves without an entry point (some have handlers for 32-bit code only).
NOT_IMPLEMENTED = frozenset({
    "uselib", "create_module", "get_kernel_syms", "query_module", "nfsservctl", "getpmsg", "putpmsg",
    "afs_syscall", "tuxcall", "security", "set_thread_area", "get_thread_area", "epoll_ctl_old",
    "epoll_wait_old", "vserver",
})


def expected_handler(profile: Any, name: str | None) -> tuple[str, int]:
    """The symbol and address of the handler the kernel should have for syscall ``name``."""
    if name is not None and name not in NOT_IMPLEMENTED:
        for candidate in (ALIASES.get(name, name), name):
            symbol = f"__x64_sys_{candidate}"
            if profile.has_symbol(symbol):
                return symbol, int(profile.symbol(symbol))
    return "__x64_sys_ni_syscall", int(profile.symbol("__x64_sys_ni_syscall"))


def _modules(ctx: Context) -> ModuleMap | None:
    """The guest's modules, to name the one a changed entry points into (None if unreadable)."""
    from vims.collector.checks.kernel_modules import ModuleMap  # here: the checks register in MODULES' order

    try:
        return ModuleMap.read(ctx.kernel)
    except (GuestMemoryError, VimsError, LookupError):
        return None


class SyscallTable(Check):
    """Every sys_call_table entry points to its system call's handler."""

    name = "syscall-table"
    cost = "light"
    symbols = ("sys_call_table", "__x64_sys_ni_syscall")
    #: A failing row is one entry: its number and system call, where it points (``entry``, named by
    #: ``points_to``) and the handler it should point to (``expected`` at ``expected_entry``).
    columns = (Column("nr", "int"), Column("syscall"), Column("entry", "hex"), Column("points_to"),
               Column("expected"), Column("expected_entry", "hex"))

    def run(self, ctx: Context) -> Iterator[Row]:
        profile, kernel = ctx.profile, ctx.kernel
        table = profile.symbol("sys_call_table")
        names = syscall_names()
        # The table ends where the next symbol begins (a kernel may have fewer calls than the ABI list).
        count = table_size(profile, len(names))
        entries = unpack_u64s(kernel.read(table, 8 * count))
        bad = 0
        modules = None
        for nr, (name, entry) in enumerate(zip(names, entries, strict=False)):
            symbol, expected = expected_handler(profile, name)
            if entry != expected:
                bad += 1
                label = f"{name or 'unused'} ({nr})"
                modules = modules or _modules(ctx)
                owner = modules.owner(entry) if modules is not None else None
                where = symbol_name(profile, entry) if owner is None or owner.kind == "kernel" else owner.name
                said = where if owner is None or owner.kind == "kernel" else f"{owner.kind} {where}"
                yield self.row(label, "fail", f"sys_call_table[{nr}] points to {said} "
                               f"({entry:#x}), not {symbol} ({expected:#x})",
                               nr=nr, syscall=name, entry=entry, points_to=where,
                               expected=symbol, expected_entry=expected)
        if not bad:
            yield self.row("sys_call_table", "pass", f"all {count} entries point to their handlers")
