"""A small client of QEMU's machine protocol (QMP): the monitor of a VM that VIMS did not start.

QMP is line-delimited JSON on a socket (``-qmp unix:PATH,server=on,wait=off`` on QEMU's command line,
or the monitor socket libvirt keeps for each domain): a greeting, then ``qmp_capabilities``, then one
answer per command, with asynchronous events in between (kept aside in :attr:`Qmp.events`). The human
monitor's commands (``gpa2hva``, ``gdbserver``) are reached through ``human-monitor-command``.

A libvirt domain's monitor socket is libvirt's own (libvirtd holds it); :class:`LibvirtMonitor`
speaks the same QMP through libvirt's monitor pass-through (``libvirt-python``, the ``libvirt``
extra). :func:`open_monitor` opens either from one address: a socket path, ``(host, port)``, or
``libvirt:DOMAIN`` (``libvirt:DOMAIN@URI`` for another connection than ``qemu:///system``).

>>> block, hva = Qmp.parse_gpa2hva("Host virtual address for 0x0 (pc.ram) is 0x7fbcb3e00000\\r\\n")
>>> block, hex(hva)
('pc.ram', '0x7fbcb3e00000')
>>> Qmp.parse_gpa2hva("No memory is mapped at address 0x40000000") is None
True
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from pathlib import Path
from typing import Any

from vims.errors import VimsError

__all__ = ["LibvirtMonitor", "Qmp", "QmpError", "open_monitor", "parse_libvirt"]

_GPA2HVA = re.compile(r"Host virtual address for 0x[0-9a-f]+ \((?P<block>[^)]*)\) is (?P<hva>0x[0-9a-f]+)")


class QmpError(VimsError):
    """The QMP monitor could not be reached, or it refused a command."""


class _Monitor:
    """What every monitor offers on top of :meth:`execute`: the human monitor, ``gpa2hva``, a context."""

    address: Any

    def execute(self, command: str, **arguments: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def hmp(self, command_line: str) -> str:
        """A human-monitor command's text answer (``info ramblock``, ``gdbserver ...``)."""
        return str(self.execute("human-monitor-command", **{"command-line": command_line}))

    @staticmethod
    def parse_gpa2hva(text: str) -> tuple[str, int] | None:
        """The RAM block and host address in a ``gpa2hva`` answer; None if nothing is mapped there."""
        match = _GPA2HVA.search(text)
        return None if match is None else (match["block"], int(match["hva"], 16))

    def gpa2hva(self, paddr: int) -> tuple[str, int] | None:
        """Where guest physical ``paddr`` lives in QEMU's own address space: (RAM block, address)."""
        return self.parse_gpa2hva(self.hmp(f"gpa2hva {paddr:#x}"))

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Qmp(_Monitor):
    """One QMP session on a UNIX socket (``path``) or a TCP address (``(host, port)``).

    Parameters
    ----------
    address : str, Path or (host, port)
        The monitor socket.
    timeout : float
        Seconds to wait for the connection and for each answer.
    """

    def __init__(self, address: str | Path | tuple[str, int], timeout: float = 10.0) -> None:
        self.address = address
        self.events: list[dict[str, Any]] = []
        try:
            if isinstance(address, tuple):
                self._sock = socket.create_connection(address, timeout=timeout)
            else:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(str(address))
        except OSError as exc:
            raise QmpError(f"cannot reach the QMP monitor at {address}: {exc.strerror or exc}") from None
        self._file = self._sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            self.close()
            raise QmpError(f"{address} is not a QMP monitor (it said {str(greeting)[:120]!r})")
        self.version: dict[str, Any] = greeting["QMP"].get("version", {}).get("qemu", {})
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except OSError as exc:
            raise QmpError(f"the QMP monitor at {self.address} stopped answering: {exc}") from None
        if not line:
            raise QmpError(f"the QMP monitor at {self.address} closed the connection (QEMU ended?)")
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpError(f"the QMP monitor at {self.address} sent a line that is not JSON: {line[:120]!r}") from None
        if not isinstance(message, dict):
            raise QmpError(f"the QMP monitor at {self.address} sent {line[:120]!r}, not an object")
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value; a QMP error raises :class:`QmpError`."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            self._file.write(json.dumps(request).encode() + b"\n")
            self._file.flush()
        except OSError as exc:
            raise QmpError(f"cannot send {command!r} to the QMP monitor at {self.address}: {exc}") from None
        while True:
            answer = self._read()
            if "event" in answer:
                self.events.append(answer)
                continue
            if "error" in answer:
                error = answer["error"]
                raise QmpError(f"QEMU refused {command!r}: {error.get('desc', error)}")
            return answer.get("return")

    def close(self) -> None:
        """End the session (QEMU goes on)."""
        for closing in (self._file, self._sock):
            with contextlib.suppress(OSError):
                closing.close()


LIBVIRT_URI = "qemu:///system"


def parse_libvirt(address: object) -> tuple[str, str] | None:
    """``(domain, uri)`` of a ``libvirt:DOMAIN[@URI]`` address; None for any other address.

    >>> parse_libvirt("libvirt:web1"), parse_libvirt("libvirt:web1@qemu:///session"), parse_libvirt("/run/a.qmp")
    (('web1', 'qemu:///system'), ('web1', 'qemu:///session'), None)
    """
    if not isinstance(address, str | Path) or not str(address).startswith("libvirt:"):
        return None
    domain, _, uri = str(address).removeprefix("libvirt:").partition("@")
    if not domain:
        raise QmpError(f"{address!r} names no libvirt domain: give libvirt:DOMAIN (vims attach --list shows them)")
    return domain, uri or LIBVIRT_URI


class LibvirtMonitor(_Monitor):
    """The QMP monitor of libvirt domain ``domain`` on connection ``uri``, through libvirt's pass-through
    (``virDomainQemuMonitorCommand``): the same commands as :class:`Qmp`, while libvirtd keeps the socket.

    Parameters
    ----------
    domain : str
        The domain's name (or UUID).
    uri : str
        The libvirt connection (default ``qemu:///system``).
    """

    def __init__(self, domain: str, uri: str = LIBVIRT_URI) -> None:
        try:
            import libvirt
        except ImportError:
            raise QmpError("libvirt domains need libvirt's Python binding: pip install 'vims[libvirt]' "
                           "(it builds against libvirt-dev)") from None
        self.address = f"libvirt:{domain}@{uri}"
        self.events: list[dict[str, Any]] = []
        self._libvirt = libvirt
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise QmpError(f"cannot reach libvirt at {uri}: {exc.get_error_message()} (is libvirtd running?)") from None
        try:
            self._domain = self._conn.lookupByName(domain)
        except libvirt.libvirtError:
            names = sorted(d.name() for d in self._conn.listAllDomains())
            self._conn.close()
            raise QmpError(f"libvirt at {uri} has no domain {domain!r} "
                           f"(it has: {', '.join(names) or 'none'})") from None
        self.version: dict[str, Any] = (self.execute("query-version") or {}).get("qemu", {})

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value; a refusal raises :class:`QmpError`."""
        import libvirt_qemu

        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            text = libvirt_qemu.qemuMonitorCommand(self._domain, json.dumps(request), 0)
        except self._libvirt.libvirtError as exc:
            raise QmpError(f"libvirt refused {command!r} for {self.address}: {exc.get_error_message()}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            raise QmpError(f"libvirt's monitor of {self.address} answered {text[:120]!r}, not JSON") from None
        if "error" in answer:
            error = answer["error"]
            raise QmpError(f"QEMU refused {command!r}: {error.get('desc', error)}")
        return answer.get("return")

    def close(self) -> None:
        """Close the libvirt connection (the domain goes on)."""
        with contextlib.suppress(Exception):
            self._conn.close()


def open_monitor(address: str | Path | tuple[str, int]) -> Qmp | LibvirtMonitor:
    """The monitor at ``address``: ``libvirt:DOMAIN[@URI]``, a UNIX socket path or ``(host, port)``."""
    libvirt = parse_libvirt(address)
    return LibvirtMonitor(*libvirt) if libvirt else Qmp(address)
