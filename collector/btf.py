"""The kernel's BTF: structure layouts read straight from ``vmlinuz``, without ``bpftool`` or ``pahole``.

Debian kernels carry their type information as BTF in the ``.BTF`` section of ``vmlinux``, which hides
compressed inside ``vmlinuz``. This module finds and decompresses that payload
(:func:`extract_vmlinux`), finds the section (:func:`elf_section`), decodes the BTF type records
(:func:`parse_btf`) and turns them into the ``user_types``/``base_types``/``enums`` parts of a
Volatility 3 style symbol table (:func:`to_isf`).

Anonymous structs and unions inside a structure are flattened into it, as C lets you name their
members directly (``task_struct`` gets its members that sit in unnamed unions); they are also kept
as ``__anon_<id>`` types.

>>> raw = build_btf_example()
>>> types = parse_btf(raw)
>>> isf = to_isf(types)
>>> isf["user_types"]["pair"]["fields"]["b"]
{'offset': 4, 'type': {'kind': 'base', 'name': 'int'}}
>>> isf["user_types"]["pair"]["size"]
8
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from vims.errors import InputError

__all__ = [
    "BtfType",
    "build_btf_example",
    "elf_section",
    "extract_vmlinux",
    "parse_btf",
    "to_isf",
]

BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)

_KIND_NAMES = {
    INT: "int", PTR: "ptr", ARRAY: "array", STRUCT: "struct", UNION: "union", ENUM: "enum", FWD: "fwd",
    TYPEDEF: "typedef", VOLATILE: "volatile", CONST: "const", RESTRICT: "restrict", FUNC: "func",
    FUNC_PROTO: "func_proto", VAR: "var", DATASEC: "datasec", FLOAT: "float", DECL_TAG: "decl_tag",
    TYPE_TAG: "type_tag", ENUM64: "enum64",
}  # fmt: skip

_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


@dataclass
class BtfType:
    """One BTF type record.

    ``members`` holds ``(name, type_id, bit_offset, bitfield_size)`` for structs and unions,
    ``(name, value)`` for enums and ``(name, type_id)`` for function prototypes.
    """

    id: int
    kind: int
    name: str
    size: int = 0  # bytes, for int/struct/union/enum/float/datasec
    type: int = 0  # the referenced type, for ptr/typedef/qualifiers/func/var
    vlen: int = 0
    kind_flag: bool = False
    members: list[tuple[Any, ...]] = field(default_factory=list)
    # ints: encoding (1 signed, 2 char, 4 bool) and bit size; arrays: element type and count
    encoding: int = 0
    bits: int = 0
    elem: int = 0
    count: int = 0

    @property
    def kind_name(self) -> str:
        return _KIND_NAMES.get(self.kind, f"kind{self.kind}")


# -- vmlinuz -> vmlinux --------------------------------------------------------------------------

_COMPRESSED = (
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("gzip", b"\x1f\x8b\x08"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
)


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if kind == "zstd":
        try:
            import zstandard
        except ImportError as exc:  # Python < 3.14 has no zstd in its standard library
            raise InputError("this vmlinuz is zstd-compressed: pip install zstandard") from exc
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    raise InputError(f"unknown compression {kind}")


def extract_vmlinux(vmlinuz: bytes, where: str = "vmlinuz") -> bytes:
    """The ELF ``vmlinux`` inside a compressed kernel image (bzImage), found by trying each payload.

    An image that already is an ELF file is returned as it is.

    >>> extract_vmlinux(gzip.compress(b"\\x7fELF" + bytes(60)) + b"tail")[:4]
    b'\\x7fELF'
    """
    if vmlinuz[:4] == b"\x7fELF":
        return vmlinuz
    candidates: list[tuple[int, str]] = []
    for kind, magic in _COMPRESSED:
        start = vmlinuz.find(magic)
        while start >= 0 and len(candidates) < 64:
            candidates.append((start, kind))
            start = vmlinuz.find(magic, start + 1)
    for _start, kind in sorted(candidates):
        try:
            data = _decompress(kind, vmlinuz[_start:])
        except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError):
            continue
        if data[:4] == b"\x7fELF":
            return data
    raise InputError("no compressed ELF kernel found inside the image", where=where)


def elf_section(elf: bytes, name: str, where: str = "vmlinux") -> bytes:
    """The bytes of section ``name`` of a 64-bit little-endian ELF file.

    >>> elf_section(b"\\x7fELF\\x02\\x01" + bytes(58), ".BTF")
    Traceback (most recent call last):
    ...
    vims.errors.InputError: vmlinux: no .BTF section (the ELF file has no section headers)
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise InputError("not a 64-bit little-endian ELF file", where=where)
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if not shoff or not shnum:
        raise InputError(f"no {name} section (the ELF file has no section headers)", where=where)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        sh_name = struct.unpack_from("<I", elf, base)[0]
        sh_offset, sh_size = struct.unpack_from("<QQ", elf, base + 0x18)
        return sh_name, sh_offset, sh_size

    _, str_off, str_size = header(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        sh_name, off, size = header(i)
        end = names.find(b"\0", sh_name)
        if names[sh_name:end].decode("latin-1") == name:
            return elf[off : off + size]
    raise InputError(f"no {name} section (kernel built without CONFIG_DEBUG_INFO_BTF?)", where=where)


# -- BTF records ---------------------------------------------------------------------------------


def parse_btf(data: bytes, where: str = ".BTF") -> list[BtfType]:
    """Decode raw BTF into a list indexed by type id (entry 0 is ``void``)."""
    if len(data) < 24:
        raise InputError("BTF data too short", where=where)
    magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise InputError(f"bad BTF magic {magic:#x} (expected {BTF_MAGIC:#x})", where=where)
    if version != 1:
        raise InputError(f"unsupported BTF version {version}", where=where)
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    strings = data[hdr_len + str_off : hdr_len + str_off + str_len]

    def name_at(off: int) -> str:
        end = strings.find(b"\0", off)
        return strings[off:end].decode("utf-8", "replace")

    types = [BtfType(0, 0, "void")]
    pos = hdr_len + type_off
    end = pos + type_len
    u32 = struct.Struct("<I")
    while pos < end:
        name_off, info, size_type = struct.unpack_from("<III", data, pos)
        pos += 12
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        t = BtfType(len(types), kind, name_at(name_off), vlen=vlen, kind_flag=bool(info >> 31))
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            t.size = size_type
        else:
            t.type = size_type
        if kind == INT:
            word = u32.unpack_from(data, pos)[0]
            pos += 4
            t.encoding = (word >> 24) & 0x0F
            t.bits = word & 0xFF
        elif kind == ARRAY:
            t.elem, _index, t.count = struct.unpack_from("<III", data, pos)
            pos += 12
        elif kind in (STRUCT, UNION):
            for _ in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", data, pos)
                pos += 12
                if t.kind_flag:
                    t.members.append((name_at(m_name), m_type, m_off & 0xFFFFFF, m_off >> 24))
                else:
                    t.members.append((name_at(m_name), m_type, m_off, 0))
        elif kind == ENUM:
            for _ in range(vlen):
                m_name, val = struct.unpack_from("<Ii", data, pos)
                pos += 8
                t.members.append((name_at(m_name), val))
        elif kind == ENUM64:
            for _ in range(vlen):
                m_name, lo, hi = struct.unpack_from("<III", data, pos)
                pos += 12
                t.members.append((name_at(m_name), lo | (hi << 32)))
        elif kind == FUNC_PROTO:
            for _ in range(vlen):
                m_name, m_type = struct.unpack_from("<II", data, pos)
                pos += 8
                t.members.append((name_at(m_name), m_type))
        elif kind == VAR:
            pos += 4
        elif kind == DATASEC:
            for _ in range(vlen):
                v_type, v_off, v_size = struct.unpack_from("<III", data, pos)
                pos += 12
                t.members.append((v_type, v_off, v_size))
        elif kind == DECL_TAG:
            pos += 4
        elif kind not in (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG):
            raise InputError(f"unknown BTF kind {kind} at type {t.id}", where=where)
        types.append(t)
    return types


# -- ISF (Volatility 3 symbol table) -------------------------------------------------------------


def _resolve(types: list[BtfType], tid: int) -> BtfType:
    seen = 0
    t = types[tid]
    while t.kind in _QUALIFIERS and seen < 64:
        t = types[t.type]
        seen += 1
    return t


def _struct_name(t: BtfType) -> str:
    return t.name or f"__anon_{t.id}"


def _descriptor(types: list[BtfType], tid: int, depth: int = 0) -> dict[str, Any]:
    """The ISF type descriptor of type ``tid`` (typedefs and qualifiers resolved)."""
    t = _resolve(types, tid)
    if t.kind == 0:
        return {"kind": "base", "name": "void"}
    if t.kind in (INT, FLOAT):
        return {"kind": "base", "name": t.name}
    if t.kind == PTR:
        if depth > 8:
            return {"kind": "pointer", "subtype": {"kind": "base", "name": "void"}}
        return {"kind": "pointer", "subtype": _descriptor(types, t.type, depth + 1)}
    if t.kind == ARRAY:
        return {"kind": "array", "count": t.count, "subtype": _descriptor(types, t.elem, depth + 1)}
    if t.kind in (STRUCT, UNION):
        return {"kind": "struct" if t.kind == STRUCT else "union", "name": _struct_name(t)}
    if t.kind == FWD:
        return {"kind": "union" if t.kind_flag else "struct", "name": t.name}
    if t.kind in (ENUM, ENUM64):
        return {"kind": "enum", "name": t.name or f"__anon_{t.id}"}
    if t.kind in (FUNC, FUNC_PROTO):
        return {"kind": "function"}
    return {"kind": "base", "name": "void"}


def _fields(types: list[BtfType], t: BtfType, base_bits: int, out: dict[str, Any]) -> None:
    for name, tid, bit_off, bitfield in t.members:
        bits = base_bits + bit_off
        target = _resolve(types, tid)
        if not name and target.kind in (STRUCT, UNION):
            _fields(types, target, bits, out)  # C's anonymous members: reachable by their own names
            continue
        if not name or name in out:
            continue
        desc = _descriptor(types, tid)
        if bitfield or bits % 8:
            base = _resolve(types, tid)
            unit = max(1, base.size) * 8
            start = bits - bits % unit
            desc = {
                "kind": "bitfield",
                "bit_position": bits - start,
                "bit_length": bitfield or base.bits or unit,
                "type": desc,
            }
            out[name] = {"offset": start // 8, "type": desc}
        else:
            out[name] = {"offset": bits // 8, "type": desc}


def to_isf(types: list[BtfType]) -> dict[str, Any]:
    """``user_types``, ``base_types`` and ``enums`` of a Volatility 3 symbol table, from BTF types."""
    user_types: dict[str, Any] = {}
    base_types: dict[str, Any] = {
        "void": {"kind": "void", "size": 0, "signed": False, "endian": "little"},
        "pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"},
    }
    enums: dict[str, Any] = {}
    for t in types:
        if t.kind in (STRUCT, UNION):
            name = _struct_name(t)
            previous = user_types.get(name)
            if previous is not None and len(previous["fields"]) >= len(t.members):
                continue  # a duplicate name (rare after dedup): keep the richer definition
            fields: dict[str, Any] = {}
            _fields(types, t, 0, fields)
            user_types[name] = {
                "kind": "struct" if t.kind == STRUCT else "union",
                "size": t.size,
                "fields": fields,
            }
        elif t.kind == INT and t.name not in base_types:
            kind = "bool" if t.encoding & 4 else "char" if t.encoding & 2 else "int"
            base_types[t.name] = {
                "kind": kind, "size": t.size, "signed": bool(t.encoding & 1), "endian": "little",
            }  # fmt: skip
        elif t.kind == FLOAT and t.name not in base_types:
            base_types[t.name] = {"kind": "float", "size": t.size, "signed": True, "endian": "little"}
        elif t.kind in (ENUM, ENUM64):
            name = t.name or f"__anon_{t.id}"
            signed = t.kind_flag
            base = {1: "char", 2: "short", 4: "int", 8: "long"}.get(t.size, "int")
            enums[name] = {
                "size": t.size,
                "base": base if signed else f"unsigned {base}",
                "constants": dict(t.members),
            }
    return {"user_types": user_types, "base_types": base_types, "enums": enums}


def variable_types(types: list[BtfType]) -> dict[str, dict[str, Any]]:
    """The type descriptor of each global (and per-cpu) variable that BTF describes, by name."""
    out: dict[str, dict[str, Any]] = {}
    for t in types:
        if t.kind == VAR and t.name:
            out[t.name] = _descriptor(types, t.type)
    return out


def build_btf_example() -> bytes:
    """A tiny BTF blob: ``int`` and ``struct pair { int a; int b; }`` (for examples and tests)."""
    strings = b"\0int\0pair\0a\0b\0"
    recs = struct.pack("<III", 1, (INT << 24), 4) + struct.pack("<I", (1 << 24) | 32)
    recs += struct.pack("<III", 5, (STRUCT << 24) | 2, 8)
    recs += struct.pack("<III", 10, 1, 0) + struct.pack("<III", 12, 1, 32)
    header = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(recs), len(recs), len(strings))
    return header + recs + strings


def read_kernel_btf(vmlinuz_path: str) -> list[BtfType]:
    """Parsed BTF of a kernel image file (``vmlinuz`` or ``vmlinux``)."""
    with open(vmlinuz_path, "rb") as f:
        image = f.read()
    if image[:2] == b"\x1f\x8b":  # a gzipped vmlinux (some distributions)
        image = gzip.decompress(image)
    elf = extract_vmlinux(image, where=vmlinuz_path)
    return parse_btf(elf_section(elf, ".BTF", where=vmlinuz_path), where=f"{vmlinuz_path}:.BTF")
