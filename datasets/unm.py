"""Importer of the University of New Mexico system-call data (Forrest et al., 1996).

A program's folder holds ``normal/`` and ``intrusion/`` folders of files with one event per line,
``PID SYSCALL``; a file interleaves several processes. Each (file, PID) becomes one trace, in the
order its lines appear; the label comes from the folder.

The program is the folder's name unless given. Where the name joins several programs with ``-``
(``login-ps``) and every file name starts with one of them (``ps-normal.txt``), each file's program
is taken from its name. An intrusion trace's family is its file name without the program prefix and
the run number: ``fwd-loops-3.int`` -> ``fwd-loops``, ``login-homegrown.int`` -> ``homegrown``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from vims.console import track
from vims.datasets._parse import decode, parse_ints
from vims.datasets.traces import Trace, trace_table
from vims.errors import InputError

LABELS = {"normal": "normal", "intrusion": "attack"}
_RUN_SUFFIX = re.compile(r"-\d+$")


def family_of(stem: str, program: str) -> str:
    """The intrusion family of a file, from its name without extension.

    >>> family_of("fwd-loops-3", "synthetic-sendmail")
    'fwd-loops'
    >>> family_of("login-homegrown", "login")
    'homegrown'
    """
    if stem.startswith(program + "-"):
        stem = stem[len(program) + 1 :]
    return _RUN_SUFFIX.sub("", stem) or stem


def _programs_of(files: list[Path], folder_program: str) -> dict[Path, str]:
    parts = folder_program.split("-")
    if len(parts) > 1:
        by_name = {f: next((p for p in parts if f.name.startswith(p + "-")), None) for f in files}
        if all(by_name.values()):
            return {f: str(p) for f, p in by_name.items()}
    return dict.fromkeys(files, folder_program)


def read_unm_file(path: Path, program: str, label: str, family: str | None) -> list[Trace]:
    """The per-PID traces of one UNM file (an empty file gives one empty trace)."""
    where = str(path)
    text = decode(path.read_bytes(), where)
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = len(line.split())
        if fields not in (0, 2):
            raise InputError(f"expected two integers 'PID SYSCALL', found {fields} field(s)",
                             where=f"{where}:{lineno}")
    pairs = parse_ints(text, where).reshape(-1, 2)
    if not len(pairs):
        return [Trace(f"unm:{program}/{path.parent.name}/{path.name}:empty", "unm", np.empty(0, np.int32),
                      label=label, program=program, family=family)]
    pids = pairs[:, 0]
    order = np.argsort(pids, kind="stable")  # keeps each process's calls in file order
    sorted_pids = pids[order]
    starts = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1]])
    ends = np.r_[starts[1:], len(order)]
    calls = pairs[order, 1]
    return [
        Trace(f"unm:{program}/{path.parent.name}/{path.name}:{int(sorted_pids[s])}", "unm", calls[s:e],
              label=label, program=program, family=family)
        for s, e in zip(starts, ends, strict=True)
    ]


def read_unm(path: str | Path, program: str | None = None, progress: bool = False) -> pa.Table:
    """Read a UNM program folder (``normal/`` and ``intrusion/``) into a trace table.

    Parameters
    ----------
    path : str or Path
        The program's folder, e.g. ``unm/synthetic-sendmail``.
    program : str, optional
        The program name; by default the folder's name (see the module docstring for ``login-ps``).
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    pyarrow.Table
        One row per (file, PID) in :data:`vims.schemas.TRACE_SCHEMA`; ``split`` is left empty.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InputError("not a folder (expected a UNM program folder with normal/ and intrusion/)",
                         where=folder)
    files = [(f, LABELS[sub]) for sub in LABELS if (folder / sub).is_dir()
             for f in sorted((folder / sub).iterdir()) if f.is_file() and not f.name.startswith(".")]
    if not files:
        raise InputError("no UNM layout here: expected normal/ and intrusion/ folders of trace files",
                         where=folder)
    programs = {f: program for f, _ in files} if program else _programs_of([f for f, _ in files], folder.name)
    items = track(files, f"UNM {folder.name}", total=len(files)) if progress else iter(files)
    traces: list[Trace] = []
    for file, label in items:
        prog = str(programs[file])
        stem = file.name.split(".")[0]
        traces.extend(read_unm_file(file, prog, label, family_of(stem, prog) if label == "attack" else None))
    return trace_table(traces)


def syscall_map(path: str | Path) -> dict[int, str]:
    """UNM's own system call names by number, from a ``syscallMap.txt`` (``NUMBER NAME`` lines).

    ``path`` is the map file or the program's folder holding it (``synthetic-sendmail`` has one;
    ``login-ps`` has none, so its calls stay numbers). The SunOS numbers are not Linux's.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "syscallMap.txt"
    if not p.is_file():
        raise InputError("no UNM syscallMap.txt here", where=p)
    out: dict[int, str] = {}
    for lineno, line in enumerate(decode(p.read_bytes(), str(p)).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit():
            raise InputError("expected 'NUMBER NAME'", where=f"{p}:{lineno}")
        out[int(fields[0])] = fields[1]
    return out
