"""BTF parsing: a hand-made blob, malformed input, and the real Debian kernel checked against bpftool."""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.required import missing
from vims.collector import btf
from vims.errors import InputError, VimsError
from vims.paths import cache_dir


def test_example_blob_round_trip() -> None:
    types = btf.parse_btf(btf.build_btf_example())
    assert [t.kind_name for t in types] == ["kind0", "int", "struct"]
    isf = btf.to_isf(types)
    assert isf["base_types"]["int"] == {"kind": "int", "size": 4, "signed": True, "endian": "little"}
    assert isf["user_types"]["pair"]["fields"]["a"]["offset"] == 0


def test_bad_magic_is_an_input_error() -> None:
    blob = bytearray(btf.build_btf_example())
    blob[0] = 0
    with pytest.raises(InputError, match="bad BTF magic"):
        btf.parse_btf(bytes(blob))
    with pytest.raises(InputError, match="too short"):
        btf.parse_btf(b"\x9f\xeb")


@pytest.mark.parametrize("compress", [gzip.compress, lambda d: lzma.compress(d, format=lzma.FORMAT_XZ)])
def test_extract_vmlinux_finds_the_payload(compress) -> None:  # type: ignore[no-untyped-def]
    elf = b"\x7fELF\x02\x01" + bytes(200)
    image = b"MZ" + bytes(1000) + compress(elf) + bytes(100)
    assert btf.extract_vmlinux(image) == elf
    with pytest.raises(InputError, match="no compressed ELF"):
        btf.extract_vmlinux(b"MZ" + bytes(1000))


def test_elf_section_of_a_tiny_elf() -> None:
    # an ELF with a null section, a .BTF section and the section-name table
    names = b"\0.BTF\0.shstrtab\0"
    payload = btf.build_btf_example()
    data_off = 64
    names_off = data_off + len(payload)
    shoff = names_off + len(names)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)

    def sh(name: int, off: int, size: int) -> bytes:
        s = bytearray(64)
        struct.pack_into("<I", s, 0, name)
        struct.pack_into("<QQ", s, 0x18, off, size)
        return bytes(s)

    elf = bytes(header) + payload + names + sh(0, 0, 0) + sh(1, data_off, len(payload)) + sh(6, names_off, len(names))
    assert btf.elf_section(elf, ".BTF") == payload
    with pytest.raises(InputError, match=r"no \.BTF\.text section"):
        btf.elf_section(elf, ".BTF.text")


def _cached_kernel() -> Path:
    kernels = sorted(cache_dir("guest").glob("*/vmlinuz"))
    if not kernels:
        missing("no guest image in the cache yet (`vims guest build`, or run tests/guest first)")
    return kernels[-1]


def test_every_struct_agrees_with_bpftool(tmp_path: Path) -> None:
    if shutil.which("bpftool") is None:
        missing("bpftool not found (scripts/system-packages.sh installs it)")
    vmlinuz = _cached_kernel()
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(btf.extract_vmlinux(vmlinuz.read_bytes()))
    raw = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(vmlinux), "format", "raw"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    types = btf.parse_btf(btf.elf_section(vmlinux.read_bytes(), ".BTF"))
    isf = btf.to_isf(types)["user_types"]
    blocks = re.findall(r"^\[(\d+)\] (STRUCT|UNION) '([^']*)' size=(\d+) vlen=\d+\n((?:\t.*\n)*)", raw, re.M)
    assert len(blocks) > 5000
    counts: dict[str, int] = {}
    for _, _, name, _, _ in blocks:
        counts[name] = counts.get(name, 0) + 1
    checked = 0
    for tid, _kind, name, size, body in blocks:
        t = types[int(tid)]
        assert t.size == int(size) and (t.name or "(anon)") == name
        if name == "(anon)" or counts[name] > 1:
            continue  # anonymous, or one of several definitions of a name (the profile keeps one)
        assert isf[name]["size"] == int(size)
        fields = isf[name]["fields"]
        members = re.findall(r"\t'(\w+)' type_id=\d+ bits_offset=(\d+)(?: bitfield_size=(\d+))?", body)
        for member, bits, bitfield in members:
            got = fields[member]
            if bitfield or int(bits) % 8:
                start = got["offset"] * 8 + got["type"]["bit_position"]
                assert start == int(bits), (name, member)
            else:
                assert got["offset"] * 8 == int(bits), (name, member)
            checked += 1
    assert checked > 30000


def test_profile_from_btf_and_kallsyms(tmp_path: Path) -> None:
    from vims.collector.profile import KernelProfile, make_profile, parse_kallsyms

    symbols = parse_kallsyms("ffffffff81000000 T _stext\nffffffff81000100 t helper\nffffffffc0000000 t m [mod]\n")
    data = make_profile(symbols, btf.to_isf(btf.parse_btf(btf.build_btf_example())), {"release": "x"})
    path = tmp_path / "profile.json"
    KernelProfile(data).save(path)
    profile = KernelProfile.load(path)
    assert profile.offset("pair", "b") == 4 and profile.size("pair") == 8
    assert profile.symbol_at(0xFFFFFFFF81000104) == ("helper", 4)
    assert not profile.has_symbol("m")  # module symbols move between boots
    assert profile.symbols_between(0xFFFFFFFF81000000, 0xFFFFFFFF81000101) == [
        ("_stext", 0xFFFFFFFF81000000), ("helper", 0xFFFFFFFF81000100),
    ]  # fmt: skip
    with pytest.raises(VimsError, match="no member 'c'"):
        profile.offset("pair", "c")
    with pytest.raises(VimsError, match="is not a struct"):
        profile.offset("pair", "a.x")
    with pytest.raises(VimsError, match="no struct 'nope'"):
        profile.size("nope")
    with pytest.raises(VimsError, match="no symbol at or below"):
        profile.symbol_at(0x1000)


def test_profile_input_errors(tmp_path: Path) -> None:
    from vims.collector.profile import KernelProfile, parse_kallsyms

    with pytest.raises(InputError, match=r"kallsyms:2: not a hex address"):
        parse_kallsyms("ffffffff81000000 T a\nzz T b\n")
    bad = tmp_path / "bad.json"
    bad.write_text('{"metadata": {}')
    with pytest.raises(InputError, match=r"bad.json:1: not JSON"):
        KernelProfile.load(bad)
    bad.write_text('{"metadata": {}}')
    with pytest.raises(InputError, match="no 'symbols' section"):
        KernelProfile.load(bad)
    with pytest.raises(VimsError, match="vims guest build"):
        KernelProfile.load(tmp_path / "missing.json")


# -- kallsyms tables (vims.collector.kallsyms): the other half of a profile built from the image --


def _kallsyms_blob(symbols: list[tuple[str, int]], seqs: bool) -> bytes:
    """Kernel-6.1-shaped kallsyms tables (as scripts/kallsyms.c lays them out) inside filler bytes."""
    import struct as st

    base = 0xFFFFFFFF81000000
    tokens = [bytes([i]) if 0x20 < i < 0x7F else b"" for i in range(256)]
    tokens[0x01], tokens[0x02] = b"sys_", b"_task"
    for i in range(256):
        tokens[i] = tokens[i] or b"\x7f%d" % i  # unused codes still hold a token
    encode = {b"sys_": 1, b"_task": 2}

    def pack_name(name: bytes) -> bytes:
        out = bytearray()
        while name:
            for tok, code in encode.items():
                if name.startswith(tok):
                    out.append(code)
                    name = name[len(tok):]
                    break
            else:
                out.append(name[0])
                name = name[1:]
        return bytes([len(out)]) + out

    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 8)

    offs = [a if a < base else -(a - base) - 1 for _, a in symbols]
    names = [pack_name(n.encode()) for n, _ in symbols]
    markers, at = [], 0
    for i, n in enumerate(names):
        if i % 256 == 0:
            markers.append(at)
        at += len(n)
    blob = pad(st.pack(f"<{len(offs)}i", *offs)) + st.pack("<Q", base)
    blob += pad(st.pack("<I", len(symbols))) + pad(b"".join(names))
    blob += pad(st.pack(f"<{len(markers)}I", *markers))
    if seqs:
        blob += pad(b"".join(i.to_bytes(3, "big") for i in range(len(symbols))))
    table = b"".join(t + b"\0" for t in tokens)
    index, pos = [], 0
    for t in tokens:
        index.append(pos)
        pos += len(t) + 1
    blob += pad(table) + st.pack("<256H", *index)
    return b"\x90" * 4096 + blob + b"\xcc" * 4096


@pytest.mark.parametrize("seqs", [False, True])
def test_kallsyms_tables_are_found_by_their_structure(seqs: bool) -> None:
    from vims.collector.kallsyms import read_symbols

    symbols = [("Dcurrent_task", 0x1FB80)] + [
        (f"Tsys_call_{i}", 0xFFFFFFFF81000000 + 16 * i) for i in range(4500)
    ] + [("Dinit_task", 0xFFFFFFFF82A1AA40)]
    found = read_symbols(_kallsyms_blob(symbols, seqs))
    assert len(found) == len(symbols)
    assert found["current_task"] == {"address": 0x1FB80, "type": "D"}
    assert found["init_task"] == {"address": 0xFFFFFFFF82A1AA40, "type": "D"}
    assert found["sys_call_4499"]["address"] == 0xFFFFFFFF81000000 + 16 * 4499


def test_an_image_without_kallsyms_tables_is_a_clear_error() -> None:
    from vims.collector.kallsyms import find_tables
    from vims.errors import InputError

    with pytest.raises(InputError, match="token table"):
        find_tables(bytes(8192))
