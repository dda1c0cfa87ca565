"""``kernel-modules``: the module list against the modules' sysfs kobjects (``linux.hidden_modules``).

A rootkit hides a loaded module by unlinking its ``struct module`` from the ``modules`` list (what
``lsmod`` and ``/proc/modules`` walk); the module keeps running. Its sysfs kobject
(``module.mkobj.kobj`` on the ``module_kset`` list, ``/sys/module/NAME``) usually stays: every kobject
there that belongs to a loaded module (``module_kobject.mod`` set; built-in modules with parameters
have none) must be a module of the list, and its ``mod`` must point back to the module that embeds it.

:class:`ModuleMap` is the two views together; the other checks use it to say which module an
address belongs to (:meth:`ModuleMap.owner`), naming hidden ones as such.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from vims.collector.checks.base import Check, Column, Context, Row, symbol_name
from vims.collector.kernel import MAX_LIST, KernelView
from vims.collector.memory import GuestMemoryError

#: ``MODULE_STATE_*`` of include/linux/module.h.
STATES = {0: "live", 1: "coming", 2: "going", 3: "unformed"}


@dataclass(frozen=True)
class Module:
    """A loaded module: its ``struct module``, name, state and core mapping (``core_layout``)."""

    address: int
    name: str
    state: str
    base: int
    size: int
    listed: bool
    in_sysfs: bool

    def contains(self, addr: int) -> bool:
        """Whether ``addr`` is in the module's core mapping (its text and data)."""
        return self.base <= addr < self.base + self.size


@dataclass(frozen=True)
class Owner:
    """What an address (a handler, a hook) belongs to: ``kernel``, ``module``, ``hidden module`` or
    ``none`` (no kernel text, no module: code put anywhere else), and its name there."""

    kind: str
    name: str

    @property
    def trusted(self) -> bool:
        """Whether the address is in the kernel's text or a module of the module list."""
        return self.kind in ("kernel", "module")


def _list(kernel: KernelView, head: int, offset: int) -> Iterator[int]:
    node = kernel.u64(head)
    seen = 0
    while node != head:
        yield node - offset
        node = kernel.u64(node)
        seen += 1
        if seen > MAX_LIST:
            raise GuestMemoryError(f"the kernel list at {head:#x} does not end (changed while read?)")


class ModuleMap:
    """The loaded modules, from the ``modules`` list and from ``module_kset``'s kobjects."""

    #: What a check that reads it needs from the profile.
    symbols: ClassVar[tuple[str, ...]] = ("modules", "module_kset", "_stext", "_etext")
    members: ClassVar[tuple[tuple[str, str], ...]] = (
        ("module", "list"), ("module", "name"), ("module", "state"), ("module", "mkobj"),
               ("module", "core_layout"), ("module_layout", "base"), ("module_layout", "size"),
               ("module_kobject", "mod"), ("kobject", "entry"), ("kset", "list"))

    def __init__(self, kernel: KernelView) -> None:
        p = kernel.profile
        self.kernel = kernel
        self.text = (int(p.symbol("_stext")), int(p.symbol("_etext")))
        o_list, o_mkobj = p.offset("module", "list"), p.offset("module", "mkobj")
        listed = list(_list(kernel, kernel.symbol_address("modules"), o_list))
        kset = kernel.u64(kernel.symbol_address("module_kset"))
        o_entry, o_mod = p.offset("kobject", "entry"), p.offset("module_kobject", "mod")
        #: ``{struct module: its kobject's mod}`` of the kobjects that belong to a loaded module.
        self.kobjects: dict[int, int] = {}
        if kset:
            for kobj in _list(kernel, kset + p.offset("kset", "list"), o_entry):
                mod = kernel.u64(kobj + o_mod)  # kobj is module_kobject.kobj, at its start
                if mod:
                    self.kobjects[kobj - o_mkobj] = mod
        self.modules = [self._module(addr, True, addr in self.kobjects) for addr in listed]
        self.modules += [self._module(addr, False, True) for addr in self.kobjects if addr not in set(listed)]

    def _module(self, addr: int, listed: bool, in_sysfs: bool) -> Module:
        p, k = self.kernel.profile, self.kernel
        name = k.read(addr + p.offset("module", "name"), 56).split(b"\0", 1)[0].decode("utf-8", "replace")
        layout = addr + p.offset("module", "core_layout")
        state = k.kernel.u32(addr + p.offset("module", "state"))
        return Module(addr, name, STATES.get(state, str(state)), k.u64(layout + p.offset("module_layout", "base")),
                      k.kernel.u32(layout + p.offset("module_layout", "size")), listed, in_sysfs)

    @classmethod
    def read(cls, kernel: KernelView, tries: int = 3) -> ModuleMap:
        """The map, read again when a list changes under the read (a module loading or unloading)."""
        for attempt in range(tries):
            try:
                return cls(kernel)
            except GuestMemoryError:
                if attempt + 1 == tries:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def owner(self, addr: int) -> Owner:
        """What ``addr`` belongs to: the kernel's text (``name+off``), a module, or nothing."""
        if self.text[0] <= addr < self.text[1]:
            return Owner("kernel", symbol_name(self.kernel.profile, addr))
        for module in self.modules:
            if module.contains(addr):
                kind = "module" if module.listed else "hidden module"
                return Owner(kind, f"{module.name}+{addr - module.base:#x}")
        return Owner("none", f"{addr:#x}")


def describe(owners: ModuleMap, addr: int) -> str:
    """``addr`` in words: ``name+off`` in the kernel, ``in module M``, ``in hidden module M``, or
    ``outside the kernel's text and every module``."""
    owner = owners.owner(addr)
    if owner.kind == "kernel":
        return owner.name
    if owner.kind == "none":
        return f"{addr:#x}, outside the kernel's text and every module"
    return f"{addr:#x} in {owner.kind} {owner.name}"


class KernelModules(Check):
    """Every loaded module with a sysfs kobject is in the module list (no module is hidden)."""

    name = "kernel-modules"
    cost = "light"
    symbols = ModuleMap.symbols
    members = ModuleMap.members
    #: A failing row is one module: its name, ``struct module``, core mapping and what is wrong
    #: (``missing_from``: ``module list``; or ``kobject``: its kobject's ``mod`` points elsewhere).
    columns = (Column("module"), Column("address", "hex"), Column("base", "hex"), Column("size", "int"),
               Column("missing_from"))

    def run(self, ctx: Context) -> Iterator[Row]:
        modules = ModuleMap.read(ctx.kernel)
        bad = 0
        for m in modules.modules:
            if not m.listed:
                bad += 1
                yield self.row(m.name, "fail", f"module {m.name} ({m.address:#x}, code at {m.base:#x}, "
                               f"{m.size} bytes) has a sysfs kobject but is not in the module list",
                               module=m.name, address=m.address, base=m.base, size=m.size,
                               missing_from="module list")
            elif modules.kobjects.get(m.address, m.address) != m.address:
                bad += 1
                yield self.row(m.name, "fail", f"the kobject of module {m.name} points to "
                               f"{modules.kobjects[m.address]:#x}, not to its module {m.address:#x}",
                               module=m.name, address=m.address, base=m.base, size=m.size,
                               missing_from="kobject")
        if not bad:
            yield self.row("module list", "pass", f"{len(modules.modules)} modules in the list, each loaded "
                           f"module's kobject among them ({len(modules.kobjects)} kobjects of modules)")
