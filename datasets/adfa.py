"""Importer of the ADFA Linux Dataset (ADFA-LD, Creech and Hu, 2013) in its official layout.

The layout, as a folder or inside a ``.zip``::

    ADFA-LD/Training_Data_Master/UTD-*.txt          -> split "train",      label "normal"
    ADFA-LD/Validation_Data_Master/UVD-*.txt        -> split "validation", label "normal"
    ADFA-LD/Attack_Data_Master/<Family>_<run>/*.txt -> split "attack",     label "attack", family <Family>

Each trace file is one process's system calls as space-separated integers (32-bit x86 numbering).
Empty trace files are kept, with length 0.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa

from vims.console import err, track
from vims.datasets._parse import decode, parse_ints
from vims.datasets.traces import Trace, trace_table
from vims.errors import InputError

SPLITS = {
    "Training_Data_Master": "train",
    "Validation_Data_Master": "validation",
    "Attack_Data_Master": "attack",
}
_RUN = re.compile(r"^(?P<family>.+?)_(?P<run>\d+)$")


@dataclass(frozen=True)
class _Member:
    rel: PurePosixPath  # path relative to the layout's root, e.g. Training_Data_Master/UTD-0001.txt
    name: str  # where it is, for messages


def family_of(run_folder: str) -> str:
    """The attack family of an attack run folder.

    >>> family_of("Hydra_FTP_3")
    'Hydra_FTP'
    >>> family_of("Meterpreter_10")
    'Meterpreter'
    """
    match = _RUN.match(run_folder)
    return match["family"] if match else run_folder


def _classify(rel: PurePosixPath) -> tuple[str, str | None] | None:
    """(split, family) of a trace file by its place in the layout, or None if it is not a trace file."""
    if rel.suffix.lower() != ".txt" or not rel.parts or rel.parts[0] not in SPLITS:
        return None
    split = SPLITS[rel.parts[0]]
    if split == "attack":
        return (split, family_of(rel.parts[1])) if len(rel.parts) == 3 else None
    return (split, None) if len(rel.parts) == 2 else None


def _find_root(names: list[PurePosixPath], where: str) -> PurePosixPath:
    """The folder (relative) that holds the split folders, at most two levels down."""
    for name in names:
        for depth, part in enumerate(name.parts[:3]):
            if part in SPLITS:
                return PurePosixPath(*name.parts[:depth])
    raise InputError("no ADFA-LD layout here: expected Training_Data_Master/, Validation_Data_Master/ "
                     "or Attack_Data_Master/ (at most two folders down)", where=where)


class _Source:
    """The files of the layout, from a folder or a zip, read the same way."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            names = [PurePosixPath(p.relative_to(path).as_posix()) for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except zipfile.BadZipFile:
                raise InputError("neither a folder nor a zip file", where=path) from None
            names = [PurePosixPath(i.filename) for i in self._zip.infolist() if not i.is_dir()]
        else:
            raise InputError("no such file or folder", where=path)
        self.root = _find_root(names, str(path))
        self.members: list[_Member] = []
        self.ignored: list[str] = []
        for name in sorted(names):
            try:
                rel = name.relative_to(self.root)
            except ValueError:
                continue  # outside the layout's root (e.g. a README beside ADFA-LD/)
            if _classify(rel) is None:
                if rel.parts and rel.parts[0] in SPLITS:
                    self.ignored.append(str(name))
                continue
            self.members.append(_Member(rel, f"{path}:{name}" if self._zip else str(path / name)))

    def read(self, member: _Member) -> bytes:
        if self._zip is not None:
            return self._zip.read(str(self.root / member.rel))
        return (self.path / self.root / member.rel).read_bytes()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _traces(source: _Source, progress: bool) -> Iterator[Trace]:
    members = source.members
    items = track(members, "ADFA-LD", total=len(members)) if progress else iter(members)
    for member in items:
        split, family = _classify(member.rel)  # type: ignore[misc]  # members are classified
        syscalls = parse_ints(decode(source.read(member), member.name), member.name)
        yield Trace(f"adfa-ld:{member.rel}", "adfa-ld", syscalls, split=split, family=family,
                    label="attack" if split == "attack" else "normal")


def read_adfa_ld(path: str | Path, progress: bool = False) -> pa.Table:
    """Read ADFA-LD from its official layout (a folder or a zip) into a trace table.

    Parameters
    ----------
    path : str or Path
        The ``ADFA-LD`` folder, a folder holding it, or a zip of either.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    pyarrow.Table
        One row per trace file, in :data:`vims.schemas.TRACE_SCHEMA`, sorted by ``trace_id``.

    Raises
    ------
    InputError
        No layout, a file that is not a trace, or a token that is not an integer (naming file and line).
    """
    source = _Source(Path(path))
    try:
        if not source.members:
            raise InputError("the ADFA-LD layout holds no trace files (*.txt)", where=path)
        if source.ignored:
            shown = ", ".join(source.ignored[:3]) + (" ..." if len(source.ignored) > 3 else "")
            err.print(f"[yellow]warning:[/] ignored {len(source.ignored)} file(s) that are not traces "
                      f"of the layout: {shown}", highlight=False)
        traces = list(_traces(source, progress))
    finally:
        source.close()
    return trace_table(traces)
