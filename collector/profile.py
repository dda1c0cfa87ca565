"""A kernel profile: symbol addresses and structure layouts, shaped like a Volatility 3 symbol table.

The JSON (ISF-like) has

- ``metadata``: ``release``, ``cpu`` (the QEMU CPU model the guest ran with), ``producer``, ...
- ``symbols``: ``{name: {"address": int, "type": "T"}}`` from ``/proc/kallsyms`` of a booted guest
  (``nokaslr``, so the addresses hold for every boot of that kernel). Per-cpu variables
  (``current_task``) appear with their offset in the per-cpu area, a small number.
- ``user_types``: ``{name: {"kind", "size", "fields": {member: {"offset", "type"}}}}`` from the
  kernel's BTF (:mod:`vims.collector.btf`), every struct and union; members of anonymous
  structs/unions are listed on their parent, as C reaches them.
- ``base_types`` and ``enums``.

>>> p = KernelProfile.from_dict(example_profile())
>>> hex(p.symbol("init_task")), p.symbol_at(0xffffffff81000010)
('0xffffffff82a0c940', ('_stext', 16))
>>> p.offset("task_struct", "thread.sp"), p.size("task_struct")
(5384, 9792)
>>> p.symbol("no_such_symbol")
Traceback (most recent call last):
...
vims.errors.VimsError: the kernel profile of 6.1.0-test has no symbol 'no_such_symbol'
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

from vims.errors import InputError, VimsError

__all__ = ["KernelProfile", "example_profile", "make_profile", "parse_kallsyms"]

FORMAT = "6.2.0"
#: Where the kernel image is mapped (``__START_KERNEL_map``); KASLR moves symbols above it.
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # the Volatility 3 ISF format version this file follows


def parse_kallsyms(text: str, where: str = "kallsyms") -> dict[str, dict[str, Any]]:
    """``/proc/kallsyms`` text as ISF symbols; the first of duplicate names wins, module symbols skipped.

    >>> parse_kallsyms("ffffffff81000000 T _stext\\n0000000000020c40 D current_task\\n")
    {'_stext': {'address': 18446744071578845184, 'type': 'T'}, 'current_task': {'address': 134208, 'type': 'D'}}
    """
    symbols: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3:
            raise InputError(f"expected 'address type name', got {line[:60]!r}", where=f"{where}:{lineno}")
        if len(parts) > 3:  # "[module]": modules load at changing addresses
            continue
        try:
            address = int(parts[0], 16)
        except ValueError:
            raise InputError(f"not a hex address: {parts[0][:20]!r}", where=f"{where}:{lineno}") from None
        symbols.setdefault(parts[2], {"address": address, "type": parts[1]})
    return symbols


def make_profile(
    symbols: dict[str, dict[str, Any]], types: dict[str, Any], metadata: dict[str, Any]
) -> dict[str, Any]:
    """Assemble the profile JSON from symbols, the BTF ISF parts and metadata."""
    return {
        "metadata": {"format": FORMAT, **metadata},
        "symbols": symbols,
        "user_types": types.get("user_types", {}),
        "base_types": types.get("base_types", {}),
        "enums": types.get("enums", {}),
    }


class KernelProfile:
    """Symbols and structure layouts of one kernel build (see the module docstring for the format)."""

    def __init__(self, data: dict[str, Any], path: Path | None = None) -> None:
        for key in ("metadata", "symbols", "user_types"):
            if key not in data:
                raise InputError(f"not a kernel profile: no {key!r} section", where=path)
        self.data = data
        self.path = path
        self.metadata: dict[str, Any] = data["metadata"]
        self.release: str = str(self.metadata.get("release", "unknown"))
        self._symbols: dict[str, dict[str, Any]] = data["symbols"]
        self._user_types: dict[str, Any] = data["user_types"]
        self._sorted: tuple[list[int], list[str]] | None = None

    @classmethod
    def load(cls, path: str | Path) -> KernelProfile:
        """Read a profile JSON file."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise VimsError(f"no kernel profile at {path} (build the guest: `vims guest build`)") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not JSON: {exc.msg}", where=f"{path}:{exc.lineno}") from None
        return cls(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelProfile:
        """A profile from its JSON structure."""
        return cls(data)

    def save(self, path: str | Path) -> None:
        """Write the profile JSON (compact) to ``path``."""
        Path(path).write_text(json.dumps(self.data, separators=(",", ":")))

    # -- symbols ---------------------------------------------------------------------------------
    def symbol(self, name: str) -> int:
        """The address of symbol ``name``."""
        try:
            return int(self._symbols[name]["address"])
        except KeyError:
            raise VimsError(f"the kernel profile of {self.release} has no symbol {name!r}") from None

    def has_symbol(self, name: str) -> bool:
        """Whether the profile knows symbol ``name``."""
        return name in self._symbols

    def symbol_type(self, name: str) -> str:
        """The kallsyms type letter of ``name`` (``T`` text, ``D`` data, ...)."""
        self.symbol(name)
        return str(self._symbols[name].get("type", "?"))

    def symbols(self) -> dict[str, int]:
        """Every symbol's address by name."""
        return {name: int(s["address"]) for name, s in self._symbols.items()}

    def _index(self) -> tuple[list[int], list[str]]:
        if self._sorted is None:
            pairs = sorted((int(s["address"]), n) for n, s in self._symbols.items())
            self._sorted = ([a for a, _ in pairs], [n for _, n in pairs])
        return self._sorted

    def symbol_at(self, addr: int) -> tuple[str, int]:
        """The nearest symbol at or below ``addr`` and the offset of ``addr`` from it."""
        addrs, names = self._index()
        i = bisect.bisect_right(addrs, addr) - 1
        if i < 0:
            raise VimsError(f"no symbol at or below {addr:#x} in the kernel profile of {self.release}")
        return names[i], addr - addrs[i]

    def symbols_between(self, start: int, end: int) -> list[tuple[str, int]]:
        """``(name, address)`` of the symbols in ``[start, end)``, by address."""
        addrs, names = self._index()
        lo = bisect.bisect_left(addrs, start)
        hi = bisect.bisect_left(addrs, end)
        return list(zip(names[lo:hi], addrs[lo:hi], strict=True))

    @property
    def relocatable(self) -> bool:
        """Whether the symbols are link-time addresses still to be moved by the KASLR offset."""
        return bool(self.metadata.get("relocatable"))

    def relocated(self, virtual_offset: int, phys_base: int) -> KernelProfile:
        """This profile with every kernel-image symbol moved by ``virtual_offset`` (KASLR).

        Symbols below ``__START_KERNEL_map`` (per-cpu offsets, absolute values) stay. The metadata
        records the offsets (``kaslr``) and is no longer ``relocatable``.

        >>> p = KernelProfile.from_dict({**example_profile(), "metadata": {"relocatable": True}})
        >>> r = p.relocated(0x200000, 0x1000000)
        >>> hex(r.symbol("_stext")), hex(r.symbol("current_task")), r.relocatable
        ('0xffffffff81200000', '0x20c40', False)
        """
        symbols = {
            name: {**sym, "address": sym["address"] + virtual_offset}
            if sym["address"] >= START_KERNEL_MAP else sym
            for name, sym in self._symbols.items()
        }
        meta = {**self.metadata, "relocatable": False,
                "kaslr": {"virtual_offset": virtual_offset, "phys_base": phys_base}}
        return KernelProfile({**self.data, "metadata": meta, "symbols": symbols}, self.path)

    # -- types -----------------------------------------------------------------------------------
    def has_type(self, struct: str) -> bool:
        """Whether the profile describes struct/union ``struct``."""
        return struct in self._user_types

    def _type(self, struct: str) -> dict[str, Any]:
        try:
            return dict(self._user_types[struct])
        except KeyError:
            raise VimsError(f"the kernel profile of {self.release} has no struct {struct!r}") from None

    def size(self, struct: str) -> int:
        """``sizeof(struct <struct>)`` in bytes."""
        return int(self._type(struct)["size"])

    def member(self, struct: str, member: str) -> dict[str, Any]:
        """``{"offset": int, "type": descriptor}`` of ``member`` (dotted for nested: ``"thread.sp"``)."""
        offset = 0
        current = struct
        parts = member.split(".")
        field: dict[str, Any] = {}
        for i, part in enumerate(parts):
            fields = self._type(current)["fields"]
            if part not in fields:
                raise VimsError(
                    f"struct {current!r} has no member {part!r} in the kernel profile of {self.release}"
                )
            field = fields[part]
            offset += int(field["offset"])
            if i < len(parts) - 1:
                kind = field["type"].get("kind")
                if kind not in ("struct", "union"):
                    raise VimsError(f"{current}.{part} is not a struct or union (it is a {kind})")
                current = field["type"]["name"]
        return {"offset": offset, "type": field["type"]}

    def offset(self, struct: str, member: str) -> int:
        """The byte offset of ``member`` in ``struct`` (``member`` may be dotted: ``"thread.sp"``)."""
        return int(self.member(struct, member)["offset"])

    def fields(self, struct: str) -> dict[str, Any]:
        """Every member of ``struct`` with its offset and type descriptor."""
        return dict(self._type(struct)["fields"])

    def enum(self, name: str) -> dict[str, int]:
        """The constants of enum ``name``."""
        try:
            return dict(self.data.get("enums", {})[name]["constants"])
        except KeyError:
            raise VimsError(f"the kernel profile of {self.release} has no enum {name!r}") from None

    def __repr__(self) -> str:
        return (
            f"KernelProfile(release={self.release!r}, symbols={len(self._symbols)}, "
            f"types={len(self._user_types)})"
        )


def example_profile() -> dict[str, Any]:
    """A tiny hand-made profile (for examples and tests that need no guest)."""
    return make_profile(
        symbols={
            "_stext": {"address": 0xFFFFFFFF81000000, "type": "T"},
            "init_task": {"address": 0xFFFFFFFF82A0C940, "type": "D"},
            "current_task": {"address": 0x20C40, "type": "D"},
        },
        types={
            "user_types": {
                "task_struct": {
                    "kind": "struct",
                    "size": 9792,
                    "fields": {
                        "pid": {"offset": 2416, "type": {"kind": "base", "name": "int"}},
                        "thread": {"offset": 5376, "type": {"kind": "struct", "name": "thread_struct"}},
                    },
                },
                "thread_struct": {
                    "kind": "struct",
                    "size": 4416,
                    "fields": {"sp": {"offset": 8, "type": {"kind": "base", "name": "long unsigned int"}}},
                },
            }
        },
        metadata={"release": "6.1.0-test", "cpu": "max", "producer": {"name": "vims"}},
    )
