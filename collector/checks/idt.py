"""``idt``: every gate of the interrupt descriptor table points into the kernel's text (``linux.check_idt``).

A rootkit that redirects an interrupt or exception (a page fault, ``int 0x80``) writes a gate of
``idt_table`` (256 16-byte ``gate_struct``; the CPUs' IDTR points at it). A present gate's handler is
``offset_low | offset_middle << 16 | offset_high << 32``; it must be in the kernel's text
(``_stext``..``_etext``, the entry code included), or, for an exception vector (below 32) the kernel
never set (the reserved ones), its own stub of ``early_idt_handler_array`` (the boot-time handlers in
init text: ``idt_setup_early_handler`` fills every exception gate and the later set-up leaves the
reserved ones as they are). A handler anywhere else is named by its owner: a
module of the list, a hidden module, or nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from vims.collector.checks.base import Check, Column, Context, Row
from vims.collector.checks.kernel_modules import ModuleMap, describe

VECTORS = 256
#: ``NUM_EXCEPTION_VECTORS``: the CPU's exception vectors.
EXCEPTIONS = 32
GATE = 16
#: The present bit of ``idt_bits`` (its byte 1, bit 7: type 4 bits, 0, dpl 2 bits, p 1 bit).
PRESENT = 0x8000


def handler(gate: bytes) -> tuple[int, bool]:
    """The handler address of a 16-byte gate and whether the gate is present.

    >>> address, present = handler(struct.pack("<HHHHII", 0x1234, 0x10, 0x8e00, 0x5678, 0xffffffff, 0))
    >>> hex(address), present
    ('0xffffffff56781234', True)
    """
    low, _segment, bits, middle, high, _ = struct.unpack("<HHHHII", gate)
    return low | middle << 16 | high << 32, bool(bits & PRESENT)


class Idt(Check):
    """Every present gate of the interrupt descriptor table points into the kernel's text."""

    name = "idt"
    cost = "light"
    symbols = ("idt_table", *ModuleMap.symbols)
    members = ModuleMap.members
    #: A failing row is one gate: its vector, its handler and what the handler belongs to
    #: (``owner``: ``module``, ``hidden module`` or ``none``; ``points_to``: ``name+off``).
    columns = (Column("vector", "int"), Column("handler", "hex"), Column("owner"), Column("points_to"))

    def run(self, ctx: Context) -> Iterator[Row]:
        table = ctx.kernel.read(ctx.kernel.symbol_address("idt_table"), VECTORS * GATE)
        modules = ModuleMap.read(ctx.kernel)
        early = self.early_handlers(ctx)
        present = 0
        bad = 0
        leftover = 0
        for vector in range(VECTORS):
            address, live = handler(table[vector * GATE:(vector + 1) * GATE])
            if not live:
                continue
            present += 1
            owner = modules.owner(address)
            if early is not None and vector < EXCEPTIONS and address == early[0] + vector * early[1]:
                leftover += 1
                continue
            if owner.kind != "kernel":
                bad += 1
                yield self.row(f"vector {vector:#04x}", "fail", f"IDT gate {vector:#04x} points to "
                               f"{describe(modules, address)}", vector=vector, handler=address,
                               owner=owner.kind, points_to=owner.name)
        if not bad:
            yield self.row("idt_table", "pass", f"all {present} present gates point into the kernel's text "
                           f"({leftover} reserved exception vectors to their boot-time stubs)")

    @staticmethod
    def early_handlers(ctx: Context) -> tuple[int, int] | None:
        """``(early_idt_handler_array, stub size)``: the array of :data:`EXCEPTIONS` equal stubs ends
        where ``early_idt_handler_common`` begins (None when the profile lacks them)."""
        p = ctx.profile
        if not (p.has_symbol("early_idt_handler_array") and p.has_symbol("early_idt_handler_common")):
            return None
        start, end = int(p.symbol("early_idt_handler_array")), int(p.symbol("early_idt_handler_common"))
        size, rest = divmod(end - start, EXCEPTIONS)
        return (start, size) if size > 0 and not rest else None
