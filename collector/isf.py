"""The kernel profile as a Volatility 3 symbol file (ISF), for Volatility as an independent judge.

A :class:`~vims.collector.profile.KernelProfile` is already shaped like an ISF (``metadata``,
``base_types``, ``user_types``, ``enums``, ``symbols``); what differs: a profile symbol carries its
kallsyms letter under ``type`` (an ISF symbol's ``type`` is a type descriptor), and Volatility finds a
Linux symbol table by the kernel's banner, which an ISF holds as the ``constant_data`` of
``linux_banner``. :func:`to_isf` makes the ISF; :func:`write_isf` writes it where Volatility's ``-s``
finds it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from vims.errors import VimsError


def _struct(name: str) -> dict[str, Any]:
    return {"kind": "struct", "name": name}


def _base(name: str) -> dict[str, Any]:
    return {"kind": "base", "name": name}


#: The C types the kernel declares its well-known variables with (BTF types only per-cpu variables, and
#: Volatility reads a variable through its symbol's type): ``symbol: (descriptor, struct it needs)``.
DECLARED: dict[str, tuple[dict[str, Any], str | None]] = {
    "init_task": (_struct("task_struct"), "task_struct"),
    "modules": (_struct("list_head"), "list_head"),
    "module_kset": ({"kind": "pointer", "subtype": _struct("kset")}, "kset"),
    "mod_tree": (_struct("mod_tree_root"), "mod_tree_root"),
    "init_mm": (_struct("mm_struct"), "mm_struct"),
    "init_pid_ns": (_struct("pid_namespace"), "pid_namespace"),
    "init_cred": (_struct("cred"), "cred"),
    "init_files": (_struct("files_struct"), "files_struct"),
    "tk_core": (_struct("tk_data"), "tk_data"),
    "idt_table": ({"kind": "array", "count": 256, "subtype": _struct("gate_struct")}, "gate_struct"),
    # TAINT_FLAGS_COUNT of include/linux/panic.h in 6.1 (19: the flags "PFSRMBUDAWCIOELKXTN").
    "taint_flags": ({"kind": "array", "count": 19, "subtype": _struct("taint_flag")}, "taint_flag"),
    "tainted_mask": (_base("long unsigned int"), None),
    "_text": (_base("char"), None), "_stext": (_base("char"), None), "_etext": (_base("char"), None),
    "_end": (_base("char"), None),
    "page_offset_base": (_base("long unsigned int"), None), "vmemmap_base": (_base("long unsigned int"), None),
    "phys_base": (_base("long unsigned int"), None),
}


def to_isf(profile: Any) -> dict[str, Any]:
    """The ISF of ``profile`` (link-time addresses: Volatility finds KASLR's shift itself).

    Raises
    ------
    VimsError
        The profile has no banner (Volatility could not match it to a memory image).
    """
    data = profile.data
    meta = data.get("metadata", {})
    banner = meta.get("banner")
    if not banner:
        raise VimsError("the kernel profile has no banner: Volatility matches a symbol table to memory by it")
    symbols: dict[str, Any] = {name: {"address": int(entry["address"])} for name, entry in data["symbols"].items()}
    for name, (descriptor, struct) in DECLARED.items():
        if name in symbols and (struct is None or struct in data["user_types"]):
            symbols[name]["type"] = descriptor
    symbols.setdefault("linux_banner", {"address": 0})["constant_data"] = base64.b64encode(
        banner.encode() + b"\0").decode()
    producer = meta.get("producer", {})
    return {
        "metadata": {"format": "6.2.0", "producer": {"name": producer.get("name", "vims"),
                                                     "version": producer.get("version", "0")}},
        "base_types": data["base_types"], "user_types": data["user_types"], "enums": data.get("enums", {}),
        "symbols": symbols,
    }


def write_isf(profile: Any, directory: Path) -> Path:
    """Write the ISF of ``profile`` as ``DIRECTORY/linux/vims-RELEASE.json`` and return its path
    (``vol -s DIRECTORY`` finds it)."""
    path = Path(directory) / "linux" / f"vims-{profile.release}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_isf(profile)))
    return path
