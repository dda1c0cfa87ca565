"""``kernel-text``: the kernel's code, page by page, against the kernel image it was booted from.

The reference is built from the guest's own ``vmlinuz`` (:mod:`vims.collector.kernel_image`): the
decompressed image's text, relocated by the KASLR virtual offset the profile was relocated with.
The kernel then patches its text at boot for the CPU it finds (alternatives, paravirt operations,
retpolines and return thunks, ``lock`` prefixes on one CPU) and at run time (static keys and jump
labels, static calls, ftrace sites); every such site is listed in the image, and a difference there
passes only if the site now holds a state the kernel itself can write there
(:meth:`~vims.collector.kernel_image.PatchSites.explain`). Any other difference fails, named by the
function it falls in. The reference holds for every CPU model and QEMU version, and for every boot.

The last text found clean is kept in the :class:`~vims.collector.checks.base.Context`: a run whose
text is byte for byte that one passes after one comparison; any change sends the whole text through
the site checks again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from vims.collector.checks.base import Check, Column, Context, Row, symbol_name
from vims.collector.kernel_image import NOP5, KernelImage, PatchSites
from vims.collector.memory import PAGE_SIZE

__all__ = ["NOP5", "Change", "KernelText", "changed_runs", "diff_pages"]


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


def changed_runs(changed: np.ndarray, base: int, gap: int = 4) -> list[Change]:
    """Runs of the byte indexes ``changed`` (merged when fewer than ``gap`` bytes lie between), as addresses.

    >>> [(c.start, c.end) for c in changed_runs(np.array([3, 4, 6, 20]), 100)]
    [(103, 107), (120, 121)]
    """
    runs: list[Change] = []
    if not len(changed):
        return runs
    breaks = np.flatnonzero(np.diff(changed) > gap)
    for lo, hi in zip(np.r_[0, breaks + 1].tolist(), np.r_[breaks, len(changed) - 1].tolist(), strict=True):
        runs.append(Change(base + int(changed[lo]), base + int(changed[hi]) + 1))
    return runs


@dataclass
class _Reference:
    """The relocated image text of one kernel at one offset, its patch sites and the last clean text."""

    key: tuple[str, int, int, int]
    text: np.ndarray
    sites: PatchSites
    clean: np.ndarray | None = None
    kinds: dict[str, int] | None = None


class KernelText(Check):
    """Kernel text is the kernel image's, apart from the kernel's own patching at its patch sites."""

    name = "kernel-text"
    cost = "light"
    symbols = ("_stext", "_etext")
    #: A failing row is one changed page: the function its first change falls in (``symbol``, at
    #: ``offset`` bytes), the change's ``address``, and how many runs and bytes of the page changed.
    columns = (Column("page", "hex"), Column("symbol"), Column("offset", "int"), Column("address", "hex"),
               Column("changes", "int"), Column("bytes", "int"))

    #: Seconds to wait before reading changed pages again.
    settle = 0.05

    def _reference(self, ctx: Context, start: int, end: int) -> _Reference | Row:
        """The reference for this guest's kernel (kept in ``ctx.memo``), or an error row."""
        path = ctx.reference.kernel_image
        if path is None:
            return self.row("kernel text", "error", "no kernel image to build the reference from "
                            "(the guest's vmlinuz)")
        offset = int((ctx.profile.metadata.get("kaslr") or {}).get("virtual_offset", 0))
        key = (str(path), offset, start, end)
        ref = ctx.memo.get(self.name)
        if isinstance(ref, _Reference) and ref.key == key:
            return ref
        image = KernelImage.from_vmlinuz(path)
        text = image.section(".text")
        same = text.addr <= start - offset and end - offset <= text.addr + text.size
        if same and ctx.profile.has_symbol("linux_banner"):
            banner = ctx.profile.symbol("linux_banner")
            same = image.read(banner - offset, 64) == ctx.kernel.read(banner, 64)
        if not same:
            return self.row("kernel text", "error", f"the guest does not run the kernel of {path} "
                            "(its banner or text range differ): it belongs to another kernel build")
        ref = _Reference(key, image.loaded(offset, start - offset, end - offset),
                         PatchSites(image, ctx.profile, offset, start, end))
        ctx.memo[self.name] = ref
        return ref

    def run(self, ctx: Context) -> Iterator[Row]:
        start, end = ctx.profile.symbol("_stext"), ctx.profile.symbol("_etext")
        ref = self._reference(ctx, start, end)
        if isinstance(ref, Row):
            yield ref
            return
        kernel = ctx.kernel
        current = np.frombuffer(kernel.memory.view(kernel.pa(start), end - start), np.uint8)
        npages = -(-(end - start) // PAGE_SIZE)
        if ref.clean is not None and ref.kinds is not None and not len(diff_pages(current, ref.clean)):
            kinds = ref.kinds
        else:
            kinds, bad = self._compare(current, ref, kernel.read)
            if len(bad):
                # The kernel pokes text through a temporary INT3 while it flips a static key or an
                # ftrace site: look again (the view is live) and keep only the changes that persist.
                time.sleep(self.settle)
                kinds, again = self._compare(current, ref, kernel.read)
                bad = np.intersect1d(bad, again)
            if len(bad):
                yield from self._failures(ctx, bad, start)
                return
            ref.clean, ref.kinds = current.copy(), kinds
        if kinds:
            listed = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            yield self.row("runtime patch sites", "pass",
                           f"{sum(kinds.values())} sites hold the kernel's own patching ({listed})",
                           changes=sum(kinds.values()))
        yield self.row("kernel text", "pass", f"{npages} pages ({(end - start) / 2**20:.1f} MiB) match the "
                       "kernel image apart from its own patch sites")

    @staticmethod
    def _compare(current: np.ndarray, ref: _Reference, read: object) -> tuple[dict[str, int], np.ndarray]:
        """The sites in a changed legitimate state by kind, and the indexes of the other changed bytes."""
        foreign, kinds = ref.sites.explain(current, ref.text, read)
        return kinds, foreign

    def _failures(self, ctx: Context, bad: np.ndarray, start: int) -> Iterator[Row]:
        """One failing row per page with foreign changes."""
        profile = ctx.profile
        for page in np.unique(bad // PAGE_SIZE).tolist():
            changes = changed_runs(bad[(bad // PAGE_SIZE) == page], start)
            names = sorted({profile.symbol_at(c.start)[0] for c in changes})
            where = ", ".join(f"{symbol_name(profile, c.start)} ({c.end - c.start} bytes)" for c in changes[:8])
            more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
            symbol, offset = profile.symbol_at(changes[0].start)
            yield self.row(", ".join(names), "fail",
                           f"page {start + page * PAGE_SIZE:#x} differs from the kernel image at {where}{more}",
                           page=start + page * PAGE_SIZE, symbol=str(symbol), offset=int(offset),
                           address=changes[0].start, changes=len(changes),
                           bytes=sum(c.end - c.start for c in changes))
