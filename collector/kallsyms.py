"""Kernel symbols recovered from the kallsyms tables inside the kernel image, with no guest running.

The kernel carries its own symbol table for ``/proc/kallsyms`` in ``.rodata`` (``scripts/kallsyms.c``
writes it). Kernel 6.1 lays it out as, each table aligned to 8 bytes::

    kallsyms_offsets        int32[num_syms]     (CONFIG_KALLSYMS_BASE_RELATIVE)
    kallsyms_relative_base  u64                 (link-time address of _text)
    kallsyms_num_syms       u32
    kallsyms_names          per symbol: length (1 byte, or 2 as ULEB128 if >= 0x80), token indices
    kallsyms_markers        u64 or u32 [ceil(num_syms / 256)]: offset in names of every 256th symbol
    kallsyms_token_table    256 NUL-terminated strings
    kallsyms_token_index    u16[256]: offset of each token in the token table

None of them is named in the image (the ELF has no symbol table), so :func:`find_tables` finds them by
their structure: the token table holds the digits as one-character tokens at their own byte values
(``"0\\0" "1\\0" ... "9\\0"``), the token index that follows must point at its strings, the markers
before it are an increasing list that starts at 0, and a ``num_syms`` that fits the markers precedes
a names stream that decodes to exactly that many symbols, the markers agreeing. The first character
of a decoded name is its type letter, as in ``/proc/kallsyms``.

Addresses are link-time ones (``_text`` at ``0xffffffff81000000``); under KASLR add the virtual
offset (:func:`vims.collector.kaslr.find_kaslr`, :meth:`KernelProfile.relocated`). With
``CONFIG_KALLSYMS_ABSOLUTE_PERCPU`` a non-negative offset is an absolute value (per-cpu variables,
whose "address" is their offset in the per-cpu area); a negative one is ``relative_base - 1 - offset``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vims.errors import InputError

__all__ = ["KallsymsTables", "build_profile", "find_tables", "read_symbols"]

_DIGITS = b"".join(bytes([c, 0]) for c in b"0123456789")
_U16 = struct.Struct("<H")


@dataclass(frozen=True)
class KallsymsTables:
    """Where the kallsyms tables are in an image (byte offsets into it) and what they hold."""

    num_syms: int
    offsets: int
    relative_base: int
    names: int
    markers: int
    marker_size: int
    token_table: int
    token_index: int
    tokens: tuple[bytes, ...]


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _token_table(image: bytes) -> tuple[int, int, tuple[bytes, ...]]:
    """``(token_table offset, token_index offset, tokens)``; checked against the index."""
    pos = image.find(_DIGITS)
    while pos >= 0:
        start = pos
        for _ in range(ord("0")):  # walk back over tokens 0x2f .. 0x00
            start = image.rfind(b"\0", 0, start - 1) + 1
        tokens: list[bytes] = []
        cur = start
        for _ in range(256):
            end = image.find(b"\0", cur)
            tokens.append(image[cur:end])
            cur = end + 1
        index = _align8(cur)
        expect, good = 0, True
        for i, tok in enumerate(tokens):
            if _U16.unpack_from(image, index + 2 * i)[0] != expect:
                good = False
                break
            expect += len(tok) + 1
        if good and tokens[ord("0")] == b"0":
            return start, index, tuple(tokens)
        pos = image.find(_DIGITS, pos + 1)
    raise InputError("no kallsyms token table in the kernel image (built without CONFIG_KALLSYMS?)")


def _markers(image: bytes, token_table: int) -> tuple[int, int, list[int]]:
    """``(markers offset, entry size, markers)``: the nearest run before the token table of increasing
    offsets that starts at 0, each step one 256-symbol stretch of names (kernels with
    ``kallsyms_seqs_of_names`` put that table between the markers and the token table)."""
    floor = max(0, token_table - 8 * 1024 * 1024)
    for pos in range(token_table & ~7, floor, -4):
        for size, fmt in ((8, "<Q"), (4, "<I")):
            if pos % size:
                continue
            values = _increasing(image, pos, size, fmt)
            if len(values) >= 16:
                return pos, size, values
    raise InputError("no kallsyms markers before the token table in the kernel image")


def _increasing(image: bytes, pos: int, size: int, fmt: str) -> list[int]:
    """The run of markers at ``pos``: 0, then steps of 256 names (256 to 16 KiB bytes each)."""
    if struct.unpack_from(fmt, image, pos)[0] != 0:
        return []
    values = [0]
    at = pos + size
    while at + size <= len(image):
        value = struct.unpack_from(fmt, image, at)[0]
        if not 256 <= value - values[-1] <= 16384:
            break
        values.append(value)
        at += size
    return values


def _decode_names(image: bytes, start: int, count: int, limit: int) -> tuple[list[int], int] | None:
    """Offsets (relative to ``start``) of ``count`` names and the end; None if they do not fit."""
    pos, starts = start, []
    for _ in range(count):
        if pos >= limit:
            return None
        starts.append(pos - start)
        length, pos = _name_length(image, pos)
        if length == 0:
            return None
        pos += length
    return starts, pos


def find_tables(image: bytes) -> KallsymsTables:
    """Locate the kallsyms tables in a decompressed kernel image (``vmlinux``) by their structure."""
    token_table, token_index, tokens = _token_table(image)
    markers_at, marker_size, markers = _markers(image, token_table)
    low, high = (len(markers) - 1) * 256 + 1, len(markers) * 256
    pos = (markers_at - markers[-1] - 8) & ~7
    floor = max(0, pos - 16 * 1024 * 1024)
    while pos >= floor:
        num = struct.unpack_from("<I", image, pos)[0]
        if low <= num <= high and not struct.unpack_from("<I", image, pos + 4)[0]:
            decoded = _decode_names(image, pos + 8, num, markers_at)
            if decoded is not None:
                starts, end = decoded
                if markers_at - 8 < end <= markers_at and all(
                    starts[256 * i] == m for i, m in enumerate(markers)
                ):
                    base_at = pos - 8
                    offsets = base_at - _align8(4 * num)
                    return KallsymsTables(
                        num_syms=num, offsets=offsets,
                        relative_base=struct.unpack_from("<Q", image, base_at)[0], names=pos + 8,
                        markers=markers_at, marker_size=marker_size, token_table=token_table,
                        token_index=token_index, tokens=tokens,
                    )  # fmt: skip
        pos -= 8
    raise InputError("no kallsyms_num_syms and names that fit the markers in the kernel image")


def read_symbols(image: bytes, tables: KallsymsTables | None = None) -> dict[str, dict[str, Any]]:
    """Every symbol of the image as ISF symbols ``{name: {"address", "type"}}`` (first name wins).

    Addresses are link-time addresses; see the module docstring.
    """
    t = tables or find_tables(image)
    offsets = struct.unpack_from(f"<{t.num_syms}i", image, t.offsets)
    symbols: dict[str, dict[str, Any]] = {}
    pos = t.names
    tokens = t.tokens
    for i in range(t.num_syms):
        length, pos = _name_length(image, pos)
        text = b"".join(tokens[b] for b in image[pos : pos + length]).decode("latin-1")
        pos += length
        off = offsets[i]
        address = off if off >= 0 else t.relative_base - 1 - off
        symbols.setdefault(text[1:], {"address": address, "type": text[0]})
    return symbols


def _banner(image: bytes, release: str) -> str:
    """The kernel's ``linux_banner`` string as the image holds it (empty if not found).

    Debian's image holds the string twice: a template with ``# SMP`` and the banner itself with the
    build number (``#1 SMP``); the banner is the one whose ``#`` a digit follows.
    """
    found = ""
    start = image.find(f"Linux version {release} (".encode())
    while start >= 0:
        text = image[start : image.find(b"\0", start)].decode("latin-1")
        found = found or text
        hash_at = text.find(" #")
        if hash_at >= 0 and text[hash_at + 2 : hash_at + 3].isdigit():
            return text
        start = image.find(f"Linux version {release} (".encode(), start + 1)
    return found


def build_profile(vmlinuz: Path, release: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kernel profile of ``vmlinuz`` from its own files: BTF layouts and the kallsyms tables.

    The symbols hold link-time addresses; the profile's metadata says ``"relocatable": true`` and
    the link-time ``_text``, so a reader relocates them by the KASLR offset found at attach time.
    """
    from vims.collector.btf import elf_section, extract_vmlinux, parse_btf, to_isf
    from vims.collector.profile import make_profile

    image = extract_vmlinux(Path(vmlinuz).read_bytes(), where=str(vmlinuz))
    tables = find_tables(image)
    symbols = read_symbols(image, tables)
    types = to_isf(parse_btf(elf_section(image, ".BTF", where=str(vmlinuz)), where=str(vmlinuz)))
    meta = {
        "release": release,
        "banner": _banner(image, release),
        "relocatable": True,
        "link_text": symbols["_text"]["address"] if "_text" in symbols else tables.relative_base,
        "producer": {"name": "vims", "version": "0.1.0", "sources": "kallsyms tables in vmlinux + BTF"},
        **(metadata or {}),
    }
    return make_profile(symbols, types, meta)


def _name_length(image: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The length of the compressed name at ``pos`` (one byte, or two when the high bit is set: kernel
    6.1+ names of more than 127 tokens) and where the name's tokens start."""
    length = image[pos]
    if length & 0x80:
        return (length & 0x7F) | (image[pos + 1] << 7), pos + 2
    return length, pos + 1
