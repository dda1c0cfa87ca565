"""A client of QEMU's GDB stub: the *events* channel into a guest on stock QEMU.

It speaks the GDB remote serial protocol over a loopback TCP socket: stop and resume the vCPUs,
read their registers (named from the stub's own target description), read and write guest virtual
memory in a stopped vCPU's address space, and set software/hardware breakpoints and watchpoints.

Facts that shape it (measured on QEMU 7.2):

- QEMU pauses the whole VM when a GDB client connects; :class:`GdbStub` resumes it after the
  handshake unless asked to keep it stopped (``stop=True``), so connecting does not freeze the guest.
- QEMU refuses ``QStartNoAckMode``: every packet is acknowledged.
- The stub serves ONE client at a time; a second connection waits until the first one detaches.
- Detaching (``D``) removes every breakpoint and watchpoint and lets the VM run. A client that dies
  without detaching leaves the VM paused, so always :meth:`GdbStub.close` (or use ``with``).

vCPUs are numbered from 0 here (the stub's thread ids are the vCPU index + 1). With several vCPUs
(QEMU's source, 7.2 and 10.0, ``tcg_insert_breakpoint`` and ``gdb_set_stop_cpu``):

- a break/watchpoint (``Z0``-``Z4``) is set on every vCPU; a watchpoint matches a virtual address,
  whichever page tables the vCPU runs with;
- a stop stops every vCPU and its reply names one thread: the vCPU that trapped (for a trap stop
  QEMU also selects it for register and memory reads, so :meth:`GdbStub.registers` of that vCPU
  sends no ``Hg``); registers of any other vCPU are read after selecting it (``Hg``);
- under MTTCG a second vCPU that traps before the VM is stopped is left stopped there, but only
  the last trap is reported (see :mod:`vims.collector.tracer` for how the tracer copes).

>>> StopEvent(signal=5, vcpu=0, reason="watch", addr=0x1000).reason
'watch'
>>> parse_stop_reply("T05thread:01;watch:ffffffff82a06014;")
StopEvent(signal=5, vcpu=0, reason='watch', addr=18446744071606132756)
>>> checksum(b"m0,8")
'01'
"""

from __future__ import annotations

import re
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from types import TracebackType

from vims.errors import MissingDependencyError, VimsError

__all__ = [
    "GdbError",
    "GdbStub",
    "GuestGoneError",
    "StopEvent",
    "checksum",
    "parse_stop_reply",
]


class GdbError(VimsError):
    """The GDB stub refused a request (an ``Exx`` reply) or broke the protocol."""


class GuestGoneError(GdbError):
    """The guest went away (QEMU exited or closed the connection)."""


@dataclass
class StopEvent:
    """Why the VM stopped.

    Attributes
    ----------
    signal : int
        The signal number of the stop reply (5 = SIGTRAP for break/watchpoints, 2 = SIGINT for a halt).
    vcpu : int or None
        The vCPU (from 0) that stopped, when the stub says.
    reason : str
        ``"watch"``, ``"rwatch"``, ``"awatch"``, ``"swbreak"``, ``"hwbreak"``, or ``"signal"`` when the
        reply names no cause (a halt, or a breakpoint on a stub that does not report ``swbreak``).
    addr : int or None
        The data address of a watchpoint hit.
    """

    signal: int
    vcpu: int | None
    reason: str
    addr: int | None


# Break/watchpoint kinds and their Z packet types.
_Z_TYPES = {"sw": 0, "hw": 1, "write": 2, "read": 3, "access": 4}

# QEMU 7.2 x86-64 register layout, used only when the stub does not serve its target description.
_FALLBACK_REGS: list[tuple[str, int]] = (
    [(n, 64) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")]
    + [(f"r{i}", 64) for i in range(8, 16)]
    + [("rip", 64), ("eflags", 32)]
    + [(n, 32) for n in ("cs", "ss", "ds", "es", "fs", "gs")]
    + [(n, 64) for n in ("fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
)


def checksum(payload: bytes) -> str:
    """The two-hex-digit checksum of a packet payload (sum of bytes modulo 256)."""
    return f"{sum(payload) & 0xFF:02x}"


def _escape(data: bytes) -> bytes:
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def _unescape(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        out.append(next(it) ^ 0x20 if b == 0x7D else b)
    return bytes(out)


def _parse_thread(text: str) -> int | None:
    # "01", "p1.01" (multiprocess) or "-1"; the vCPU index is the thread id minus one.
    tid = text.split(".")[-1].lstrip("p")
    try:
        value = int(tid, 16)
    except ValueError:
        return None
    return value - 1 if value > 0 else None


def parse_stop_reply(reply: str) -> StopEvent:
    """Decode a stop reply (``S05``, ``T05thread:01;watch:addr;``, ...) into a :class:`StopEvent`.

    >>> parse_stop_reply("S02")
    StopEvent(signal=2, vcpu=None, reason='signal', addr=None)
    >>> parse_stop_reply("T05swbreak:;thread:02;")
    StopEvent(signal=5, vcpu=1, reason='swbreak', addr=None)
    """
    if reply[:1] in ("W", "X"):
        raise GuestGoneError(f"the guest exited (stop reply {reply!r})")
    if reply[:1] == "S" and len(reply) >= 3:
        return StopEvent(int(reply[1:3], 16), None, "signal", None)
    if reply[:1] != "T" or len(reply) < 3:
        raise GdbError(f"not a stop reply: {reply!r}")
    signal = int(reply[1:3], 16)
    vcpu: int | None = None
    reason = "signal"
    addr: int | None = None
    for field in reply[3:].split(";"):
        if not field:
            continue
        key, _, value = field.partition(":")
        if key == "thread":
            vcpu = _parse_thread(value)
        elif key in ("watch", "rwatch", "awatch"):
            reason = key
            addr = int(value, 16) if value else None
        elif key in ("swbreak", "hwbreak"):
            reason = key
    return StopEvent(signal, vcpu, reason, addr)


class GdbStub:
    """A connection to QEMU's GDB stub (``-gdb tcp:127.0.0.1:PORT``).

    Parameters
    ----------
    host, port : str, int
        Where the stub listens.
    timeout : float
        Seconds to wait for any single reply before giving up.
    stop : bool
        Keep the VM stopped after connecting (QEMU pauses it on connect). By default it is resumed,
        so that connecting leaves a running guest running.

    Examples
    --------
    A guest from :mod:`vims.collector.guest` (needs QEMU; not run as a doctest)::

        with GdbStub(*guest.gdb_address) as gdb:
            event = gdb.halt()
            cr3 = gdb.registers()["cr3"]
            text = gdb.read(0xffffffff81000000, 4096)
            gdb.resume()
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0, *, stop: bool = False) -> None:
        self.host = host
        self.port = int(port)
        self.timeout = float(timeout)
        self._buf = bytearray()
        self._ack = b""
        self._running = False
        self._last_stop: StopEvent | None = None
        self._breakpoints: set[tuple[str, int, int]] = set()
        self._gthread: int | None = None
        self._reg_layout: list[tuple[str, int]] | None = None
        self._reg_offsets: dict[str, tuple[int, int]] | None = None
        self._closed = False
        try:
            self._sock = socket.create_connection((host, self.port), timeout=self.timeout)
        except ConnectionRefusedError as exc:
            raise MissingDependencyError(
                f"no GDB stub listening at {host}:{port} (is the guest running? `vims guest up`)"
            ) from exc
        except OSError as exc:
            raise MissingDependencyError(f"cannot connect to the GDB stub at {host}:{port}: {exc}") from exc
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            # QEMU announces the stop it made on connect ("T02thread:01;") before any answer.
            supported = self._command("qSupported:swbreak+;hwbreak+;xmlRegisters=i386")
            while re.match(r"[TS][0-9a-fA-F]{2}", supported):
                self._last_stop = parse_stop_reply(supported)
                supported = self._read_packet(time.monotonic() + self.timeout).decode("latin-1")
        except TimeoutError as exc:
            self._sock.close()
            raise GdbError(
                f"the GDB stub at {host}:{port} does not answer: another client may hold it "
                "(QEMU serves one at a time)"
            ) from exc
        self.features: dict[str, str] = {}
        for item in filter(None, supported.split(";")):
            key, eq, value = item.partition("=")
            self.features[key if eq else item.rstrip("+-?")] = value if eq else item[-1:]
        packet_size = int(self.features.get("PacketSize", "1000"), 16)
        # A memory reply is hex (two characters a byte) inside "$...#cs"; keep a margin.
        self._chunk = max(16, (packet_size - 16) // 2)
        self._last_stop = parse_stop_reply(self._command("?"))  # QEMU paused the VM on connect
        if not stop:
            self.resume()

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> GdbStub:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove this client's break/watchpoints, detach (the VM runs on) and close the socket."""
        if self._closed:
            return
        try:
            if self._running:
                self.halt()
            for kind, addr, size in sorted(self._breakpoints):
                self._command(f"z{_Z_TYPES[kind]},{addr:x},{size:x}")
            self._breakpoints.clear()
            self._command("D")
            if self._ack:
                self._sock.sendall(self._ack)
        except (VimsError, OSError, TimeoutError):
            pass  # the guest may be gone already; nothing left to undo then
        finally:
            self._closed = True
            self._sock.close()

    # -- wire ------------------------------------------------------------------------------------
    def _recv_more(self, deadline: float | None) -> None:
        if deadline is None:
            self._sock.settimeout(None)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            raise
        except OSError as exc:
            raise GuestGoneError(f"lost the GDB stub at {self.host}:{self.port}: {exc}") from exc
        if not data:
            raise GuestGoneError(
                f"the GDB stub at {self.host}:{self.port} closed the connection (QEMU gone?)"
            )
        self._buf += data

    def _read_packet(self, deadline: float | None) -> bytes:
        """Next packet payload (acks skipped, each packet acknowledged)."""
        while True:
            start = self._buf.find(b"$")
            if start < 0:
                self._buf.clear()  # only acks ('+') and noise before a packet
                self._recv_more(deadline)
                continue
            end = self._buf.find(b"#", start)
            if end < 0 or len(self._buf) < end + 3:
                self._recv_more(deadline)
                continue
            payload = bytes(self._buf[start + 1 : end])
            sent = self._buf[end + 1 : end + 3].decode("ascii", "replace")
            del self._buf[: end + 3]
            if sent.lower() != checksum(payload):
                self._sock.sendall(b"-")
                continue
            self._ack = b"+"  # sent with the next request: one write instead of two
            return payload

    def _send(self, payload: bytes) -> None:
        packet = self._ack + b"$" + payload + b"#" + checksum(payload).encode()
        self._ack = b""
        try:
            self._sock.sendall(packet)
        except OSError as exc:
            raise GuestGoneError(f"lost the GDB stub at {self.host}:{self.port}: {exc}") from exc

    def _command_raw(self, payload: bytes, timeout: float | None = None) -> bytes:
        if self._closed:
            raise GdbError("the GDB stub connection is closed")
        self._send(payload)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._read_packet(deadline)

    def _command(self, text: str) -> str:
        return self._command_raw(text.encode("ascii")).decode("latin-1")

    def _checked(self, text: str) -> str:
        reply = self._command(text)
        if re.fullmatch(r"E[0-9a-fA-F]{2}", reply) or reply.startswith("E."):
            raise GdbError(f"the GDB stub refused {text[:40]!r}: {reply}")
        return reply

    def _require_stopped(self, what: str) -> None:
        if self._running:
            raise GdbError(f"{what} needs the VM stopped: call halt() first")

    # -- run control -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the VM was resumed and has not reported a stop since."""
        return self._running

    @property
    def last_stop(self) -> StopEvent | None:
        """The most recent stop reply."""
        return self._last_stop

    def halt(self) -> StopEvent:
        """Stop every vCPU (interrupt) and return the stop reply; if already stopped, the last one."""
        if not self._running:
            assert self._last_stop is not None
            return self._last_stop
        try:
            self._sock.sendall(self._ack + b"\x03")
            self._ack = b""
        except OSError as exc:
            raise GuestGoneError(f"lost the GDB stub at {self.host}:{self.port}: {exc}") from exc
        event = self.wait(self.timeout)
        if event is None:
            raise GdbError(f"the guest did not stop within {self.timeout:g} s of an interrupt")
        return event

    def resume(self) -> None:
        """Let every vCPU run; returns at once (see :meth:`wait`)."""
        if self._running:
            return
        self._gthread = None  # QEMU re-selects threads at the next stop
        self._send(b"c")
        self._running = True

    def step(self, vcpu: int | None = None) -> StopEvent | None:
        """Execute one instruction on ``vcpu`` (default: the one that stopped) and return its stop."""
        self._require_stopped("single-stepping")
        if vcpu is None and self._last_stop is not None:
            vcpu = self._last_stop.vcpu
        # vCont names the thread to step ('s' alone would step the Hc thread, not the Hg one).
        self._send(b"s" if vcpu is None else f"vCont;s:{vcpu + 1:x}".encode())
        self._running = True
        return self.wait(self.timeout)

    def wait(self, timeout: float | None = None) -> StopEvent | None:
        """The next stop reply after :meth:`resume`, or None after ``timeout`` seconds (None: forever)."""
        if not self._running:
            return self._last_stop
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                payload = self._read_packet(deadline)
            except TimeoutError:
                return None
            reply = payload.decode("latin-1")
            if reply[:1] in ("T", "S", "W", "X"):
                self._running = False
                event = parse_stop_reply(reply)
                self._last_stop = event
                if event.signal == 5 and event.vcpu is not None:
                    # QEMU makes the vCPU that trapped the one register reads go to (gdb_set_stop_cpu
                    # sets its c_cpu and g_cpu): reading it needs no 'Hg' first
                    self._gthread = event.vcpu
                return event
            # anything else (console output 'O...', a late 'OK') is not a stop: keep waiting

    # -- vCPUs and registers ---------------------------------------------------------------------
    def vcpus(self) -> list[int]:
        """The vCPU indexes (from 0)."""
        self._require_stopped("listing vCPUs")
        ids: list[int] = []
        reply = self._checked("qfThreadInfo")
        while reply.startswith("m"):
            for tid in reply[1:].split(","):
                vcpu = _parse_thread(tid)
                if vcpu is not None:
                    ids.append(vcpu)
            reply = self._checked("qsThreadInfo")
        return ids

    def _select(self, vcpu: int | None) -> None:
        if vcpu is None and self._last_stop is not None:
            vcpu = self._last_stop.vcpu
        if vcpu is None or vcpu == self._gthread:
            return
        self._checked(f"Hg{vcpu + 1:x}")
        self._gthread = vcpu

    def _target_xml(self, annex: str) -> str:
        parts: list[bytes] = []
        offset = 0
        while True:
            reply = self._command_raw(f"qXfer:features:read:{annex}:{offset:x},{0xFFB:x}".encode())
            if not reply or reply[:1] not in (b"m", b"l"):
                raise GdbError(f"no target description {annex!r} from the stub: {reply[:20]!r}")
            chunk = _unescape(reply[1:])
            parts.append(chunk)
            offset += len(chunk)
            if reply[:1] == b"l":
                return b"".join(parts).decode("utf-8")

    def _layout(self) -> list[tuple[str, int]]:
        if self._reg_layout is not None:
            return self._reg_layout
        layout: list[tuple[str, int]] = []
        if self.features.get("qXfer:features:read") == "+":
            try:
                self._collect_regs("target.xml", layout, depth=0)
            except (GdbError, ET.ParseError):
                layout = []
        self._reg_layout = layout or list(_FALLBACK_REGS)
        return self._reg_layout

    def _collect_regs(self, annex: str, layout: list[tuple[str, int]], depth: int) -> None:
        if depth > 4:
            return
        root = ET.fromstring(self._target_xml(annex))
        for elem in root.iter():
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "include":
                href = elem.get("href")
                if href:
                    self._collect_regs(href, layout, depth + 1)
            elif tag == "reg":
                regnum = elem.get("regnum")
                if regnum is not None and int(regnum) != len(layout):
                    # a gap in numbering: fill it so positions keep matching register numbers
                    while len(layout) < int(regnum):
                        layout.append((f"reg{len(layout)}", 0))
                layout.append((elem.get("name", f"reg{len(layout)}"), int(elem.get("bitsize", "64"))))

    def register_names(self) -> list[str]:
        """Register names in the stub's numbering (``register_names()[29] == "cr3"`` on QEMU 7.2)."""
        self._require_stopped("reading the target description")
        return [name for name, _ in self._layout()]

    def _offsets(self) -> dict[str, tuple[int, int]]:
        """Each register's (position, width) in hex digits of the ``g`` packet."""
        if self._reg_offsets is None:
            pos, offsets = 0, {}
            for name, bits in self._layout():
                offsets[name] = (pos, bits // 4)
                pos += bits // 4
            self._reg_offsets = offsets
        return self._reg_offsets

    def registers(self, vcpu: int | None = None, names: tuple[str, ...] | None = None) -> dict[str, int]:
        """Registers of ``vcpu`` (default: the one that stopped) by name, as unsigned integers.

        With ``names``, only those are decoded from the one ``g`` packet: a trap loop that needs a
        dozen registers per stop saves most of the decoding.
        """
        self._require_stopped("reading registers")
        layout = self._layout()
        self._select(vcpu)
        raw = self._checked("g")
        if names is not None:
            offsets = self._offsets()
            picked: dict[str, int] = {}
            for name in names:
                if name not in offsets:
                    raise VimsError(f"no register {name!r} in the stub's target description")
                pos, width = offsets[name]
                if pos + width > len(raw):
                    break  # beyond the packet: the complete way below
                picked[name] = int.from_bytes(bytes.fromhex(raw[pos : pos + width]), "little")
            else:
                return picked
        regs: dict[str, int] = {}
        pos = 0
        index = 0
        for index, (name, bits) in enumerate(layout):  # noqa: B007  (index used after the loop)
            width = bits // 4
            if pos + width > len(raw):
                break
            if width:
                regs[name] = int.from_bytes(bytes.fromhex(raw[pos : pos + width]), "little")
            pos += width
        else:
            index = len(layout)
        # registers beyond the 'g' packet (on QEMU: none for x86-64 core regs) one by one
        for num in range(index, len(layout)):
            name, bits = layout[num]
            if not bits or name in regs:
                continue
            reply = self._command(f"p{num:x}")
            if not reply or reply.startswith("E"):
                continue
            regs[name] = int.from_bytes(bytes.fromhex(reply), "little")
        return regs

    def register(self, name: str, vcpu: int | None = None) -> int:
        """One register by name (a ``p`` request: cheaper than :meth:`registers` on a slow link)."""
        self._require_stopped("reading registers")
        layout = self._layout()
        names = [n for n, _ in layout]
        if name not in names:
            raise VimsError(f"no register {name!r} in the stub's target description")
        self._select(vcpu)
        reply = self._command(f"p{names.index(name):x}")
        if not reply or reply.startswith("E"):
            return self.registers(vcpu)[name]  # a stub without 'p': fall back to all of them
        return int.from_bytes(bytes.fromhex(reply), "little")

    # -- memory ----------------------------------------------------------------------------------
    def read(self, vaddr: int, size: int, vcpu: int | None = None) -> bytes:
        """``size`` bytes of guest virtual memory at ``vaddr`` seen by ``vcpu`` (default: the stopped one)."""
        self._require_stopped("reading memory")
        self._select(vcpu)
        out = bytearray()
        addr = vaddr
        end = vaddr + size
        while addr < end:
            n = min(self._chunk, end - addr)
            reply = self._command(f"m{addr:x},{n:x}")
            if not reply or reply.startswith("E"):
                raise GdbError(
                    f"cannot read guest memory at {addr:#x} ({n} bytes): {reply or 'empty reply'}"
                )
            data = bytes.fromhex(reply)
            if not data:
                raise GdbError(f"cannot read guest memory at {addr:#x}: empty reply")
            out += data
            addr += len(data)
        return bytes(out)

    def write(self, vaddr: int, data: bytes, vcpu: int | None = None) -> None:
        """Write ``data`` to guest virtual memory at ``vaddr`` (kernel text too: the stub ignores W^X)."""
        self._require_stopped("writing memory")
        self._select(vcpu)
        step = max(1, self._chunk // 2)
        for pos in range(0, len(data), step):
            chunk = data[pos : pos + step]
            reply = self._command(f"M{vaddr + pos:x},{len(chunk):x}:{chunk.hex()}")
            if reply != "OK":
                raise GdbError(f"cannot write guest memory at {vaddr + pos:#x}: {reply or 'empty reply'}")

    # -- break/watchpoints -----------------------------------------------------------------------
    def _z(self, op: str, kind: str, addr: int, size: int) -> None:
        if kind not in _Z_TYPES:
            raise VimsError(f"unknown breakpoint kind {kind!r}: one of {', '.join(_Z_TYPES)}")
        self._require_stopped("setting breakpoints")
        reply = self._command(f"{op}{_Z_TYPES[kind]},{addr:x},{size:x}")
        if reply == "":
            raise GdbError(f"the GDB stub does not support {kind!r} breakpoints")
        if reply != "OK":
            verb = "set" if op == "Z" else "clear"
            raise GdbError(f"cannot {verb} a {kind!r} breakpoint at {addr:#x} (size {size}): {reply}")

    def set_breakpoint(self, kind: str, addr: int, size: int = 1) -> None:
        """Set a breakpoint (``"sw"``, ``"hw"``) or watchpoint (``"write"``, ``"read"``, ``"access"``)."""
        self._z("Z", kind, addr, size)
        self._breakpoints.add((kind, addr, size))

    def clear_breakpoint(self, kind: str, addr: int, size: int = 1) -> None:
        """Remove what :meth:`set_breakpoint` set with the same arguments."""
        self._z("z", kind, addr, size)
        self._breakpoints.discard((kind, addr, size))

    def breakpoints(self) -> list[tuple[str, int, int]]:
        """The break/watchpoints this client has set, as ``(kind, addr, size)``."""
        return sorted(self._breakpoints)

    def monitor(self, command: str) -> str:
        """Run a QEMU monitor command through the stub (``qRcmd``) and return its output."""
        self._require_stopped("monitor commands")
        self._send(f"qRcmd,{command.encode().hex()}".encode())
        deadline = time.monotonic() + self.timeout
        text = []
        while True:
            reply = self._read_packet(deadline).decode("latin-1")
            if reply.startswith("O") and reply != "OK":
                text.append(bytes.fromhex(reply[1:]).decode("utf-8", "replace"))
                continue
            if reply.startswith("E"):
                raise GdbError(f"monitor command {command!r} failed: {reply}")
            if reply not in ("", "OK"):
                text.append(bytes.fromhex(reply).decode("utf-8", "replace"))
            return "".join(text)
