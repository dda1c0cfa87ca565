"""The function pointers a rootkit redirects to hide itself, each table a check of its own.

Each check reads a set of kernel objects that hold function pointers and requires every non-null one
to point into the kernel's text or into a module of the module list (:class:`ModuleMap`): code in a
hidden module, or in memory no module owns, is what a rootkit's hook looks like.

- ``notifiers`` (``linux.keyboard_notifiers``, part of ``linux.tty_check``): the keyboard, VT and
  module notifier chains (a keylogger registers on the keyboard chain).
- ``net-ops`` (``linux.check_afinfo``): the protocol operation tables of TCP, UDP and raw IPv4/IPv6
  sockets (``struct proto``, ``struct proto_ops``) and their ``/proc/net`` iterators
  (``struct seq_operations``: a hooked ``show`` hides connections from ``netstat``).
- ``ftrace-hooks``: the ``ftrace_ops`` on ``ftrace_ops_list`` and the registered kprobes
  (``kprobe_table``): their callbacks, and the functions kprobes sit on when those are sensitive
  (system-call entry, credentials, module and process listing).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

from vims.collector.checks.base import Check, Column, Context, Row
from vims.collector.checks.kernel_modules import ModuleMap, describe
from vims.collector.kernel import MAX_LIST, KernelView
from vims.collector.memory import GuestMemoryError
from vims.errors import VimsError

COLUMNS = (Column("table"), Column("member"), Column("pointer", "hex"), Column("owner"), Column("points_to"))


def function_pointers(profile: Any, struct_name: str) -> list[tuple[str, int]]:
    """``(member, offset)`` of every function-pointer member of ``struct_name``."""
    out = []
    for name, field in profile.fields(struct_name).items():
        kind = field["type"]
        if kind.get("kind") == "pointer" and (kind.get("subtype") or {}).get("kind") == "function":
            out.append((name, int(field["offset"])))
    return out


class _Hooks(Check, register=False):
    """Function pointers that must point into the kernel's text or a listed module."""

    symbols = ModuleMap.symbols
    members = ModuleMap.members
    #: A failing row is one pointer: the object holding it (``table``), its ``member``, where it
    #: points and what that belongs to (``owner``: ``hidden module`` or ``none``).
    columns = COLUMNS

    def pointers(self, kernel: KernelView) -> Iterator[tuple[str, str, int]]:
        """``(table, member, value)`` of each function pointer to judge (non-null)."""
        raise NotImplementedError

    def run(self, ctx: Context) -> Iterator[Row]:
        modules = ModuleMap.read(ctx.kernel)
        seen = 0
        bad = 0
        for table, member, value in self.pointers(ctx.kernel):
            seen += 1
            owner = modules.owner(value)
            if not owner.trusted:
                bad += 1
                yield self.row(f"{table}.{member}", "fail", f"{table}.{member} points to "
                               f"{describe(modules, value)}", table=table, member=member, pointer=value,
                               owner=owner.kind, points_to=owner.name)
        if not bad:
            yield self.row(self.name, "pass", f"all {seen} function pointers point into the kernel's text "
                           "or a listed module")


def _chain(kernel: KernelView, head: int) -> Iterator[int]:
    """The ``notifier_block`` addresses of the chain whose first pointer is at ``head``."""
    p = kernel.profile
    call, nxt = p.offset("notifier_block", "notifier_call"), p.offset("notifier_block", "next")
    block = kernel.u64(head)
    for _ in range(MAX_LIST):
        if not block:
            return
        yield block + call
        block = kernel.u64(block + nxt)
    raise GuestMemoryError(f"the notifier chain at {head:#x} does not end")


class Notifiers(_Hooks):
    """The keyboard, VT and module notifier chains call only the kernel and listed modules."""

    name = "notifiers"
    cost = "light"
    members = (*ModuleMap.members, ("notifier_block", "notifier_call"), ("notifier_block", "next"),
               ("atomic_notifier_head", "head"), ("blocking_notifier_head", "head"))
    #: ``symbol: its head's type`` of the chains read (those the profile lacks are left out).
    CHAINS: ClassVar[dict[str, str]] = {
        "keyboard_notifier_list": "atomic_notifier_head", "vt_notifier_list": "atomic_notifier_head",
              "module_notify_list": "blocking_notifier_head", "panic_notifier_list": "atomic_notifier_head",
              "reboot_notifier_list": "blocking_notifier_head"}

    def pointers(self, kernel: KernelView) -> Iterator[tuple[str, str, int]]:
        p = kernel.profile
        for chain, kind in self.CHAINS.items():
            if not p.has_symbol(chain):
                continue
            for at in _chain(kernel, kernel.symbol_address(chain) + p.offset(kind, "head")):
                yield chain, "notifier_call", kernel.u64(at)


class NetOps(_Hooks):
    """The socket operation tables and /proc/net iterators of TCP, UDP and raw sockets are the kernel's."""

    name = "net-ops"
    cost = "light"
    #: ``symbol: struct`` of the tables read (IPv6 ones only when IPv6 is built in).
    TABLES: ClassVar[dict[str, str]] = {
        "tcp_prot": "proto", "udp_prot": "proto", "raw_prot": "proto", "tcpv6_prot": "proto",
              "udpv6_prot": "proto", "inet_stream_ops": "proto_ops", "inet_dgram_ops": "proto_ops",
              "inet_sockraw_ops": "proto_ops", "inet6_stream_ops": "proto_ops", "inet6_dgram_ops": "proto_ops",
              "tcp4_seq_ops": "seq_operations", "udp_seq_ops": "seq_operations", "raw_seq_ops": "seq_operations",
              "tcp6_seq_ops": "seq_operations", "udp6_seq_ops": "seq_operations"}

    def pointers(self, kernel: KernelView) -> Iterator[tuple[str, str, int]]:
        p = kernel.profile
        for table, kind in self.TABLES.items():
            if not p.has_symbol(table):
                continue
            base = kernel.symbol_address(table)
            for member, offset in function_pointers(p, kind):
                value = kernel.u64(base + offset)
                if value:
                    yield table, member, value


#: Functions a kprobe on is a hook on what a rootkit hides or forges (prefix match).
SENSITIVE = ("__x64_sys_", "do_syscall_64", "commit_creds", "prepare_creds", "prepare_kernel_cred",
             "filldir", "proc_pid_readdir", "tcp4_seq_show", "udp4_seq_show", "find_module", "load_module",
             "do_init_module", "security_")


class FtraceHooks(_Hooks):
    """ftrace callbacks and kprobe handlers are the kernel's or listed modules', and no kprobe sits on a
    sensitive function."""

    name = "ftrace-hooks"
    cost = "light"
    members = (*ModuleMap.members, ("ftrace_ops", "func"), ("ftrace_ops", "next"), ("kprobe", "hlist"),
               ("kprobe", "addr"), ("kprobe", "pre_handler"), ("kprobe", "post_handler"))
    KPROBE_TABLE_SIZE = 64  # 1 << KPROBE_HASH_BITS

    def pointers(self, kernel: KernelView) -> Iterator[tuple[str, str, int]]:
        p = kernel.profile
        if p.has_symbol("ftrace_ops_list") and p.has_symbol("ftrace_list_end"):
            end = kernel.symbol_address("ftrace_list_end")
            ops = kernel.u64(kernel.symbol_address("ftrace_ops_list"))
            for _ in range(MAX_LIST):
                if not ops or ops == end:
                    break
                yield f"ftrace_ops {ops:#x}", "func", kernel.u64(ops + p.offset("ftrace_ops", "func"))
                ops = kernel.u64(ops + p.offset("ftrace_ops", "next"))
        for probe in self.kprobes(kernel):
            for member in ("pre_handler", "post_handler"):
                value = kernel.u64(probe + p.offset("kprobe", member))
                if value:
                    yield f"kprobe {probe:#x}", member, value

    def kprobes(self, kernel: KernelView) -> Iterator[int]:
        """Addresses of the registered kprobes (the hlists of ``kprobe_table``)."""
        p = kernel.profile
        if not p.has_symbol("kprobe_table"):
            return
        base, hlist = kernel.symbol_address("kprobe_table"), p.offset("kprobe", "hlist")
        for bucket in range(self.KPROBE_TABLE_SIZE):
            node = kernel.u64(base + 8 * bucket)
            for _ in range(MAX_LIST):
                if not node:
                    break
                yield node - hlist
                node = kernel.u64(node)

    def run(self, ctx: Context) -> Iterator[Row]:
        rows = list(super().run(ctx))
        p, kernel = ctx.profile, ctx.kernel
        sensitive = []
        for probe in self.kprobes(kernel):
            addr = kernel.u64(probe + p.offset("kprobe", "addr"))
            try:
                name, off = p.symbol_at(addr)
            except (VimsError, LookupError):
                continue
            if name.startswith(SENSITIVE):
                sensitive.append(self.row(f"kprobe on {name}", "fail", f"a kprobe ({probe:#x}) sits on "
                                          f"{name}+{off:#x}, a function rootkits hook", table=f"kprobe {probe:#x}",
                                          member="addr", pointer=addr, owner="kernel", points_to=f"{name}+{off:#x}"))
        if sensitive:
            rows = [r for r in rows if r.status != "pass"] + sensitive
        yield from rows
