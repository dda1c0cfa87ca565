"""``kernel-text``: the kernel's code, page by page, against a copy taken from a clean running guest.

The kernel patches its own text at boot (alternatives, for the CPU it finds), so the reference comes
from a running guest of the same kernel and CPU model, not from ``vmlinux``. After boot it still
rewrites a few sites on purpose: static keys and jump labels (listed in ``__jump_table``: each site
is a 2- or 5-byte NOP or a jump to the entry's target), static-call trampolines (``__SCT__*``: a jump
to a function, a return or a NOP) and ftrace call sites (a 5-byte NOP or a call to
``ftrace_caller``/``ftrace_regs_caller``). A difference that is exactly one of those states at one
of those sites is reported as a legitimate runtime patch; any other difference fails, named by the
symbols it falls in.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vims.collector.checks.base import Check, Column, Context, Row, symbol_name
from vims.collector.memory import PAGE_SIZE

NOP5 = bytes.fromhex("0f1f440000")
NOP2 = bytes.fromhex("6690")
_JUMP_ENTRY = struct.Struct("<iiq")  # x86-64 struct jump_entry: s32 code, s32 target, long key (relative)
FTRACE_TARGETS = ("ftrace_caller", "ftrace_regs_caller", "ftrace_stub")


@dataclass(frozen=True)
class Change:
    """A run of changed bytes ``[start, end)`` (kernel virtual addresses)."""

    start: int
    end: int


def diff_pages(current: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Indexes of the 4 KiB pages where ``current`` and ``reference`` (uint8 arrays) differ.

    >>> a = np.zeros(3 * 4096, np.uint8); b = a.copy(); b[5000] = 1
    >>> diff_pages(a, b).tolist()
    [1]
    """
    n = len(reference)
    whole = n // 8 * 8
    # Compare 8 bytes at a time: 14 MiB takes a few milliseconds.
    neq = current[:whole].view(np.uint64) != reference[:whole].view(np.uint64)
    pages = np.unique(np.flatnonzero(neq) // (PAGE_SIZE // 8))
    if whole < n and not np.array_equal(current[whole:n], reference[whole:n]):
        pages = np.union1d(pages, [whole // PAGE_SIZE])
    return pages


def changed_runs(current: np.ndarray, reference: np.ndarray, base: int, gap: int = 4) -> list[Change]:
    """Runs of differing bytes (merged when fewer than ``gap`` equal bytes lie between), as addresses.

    >>> a = np.zeros(32, np.uint8); b = a.copy(); b[[3, 4, 6, 20]] = 1
    >>> [(c.start, c.end) for c in changed_runs(a, b, 100)]
    [(103, 107), (120, 121)]
    """
    idx = np.flatnonzero(current != reference)
    runs: list[Change] = []
    if not len(idx):
        return runs
    start = prev = int(idx[0])
    for i in idx[1:].tolist():
        if i - prev > gap:
            runs.append(Change(base + start, base + prev + 1))
            start = i
        prev = i
    runs.append(Change(base + start, base + prev + 1))
    return runs


class KernelText(Check):
    """Kernel text pages are those of a clean boot (runtime patch sites told apart)."""

    name = "kernel-text"
    cost = "light"
    symbols = ("_stext", "_etext")
    #: A failing row is one changed page: the function its first change falls in (``symbol``, at
    #: ``offset`` bytes), the change's ``address``, and how many runs and bytes of the page changed.
    columns = (Column("page", "hex"), Column("symbol"), Column("offset", "int"), Column("address", "hex"),
               Column("changes", "int"), Column("bytes", "int"))

    #: Seconds to wait before reading changed pages again.
    settle = 0.05

    @staticmethod
    def _classify(pages: np.ndarray, current: np.ndarray, reference: np.ndarray, start: int, end: int,
                  sites: _Sites) -> tuple[dict[str, int], dict[int, list[Change]]]:
        """Runtime patches by kind, and the foreign changes of each page (by page index)."""
        runtime: dict[str, int] = {}
        foreign: dict[int, list[Change]] = {}
        for page in pages.tolist():
            lo = page * PAGE_SIZE
            hi = min(lo + PAGE_SIZE, end - start)
            for change in changed_runs(current[lo:hi], reference[lo:hi], start + lo):
                kind = sites.explain(change, current, reference, start)
                if kind is None:
                    foreign.setdefault(page, []).append(change)
                else:
                    runtime[kind] = runtime.get(kind, 0) + 1
        return runtime, foreign

    def run(self, ctx: Context) -> Iterator[Row]:
        kernel, profile = ctx.kernel, ctx.profile
        ref = ctx.reference.kernel_text
        start, end = profile.symbol("_stext"), profile.symbol("_etext")
        if ref is None:
            yield self.row("kernel text", "error", "no reference copy of the kernel text (build the guest image)")
            return
        if len(ref) != end - start:
            yield self.row("kernel text", "error", f"the reference has {len(ref)} bytes, the kernel text "
                           f"{end - start}: it belongs to another kernel build")
            return
        if ctx.cpu and ctx.reference.cpu and ctx.cpu != ctx.reference.cpu:
            yield self.row("kernel text", "error", f"the reference was taken with CPU model "
                           f"{ctx.reference.cpu!r}, the guest runs {ctx.cpu!r}: the kernel patches its "
                           "text for its CPU, so they cannot be compared")
            return
        current = np.frombuffer(kernel.memory.view(kernel.pa(start), end - start), np.uint8)
        reference = np.frombuffer(ref, np.uint8)
        pages = diff_pages(current, reference)
        npages = -(-(end - start) // PAGE_SIZE)
        if not len(pages):
            yield self.row("kernel text", "pass",
                           f"{npages} pages ({(end - start) / 2**20:.1f} MiB) identical to the reference")
            return
        sites = _Sites(ctx)
        runtime, foreign = self._classify(pages, current, reference, start, end, sites)
        if foreign:
            # The kernel pokes text through a temporary INT3 while it flips a static key: look again
            # (the view is live) and keep only the changes that persist.
            time.sleep(self.settle)
            again = diff_pages(current, reference)
            runtime, second = self._classify(again, current, reference, start, end, sites)
            foreign = {page: bad for page, bad in second.items() if page in foreign}
        for page, bad in sorted(foreign.items()):
            names = sorted({profile.symbol_at(c.start)[0] for c in bad})
            where = ", ".join(f"{symbol_name(profile, c.start)} ({c.end - c.start} bytes)" for c in bad[:8])
            more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
            symbol, offset = profile.symbol_at(bad[0].start)
            yield self.row(", ".join(names), "fail",
                           f"page {start + page * PAGE_SIZE:#x} differs from the reference at {where}{more}",
                           page=start + page * PAGE_SIZE, symbol=str(symbol), offset=int(offset),
                           address=bad[0].start, changes=len(bad), bytes=sum(c.end - c.start for c in bad))
        if runtime:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(runtime.items()))
            yield self.row("runtime patch sites", "pass",
                           f"{sum(runtime.values())} changes are the kernel's own runtime patching ({kinds})",
                           changes=sum(runtime.values()))
        if not foreign:
            yield self.row("kernel text", "pass", f"{npages} pages match the reference apart from runtime "
                           "patch sites")


class _Sites:
    """The kernel's legitimate runtime patch sites, read lazily from guest memory."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._jumps: dict[int, int] | None = None

    def jump_labels(self) -> dict[int, int]:
        """Code address -> jump target of every ``__jump_table`` entry."""
        if self._jumps is None:
            self._jumps = {}
            profile, kernel = self.ctx.profile, self.ctx.kernel
            if profile.has_symbol("__start___jump_table") and profile.has_symbol("__stop___jump_table"):
                lo = profile.symbol("__start___jump_table")
                hi = profile.symbol("__stop___jump_table")
                data = kernel.read(lo, hi - lo)
                for i in range(0, len(data) - _JUMP_ENTRY.size + 1, _JUMP_ENTRY.size):
                    code, target, _ = _JUMP_ENTRY.unpack_from(data, i)
                    self._jumps[lo + i + code] = lo + i + 4 + target
        return self._jumps

    def explain(self, change: Change, current: np.ndarray, reference: np.ndarray, base: int) -> str | None:
        """The kind of runtime patch ``change`` is, or None if it is not one."""

        def now(addr: int, n: int) -> bytes:
            return current[addr - base:addr - base + n].tobytes()

        def then(addr: int, n: int) -> bytes:
            return reference[addr - base:addr - base + n].tobytes()

        jumps = self.jump_labels()
        # Every changed byte must lie in a jump-label site (sites may be adjacent) that is in one of
        # its two states now and was in one of them in the reference.
        covered: set[int] = set()
        for site in range(change.start - 4, change.end):
            target = jumps.get(site)
            if target is None:
                continue
            for size in (5, 2):
                if _jump_state(now(site, size), site, target) and _jump_state(then(site, size), site, target):
                    covered.update(range(site, site + size))
                    break
        if covered:
            changed = [a for a in range(change.start, change.end) if now(a, 1) != then(a, 1)]
            if all(a in covered for a in changed):
                return "jump labels"
        profile = self.ctx.profile
        name, off = profile.symbol_at(change.start)
        site = change.start - off
        if name.startswith("__SCT__") and change.end <= site + 5 and \
                _static_call_state(now(site, 5), site, profile):
            return "static calls"
        # ftrace: the call at a function's entry (after ENDBR64 when the kernel has IBT).
        for entry in (site, site + 4):
            if entry <= change.start and change.end <= entry + 5 and then(entry, 5) == NOP5:
                code = now(entry, 5)
                if code == NOP5:
                    return "ftrace sites"
                if code[0] == 0xE8:
                    target = entry + 5 + struct.unpack_from("<i", code, 1)[0]
                    if profile.symbol_at(target)[0] in FTRACE_TARGETS:
                        return "ftrace sites"
        return None


def _jump_state(code: bytes, site: int, target: int) -> bool:
    """Whether ``code`` at ``site`` is one of a jump label's two states: a NOP or a jump to ``target``."""
    if code in (NOP5, NOP2):
        return True
    if len(code) == 5 and code[0] == 0xE9:
        return site + 5 + struct.unpack_from("<i", code, 1)[0] == target
    if len(code) == 2 and code[0] == 0xEB:
        return site + 2 + struct.unpack_from("<b", code, 1)[0] == target
    return False


def _static_call_state(code: bytes, site: int, profile: object) -> bool:
    """A static-call trampoline: ``jmp func`` (to the start of a function), ``ret`` or a NOP."""
    if code[0] == 0xC3 or code == NOP5:
        return True
    if code[0] == 0xE9:
        target = site + 5 + struct.unpack_from("<i", code, 1)[0]
        return profile.symbol_at(target)[1] == 0  # type: ignore[attr-defined]
    return False
