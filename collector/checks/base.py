"""The check framework: each static integrity check is a small unit, in the manner of a Volatility 3 plugin.

A check declares what it needs from the kernel profile (:attr:`Check.symbols`, :attr:`Check.members`)
and its cost class (``light``: a few milliseconds of reads; ``deep``: hashes many pages), and
every subclass registers itself under its :attr:`Check.name` (:func:`registry`).
:meth:`Check.run` yields :class:`Row` objects: ``(check, target, status, detail)`` with status
``pass``, ``fail`` or ``error``. :func:`run_checks` runs a selection and returns the rows as an Arrow
table in :data:`vims.schemas.CHECK_SCHEMA`.

What a check finds is declared, as the columns of a Volatility 3 ``TreeGrid``: :attr:`Check.columns`
names and types each finding (:class:`Column`), and :meth:`Check.row` takes them as keywords into
:attr:`Row.fields`; ``detail`` stays the same finding in words.

>>> class Always(Check, register=False):
...     '''Passes.'''
...     name = "always"
...     columns = (Column("address", "hex"),)
...     def run(self, ctx):
...         yield self.row("everything", "pass", "fine", address=0xffff0000)
>>> [(r.status, r.fields) for r in Always().run(None)]
[('pass', {'address': 4294901760})]
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
#: The types a :class:`Column` may have, and the Python type of their values (``hex``: an address).
COLUMN_TYPES: dict[str, type] = {"str": str, "int": int, "hex": int, "bool": bool}


@dataclass(frozen=True)
class Column:
    """A finding a check declares: its name and type (``str``, ``int``, ``hex`` or ``bool``).

    A ``hex`` column holds an integer (an address) shown in hexadecimal. Any column may be ``None``
    on a row that did not find that thing (a ``pass`` row, an ``error`` row).

    Parameters
    ----------
    name : str
        The keyword :meth:`Check.row` takes it by, and its key in :attr:`Row.fields`.
    type : str
        One of :data:`COLUMN_TYPES`.

    Examples
    --------
    >>> page = Column("page", "hex")
    >>> page.accepts(0x1000), page.accepts("0x1000"), page.accepts(True), page.accepts(None)
    (True, False, False, True)
    >>> page.render(0xffffffff81000000)
    '0xffffffff81000000'
    >>> Column("page", "address")
    Traceback (most recent call last):
    ...
    TypeError: column 'page' has type 'address': one of str, int, hex, bool
    """

    name: str
    type: str = "str"

    def __post_init__(self) -> None:
        if self.type not in COLUMN_TYPES:
            raise TypeError(f"column {self.name!r} has type {self.type!r}: one of {', '.join(COLUMN_TYPES)}")

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is of this column's type, or ``None`` (a bool is not an ``int``)."""
        if value is None:
            return True
        if self.type in ("int", "hex") and isinstance(value, bool):
            return False
        return isinstance(value, COLUMN_TYPES[self.type])

    def render(self, value: Any) -> str:
        """``value`` as a table shows it (``hex`` in hexadecimal, ``None`` empty)."""
        if value is None:
            return ""
        return f"{value:#x}" if self.type == "hex" else str(value)


@dataclass(frozen=True)
class Row:
    """One result of a check: what was checked (``target``), how it went, and what it found.

    Attributes
    ----------
    check, target, status, detail, cost, ts_ns
        The columns of :data:`vims.schemas.CHECK_SCHEMA` (``detail``: the finding in words).
    fields : dict
        The check's declared :attr:`Check.columns` and their values on this row (empty when the
        check declares none).
    """

    check: str
    target: str
    status: str
    detail: str | None = None
    cost: str = "light"
    ts_ns: int = field(default_factory=time.time_ns)
    fields: dict[str, Any] = field(default_factory=dict, hash=False)

    def as_dict(self, with_fields: bool = False) -> dict[str, Any]:
        """The row's :data:`vims.schemas.CHECK_SCHEMA` columns as a dict, and ``fields`` if asked.

        >>> row = Row("c", "t", "fail", "bad", ts_ns=1, fields={"nr": 3})
        >>> row.as_dict()
        {'check': 'c', 'target': 't', 'status': 'fail', 'detail': 'bad', 'cost': 'light', 'ts_ns': 1}
        >>> row.as_dict(with_fields=True)["fields"]
        {'nr': 3}
        """
        out: dict[str, Any] = {"check": self.check, "target": self.target, "status": self.status,
                               "detail": self.detail, "cost": self.cost, "ts_ns": self.ts_ns}
        if with_fields:
            out["fields"] = dict(self.fields)
        return out


@dataclass
class Reference:
    """What a clean guest looks like: the data the checks compare against.

    Attributes
    ----------
    kernel_image : Path or None
        The ``vmlinuz`` the guest booted: the kernel-text reference is built from it (relocated for
        KASLR, its patch sites read from it), so it holds for every boot and CPU model.
    rootfs : Path or None
        The guest's root file system as built (the reference executables): a directory, or an
        ext2/3/4 image read without mounting (the Debian image's ``disk.img``; its dpkg md5sums say
        what Debian shipped).
    """

    kernel_image: Path | None = None
    rootfs: Path | None = None

    @classmethod
    def from_image(cls, image: Any) -> Reference:
        """The reference of a guest image (:class:`vims.collector.guest.GuestImage` or a Debian image):
        its ``kernel`` and ``rootfs``."""
        kernel = getattr(image, "kernel", None)
        rootfs = getattr(image, "rootfs", None) or getattr(image, "disk", None)
        return cls(kernel_image=None if kernel is None else Path(kernel),
                   rootfs=None if rootfs is None else Path(rootfs))


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
    #: What a check keeps between its runs against this guest, under its name (``kernel-text``: its
    #: reference, built once, and the last text it found clean).
    memo: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def of_guest(cls, backend: Any) -> Context:
        """The context of a backend opened by :meth:`QemuBackend.from_guest` (the reference of the
        guest's image and the guest's CPU model) or by :meth:`~vims.collector.attach.AttachedVm.backend`
        (the reference the attachment was given)."""
        from vims.collector.guest import GuestImage
        from vims.collector.guest.debian import DebianImage

        guest = backend.guest
        if guest.kind == "attached":
            return cls(backend, guest.reference, cpu=guest.info.cpu)
        kind = DebianImage if guest.kind == "debian" else GuestImage
        image = kind.at(Path(guest.state["kernel"]).parent)
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

    Subclasses set :attr:`name`, :attr:`cost`, :attr:`symbols`, :attr:`members` and
    :attr:`columns`, and write :meth:`run`. The first line of the class docstring is the check's
    description.
    """

    #: The name users select the check by (``vims check --check NAME``).
    name: ClassVar[str] = ""
    #: ``light`` (milliseconds) or ``deep`` (hashes many pages; skipped by ``--light``).
    cost: ClassVar[str] = "light"
    #: Kernel symbols the check reads.
    symbols: ClassVar[tuple[str, ...]] = ()
    #: ``(struct, member)`` pairs the check reads.
    members: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: What the check finds, declared: the keywords :meth:`row` takes (every row carries them all).
    columns: ClassVar[tuple[Column, ...]] = ()

    _registry: ClassVar[dict[str, type[Check]]] = {}

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        """Register each check under its :attr:`name` (``class X(Check, register=False)`` does not)."""
        super().__init_subclass__(**kwargs)
        names = [getattr(c, "name", None) for c in cls.columns]
        if len(set(names)) != len(names) or not all(isinstance(c, Column) for c in cls.columns):
            raise TypeError(f"check {cls.__qualname__}: its columns must be Column objects with distinct names")
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

    def row(self, target: str, status: str, detail: str | None = None, **fields: Any) -> Row:
        """A result row of this check, with its declared :attr:`columns` (those not given are ``None``).

        Parameters
        ----------
        target : str
            What was checked.
        status : str
            ``pass``, ``fail`` or ``error``.
        detail : str, optional
            The finding in words.
        **fields
            Values of the check's declared columns.

        Raises
        ------
        TypeError
            A field the check does not declare, or a value not of its column's type (a programming
            error in the check, not a user's mistake).

        Examples
        --------
        >>> class Table(Check, register=False):
        ...     '''Example.'''
        ...     name = "table"
        ...     columns = (Column("nr", "int"), Column("entry", "hex"))
        ...     def run(self, ctx):
        ...         return iter(())
        >>> Table().row("read (0)", "fail", nr=0).fields
        {'nr': 0, 'entry': None}
        >>> Table().row("read (0)", "fail", symbol="x")
        Traceback (most recent call last):
        ...
        TypeError: check 'table' has no column 'symbol' (its columns: nr, entry)
        >>> Table().row("read (0)", "fail", nr="0")
        Traceback (most recent call last):
        ...
        TypeError: check 'table': column 'nr' is int, not str ('0')
        """
        declared = {c.name: c for c in self.columns}
        for key, value in fields.items():
            column = declared.get(key)
            if column is None:
                raise TypeError(f"check {self.name!r} has no column {key!r} "
                                f"(its columns: {', '.join(declared) or 'none'})")
            if not column.accepts(value):
                raise TypeError(f"check {self.name!r}: column {key!r} is {column.type}, "
                                f"not {type(value).__name__} ({value!r})")
        return Row(self.name, target, status, detail, self.cost,
                   fields={name: fields.get(name) for name in declared})

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
    ['kernel-text', 'syscall-table', 'hidden-processes', 'kernel-modules', 'idt', 'credentials', 'notifiers',
     'net-ops', 'ftrace-hooks']
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
    """The rows as an Arrow table in :data:`vims.schemas.CHECK_SCHEMA`.

    Its ``fields`` column is the JSON of each row's :attr:`Row.fields` (null when the row has none).

    >>> rows_table([Row("c", "t", "fail", ts_ns=1, fields={"page": 4096})]).column("fields").to_pylist()
    ['{"page": 4096}']
    """
    import json

    import pyarrow as pa

    from vims.schemas import CHECK_SCHEMA

    dicts = [{**r.as_dict(), "fields": json.dumps(r.fields) if r.fields else None} for r in rows]
    return pa.Table.from_pylist(dicts, schema=CHECK_SCHEMA)


def symbol_name(profile: Any, addr: int) -> str:
    """``name+0xoff`` of ``addr`` (or the hex address when no symbol is below it)."""
    try:
        name, off = profile.symbol_at(addr)
    except (VimsError, LookupError):
        return f"{addr:#x}"
    return f"{name}+{off:#x}" if off else name
