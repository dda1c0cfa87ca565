"""The check framework: each static integrity check is a small unit, in the manner of a Volatility 3 plugin.

A check declares what it needs from the kernel profile (:attr:`Check.symbols`, :attr:`Check.members`)
and its cost class (``light``: a few milliseconds of reads; ``deep``: hashes many pages), and
every subclass registers itself under its :attr:`Check.name` (:func:`registry`).
:meth:`Check.run` yields :class:`Row` objects: ``(check, target, status, detail)`` with status
``pass``, ``fail`` or ``error``. :func:`run_checks` runs a selection and returns the rows as an Arrow
table in :data:`vims.schemas.CHECK_SCHEMA`.

>>> class Always(Check, register=False):
...     '''Passes.'''
...     name = "always"
...     def run(self, ctx):
...         yield self.row("everything", "pass", "fine")
>>> [r.status for r in Always().run(None)]
['pass']
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vims.collector.kernel import KernelView, ProfileError
from vims.collector.memory import GuestMemoryError
from vims.errors import InputError, VimsError

if TYPE_CHECKING:
    import pyarrow as pa

STATUSES = ("pass", "fail", "error")
COSTS = ("light", "deep")


@dataclass(frozen=True)
class Row:
    """One result of a check: what was checked (``target``) and how it went."""

    check: str
    target: str
    status: str
    detail: str | None = None
    cost: str = "light"
    ts_ns: int = field(default_factory=time.time_ns)

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "target": self.target, "status": self.status, "detail": self.detail,
                "cost": self.cost, "ts_ns": self.ts_ns}


@dataclass
class Reference:
    """What a clean guest looks like: the data the checks compare against.

    Attributes
    ----------
    kernel_text : bytes or None
        Kernel text ``[_stext, _etext)`` copied from a running guest of the same kernel and CPU model.
    rootfs : Path or None
        The guest's root file system tree as built (the reference executables).
    cpu : str or None
        The QEMU CPU model the kernel text was copied under (the kernel patches itself for its CPU).
    """

    kernel_text: bytes | None = None
    rootfs: Path | None = None
    cpu: str | None = None

    @classmethod
    def from_image(cls, image: Any) -> Reference:
        """The reference of a :class:`vims.collector.guest.GuestImage`."""
        text = getattr(image, "kernel_text_ref", None)
        if isinstance(text, str | Path):
            text = Path(text).read_bytes()
        rootfs = getattr(image, "rootfs", None)
        cpu = getattr(image, "cpu", None)
        return cls(kernel_text=text, rootfs=None if rootfs is None else Path(rootfs),
                   cpu=None if cpu is None else str(cpu))


@dataclass
class Context:
    """What a check runs against: the guest (a :class:`~vims.collector.backends.Backend`) and the reference.
    Checks only read
    memory: they never use the backend's vCPU channel (a tracer may hold the GDB stub meanwhile).
    """

    backend: Any
    reference: Reference = field(default_factory=Reference)
    #: The CPU model the guest runs with, when known (``-cpu`` of QEMU).
    cpu: str | None = None

    @classmethod
    def of_guest(cls, backend: Any) -> Context:
        """The context of a backend opened by :meth:`QemuBackend.from_guest`: the reference of the
        guest's image and the guest's CPU model."""
        from vims.collector.guest import GuestImage

        guest = backend.guest
        image = GuestImage.at(Path(guest.state["kernel"]).parent)
        return cls(backend, Reference.from_image(image), cpu=guest.state.get("cpu"))

    @property
    def kernel(self) -> KernelView:
        """The guest's kernel objects, through the backend's memory."""
        return self.backend.kernel

    @property
    def profile(self) -> Any:
        return self.kernel.profile


class Check(ABC):
    """A static integrity check.

    Subclasses set :attr:`name`, :attr:`cost`, :attr:`symbols` and :attr:`members`, and write
    :meth:`run`. The first line of the class docstring is the check's description.
    """

    #: The name users select the check by (``vims check --check NAME``).
    name: ClassVar[str] = ""
    #: ``light`` (milliseconds) or ``deep`` (hashes many pages; skipped by ``--light``).
    cost: ClassVar[str] = "light"
    #: Kernel symbols the check reads.
    symbols: ClassVar[tuple[str, ...]] = ()
    #: ``(struct, member)`` pairs the check reads.
    members: ClassVar[tuple[tuple[str, str], ...]] = ()

    _registry: ClassVar[dict[str, type[Check]]] = {}

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        """Register each check under its :attr:`name` (``class X(Check, register=False)`` does not)."""
        super().__init_subclass__(**kwargs)
        if not register:
            return
        if not cls.name:
            raise TypeError(f"check {cls.__qualname__} has no name")
        known = Check._registry.get(cls.name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise TypeError(f"two checks are named {cls.name!r}: {known.__qualname__} and {cls.__qualname__}")
        Check._registry[cls.name] = cls

    @classmethod
    def description(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def missing(self, profile: Any) -> list[str]:
        """What the check needs that ``profile`` lacks (empty when it can run)."""
        out = [s for s in self.symbols if not profile.has_symbol(s)]
        for struct, member in self.members:
            try:
                profile.offset(struct, member)
            except (VimsError, KeyError, LookupError):
                out.append(f"{struct}.{member}")
        return out

    def row(self, target: str, status: str, detail: str | None = None) -> Row:
        """A result row of this check."""
        return Row(self.name, target, status, detail, self.cost)

    @abstractmethod
    def run(self, ctx: Context) -> Iterator[Row]:
        """Yield the rows of this check against ``ctx``."""

    def __call__(self, ctx: Context) -> list[Row]:
        """Run the check; a missing requirement or an unreadable guest becomes an ``error`` row."""
        missing = self.missing(ctx.profile)
        if missing:
            return [self.row("profile", "error", "the kernel profile lacks " + ", ".join(missing))]
        rows: list[Row] = []
        try:
            rows.extend(self.run(ctx))
        except (GuestMemoryError, ProfileError, InputError) as exc:
            rows.append(self.row("guest", "error", str(exc)))
        return rows


def registry() -> dict[str, type[Check]]:
    """Every check by name, in the order their modules were imported (the package imports them all)."""
    import vims.collector.checks  # noqa: F401  (its modules register their checks)

    return dict(Check._registry)


def select(names: Sequence[str] | None = None, deep: bool = True) -> list[Check]:
    """The checks to run: those named (all by default), without the deep ones unless ``deep``.

    >>> [c.name for c in select(deep=False)]
    ['kernel-text', 'syscall-table', 'hidden-processes']
    >>> select(["nope"])
    Traceback (most recent call last):
    ...
    vims.errors.InputError: unknown check 'nope': one of kernel-text, syscall-table, process-binaries, ...
    """
    checks = registry()
    for name in names or ():
        if name not in checks:
            raise InputError(f"unknown check {name!r}: one of {', '.join(checks)}")
    chosen = [checks[n] for n in names] if names else list(checks.values())
    # Naming a deep check runs it even with --light: the user asked for it.
    return [c() for c in chosen if deep or c.cost == "light" or names]


def run_checks(ctx: Context, checks: Iterable[Check]) -> list[Row]:
    """Run ``checks`` against ``ctx``, in order."""
    rows: list[Row] = []
    for check in checks:
        rows.extend(check(ctx))
    return rows


def rows_table(rows: Iterable[Row]) -> pa.Table:
    """The rows as an Arrow table in :data:`vims.schemas.CHECK_SCHEMA`."""
    import pyarrow as pa

    from vims.schemas import CHECK_SCHEMA

    dicts = [r.as_dict() for r in rows]
    return pa.Table.from_pylist(dicts, schema=CHECK_SCHEMA)


def symbol_name(profile: Any, addr: int) -> str:
    """``name+0xoff`` of ``addr`` (or the hex address when no symbol is below it)."""
    try:
        name, off = profile.symbol_at(addr)
    except (VimsError, LookupError):
        return f"{addr:#x}"
    return f"{name}+{off:#x}" if off else name
