"""One running C-VM: QEMU with the guest image, its RAM in a shared file, its ports on loopback.

The machine: TCG (KVM only where a hardware KVM module is loaded), ``nokaslr pti=off``, guest RAM as
``-object memory-backend-file,share=on`` under ``/dev/shm`` (the A-VM maps it), the GDB stub and every
serial port on 127.0.0.1, ports chosen free at start.

Serial ports of the guest:

- ``ttyS0``: the console, written to a file (:meth:`Guest.console_tail`);
- ``ttyS1``: the control channel, a TCP server on the host (:meth:`Guest.run`, :meth:`Guest.scenario`);
- ``ttyS2``: the gate, where QEMU *connects* (and reconnects every second) to a service on the host
  (``gate_port``); the guest's client program talks to whatever listens there (REM-S's gate);
- ``ttyS3``: the kernel's symbols, at the first boot of an image only.

Request protocol of the control channel: see ``rootfs/agent.sh``.

The Debian guest (:mod:`vims.collector.guest.debian`) boots as users boot it: the distribution's
default command line (``root=/dev/vda ro console=ttyS0``, KASLR on, PTI at its default; ``pti=on`` is
the one option that may be added), 2 vCPUs, 1 GiB, a virtio disk (``snapshot=on``: the cached image is
never written) and a virtio NIC on QEMU's user network with ``restrict=on`` (nothing leaves the
machine), ``hostfwd`` from 127.0.0.1 to its ssh and http ports; commands run over ssh with the key
made at build time. Its RAM file and GDB stub are as for the busybox guest. Its client software reaches
REM-S's gate by an ordinary TCP connection to the intranet address :data:`GATE_GUEST_ADDRESS`: a
``guestfwd`` there runs :func:`gate_relay` for each connection the guest opens, which carries it to the
gate port on the host's loopback (a free port that nothing listens on when none is given, as for the
busybox guest's serial line). A second ``guestfwd``, at :data:`ATTACKER_GUEST_ADDRESS`, stands for a
machine outside: each connection there is relayed the same way to a host port chosen free at start
(``attacker_port`` in the guest's state), where the attack scenarios (:mod:`vims.collector.guest.attacks`)
listen for reverse shells, stolen data and beacons; nothing leaves the machine.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vims.collector.guest.debian import DebianImage
from vims.errors import MissingDependencyError, VimsError
from vims.paths import cache_dir

if TYPE_CHECKING:
    from vims.collector.guest.image import GuestImage
    from vims.collector.plugin import PluginInstall
    from vims.collector.profile import KernelProfile

__all__ = [
    "ATTACKER_GUEST_ADDRESS", "SCENARIOS", "Guest", "GuestBootError", "free_port", "gate_relay", "kvm_available",
    "reap_stale",
]  # fmt: skip

QEMU = "qemu-system-x86_64"
SCENARIOS = ("normal", "webshell", "adduser", "tamper-binary")
KERNEL_ARGS = "console=ttyS0,115200 nokaslr pti=off panic=-1 8250.nr_uarts=4 loglevel=5"
#: With ``nokaslr``, kernel text at virtual ``VA`` lives at physical ``VA - KERNEL_MAP_BASE``.
KERNEL_MAP_BASE = 0xFFFFFFFF80000000
#: The Debian guest's command line: what the distribution boots with, plus the serial console.
DEBIAN_KERNEL_ARGS = "root=/dev/vda ro console=ttyS0,115200"
#: The only options that may be added to it.
DEBIAN_EXTRA_ARGS = ("pti=on",)
#: Where the guest's client reaches REM-S's gate (a ``guestfwd`` to the host's gate port).
GATE_GUEST_ADDRESS = ("10.0.2.100", 7000)
#: An "outside" address the Debian guest can reach: a ``guestfwd`` to the host's ``attacker_port``.
ATTACKER_GUEST_ADDRESS = ("10.0.2.200", 4444)
_SSH_OPTIONS = (
    "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
)  # fmt: skip


class GuestBootError(VimsError):
    """The guest did not come up (QEMU exited, or the guest never answered)."""


def kvm_available() -> bool:
    """Whether a hardware KVM module is loaded and ``/dev/kvm`` is usable (else: TCG)."""
    loaded = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
    return loaded and os.access("/dev/kvm", os.R_OK | os.W_OK)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    # A guest started by a test or a script dies with its parent instead of lingering.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        status = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return b"qemu" in cmdline and status != "Z"


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes()[-256 * 1024 :].decode("utf-8", "replace")
    except OSError:
        return ""
    rows = [r.rstrip("\r") for r in text.replace("\r\n", "\n").split("\n")]
    while rows and not rows[-1].strip():
        rows.pop()
    return "\n".join(rows[-lines:])


def run_root() -> Path:
    """Where running guests keep their files and the state of detached guests."""
    return cache_dir("guest", "run")


def reap_stale() -> list[str]:
    """Remove the files (RAM file included) of guests whose QEMU is gone, e.g. after a crash.

    A guest started by a process that died is killed with it (``PR_SET_PDEATHSIG``), but its RAM file
    in ``/dev/shm`` would stay. Returns the run folders removed.
    """
    removed = []
    for state_path in run_root().glob("*/state.json"):
        try:
            state = json.loads(state_path.read_text())
            pid = int(state["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if _pid_alive(pid):
            continue
        memory = Path(state.get("memory_path", ""))
        for shm in (memory, Path(state.get("plugin_shm", ""))):
            if shm.parent == Path("/dev/shm") and shm.name.startswith("vims-"):
                shm.unlink(missing_ok=True)
        shutil.rmtree(state_path.parent, ignore_errors=True)
        named = run_root() / f"{state.get('name')}.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads(named.read_text())["pid"] == pid:
                named.unlink()
        removed.append(str(state_path.parent))
    return removed


class Guest:
    """One running QEMU guest; start it with :meth:`start`, find a detached one with :meth:`attach`.

    Attributes
    ----------
    gdb_address : tuple of (str, int)
        Where the GDB stub listens (``GdbStub(*guest.gdb_address)``).
    memory_path : Path
        The guest's RAM, byte ``n`` of the file being guest physical address ``n``.
    pid : int
        The QEMU process.
    """

    def __init__(self, state: dict[str, Any], process: subprocess.Popen[bytes] | None = None) -> None:
        self.state = state
        self.name: str = state["name"]
        self.pid: int = int(state["pid"])
        self.gdb_address: tuple[str, int] = ("127.0.0.1", int(state["gdb_port"]))
        self.control_address: tuple[str, int] = ("127.0.0.1", int(state["control_port"]))
        self.kind: str = state.get("kind", "mini")
        self.ssh_address: tuple[str, int] | None = (
            ("127.0.0.1", int(state["ssh_port"])) if "ssh_port" in state else None
        )
        self.http_address: tuple[str, int] | None = (
            ("127.0.0.1", int(state["http_port"])) if "http_port" in state else None
        )
        self.gate_address: tuple[str, int] = ("127.0.0.1", int(state["gate_port"]))
        self.memory_path = Path(state["memory_path"])
        self.run_dir = Path(state["run_dir"])
        self.console_path = Path(state["console_path"])
        self.profile_path = Path(state["profile"])
        #: The syscall plugin's shared memory (a guest started with ``plugin=True``), else None.
        self.plugin_shm: Path | None = Path(state["plugin_shm"]) if state.get("plugin_shm") else None
        self._process = process
        self._profile: KernelProfile | None = None
        self._clock: tuple[Any, int, float] | None = None  # (profile, jiffies, when): the last look at its clock
        self._lock = threading.Lock()
        self._stopped = False

    # -- starting --------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        image: GuestImage | DebianImage,
        name: str = "vims-guest",
        memory_mb: int | None = None,
        gate_port: int | None = None,
        cpu: str = "max",
        *,
        smp: int | None = None,
        extra_args: tuple[str, ...] = (),
        gdb_port: int | None = None,
        control_port: int | None = None,
        detach: bool = False,
        boot_timeout: float = 240.0,
        accel: str | None = None,
        capture_kallsyms: Path | None = None,
        plugin: bool = False,
        plugin_slots: int = 65536,
    ) -> Guest:
        """Boot ``image`` and wait until its control agent answers.

        Parameters
        ----------
        image : GuestImage or DebianImage
            From :func:`vims.collector.guest.build_guest` (busybox) or ``build_debian`` (Debian).
        name : str
            A name for the guest (``vims guest up`` keeps detached guests by name).
        memory_mb : int, optional
            Guest RAM in MiB (default 256 for busybox, 1024 for Debian).
        gate_port : int, optional
            The host port QEMU connects the guest's client to (REM-S's gate). Default: a free port
            that nothing listens on yet (the client then sees the line down until something does).
        cpu : str
            QEMU CPU model; ``max`` gives 5-level paging. Any model: kernel-text checks against the image.
        smp : int, optional
            vCPUs (default 1 for busybox, 2 for Debian).
        extra_args : tuple of str
            Options added to the Debian guest's default command line (only ``pti=on``).
        gdb_port, control_port : int, optional
            Fixed ports; default free ones.
        detach : bool
            Let QEMU outlive this process and record it for :meth:`attach` (``vims guest up``).
        boot_timeout : float
            Seconds to wait for the guest's agent.
        accel : str, optional
            ``tcg`` or ``kvm``; default KVM only where a hardware KVM module is loaded.
        capture_kallsyms : Path, optional
            Boot in capture mode, writing ``/proc/kallsyms`` to this file (the image build does).
        plugin : bool
            Run under the QEMU (10 or newer) of the ``vims_syscall`` TCG plugin, with the plugin loaded
            (:mod:`vims.collector.plugin`; traced by :class:`~vims.collector.plugin_tracer.PluginTracer`).
            TCG only. Its rings are in :attr:`plugin_shm`.
        plugin_slots : int
            Records per vCPU ring (a power of two); a full ring drops and counts.
        """
        install = None
        if plugin:
            from vims.collector.plugin import find_plugin

            install = find_plugin()
            if accel not in (None, "tcg"):
                raise VimsError(f"accel={accel}: the syscall plugin runs under TCG only")
            accel = "tcg"
            if plugin_slots < 2 or plugin_slots & (plugin_slots - 1) or plugin_slots > 1 << 24:
                raise VimsError(f"plugin_slots={plugin_slots}: a power of two from 2 to 16777216")
        elif shutil.which(QEMU) is None:
            raise MissingDependencyError(f"{QEMU} not found: apt-get install qemu-system-x86")
        debian = getattr(image, "kind", "mini") == "debian"
        memory_mb = memory_mb or (1024 if debian else 256)
        smp = smp or (2 if debian else 1)
        bad = [a for a in extra_args if not debian or a not in DEBIAN_EXTRA_ARGS]
        if bad:
            raise VimsError(f"kernel option {bad[0]!r} not allowed (the Debian guest takes only "
                            f"{', '.join(DEBIAN_EXTRA_ARGS)})")
        if memory_mb < 64:
            raise VimsError(f"memory_mb={memory_mb}: the guest needs at least 64 MiB")
        if detach:
            cls._claim_name(name)
        for port, what in ((gdb_port, "GDB stub"), (control_port, "control")):
            if port is not None and _port_in_use(port):
                raise MissingDependencyError(f"port {port} on 127.0.0.1 ({what}) is taken: choose another")
        attempts = 3 if gdb_port is None or control_port is None else 1
        last: Exception | None = None
        for _ in range(attempts):
            try:
                machine = _Machine(memory_mb, smp, cpu, accel, extra_args, install, plugin_slots)
                return cls._launch(
                    image, name, machine, gate_port, gdb_port or free_port(),
                    control_port or free_port(), detach, boot_timeout, capture_kallsyms,
                )  # fmt: skip
            except _PortTakenError as exc:  # another program took a free port between check and bind
                last = exc
        raise MissingDependencyError(f"{last}: no free port found after {attempts} tries")

    @classmethod
    def _claim_name(cls, name: str) -> None:
        """Make way for a detached guest called ``name``: refuse if one runs, forget a dead one's record."""
        existing = cls._state_file(name)
        if existing.exists():
            old = json.loads(existing.read_text())
            if _pid_alive(int(old["pid"])):
                raise VimsError(
                    f"a guest named {name!r} is already running (QEMU pid {old['pid']}): "
                    f"`vims guest down --name {name}` or choose another name"
                )
            existing.unlink()

    @classmethod
    def _state_file(cls, name: str) -> Path:
        return run_root() / f"{name}.json"

    @classmethod
    def _launch(
        cls,
        image: GuestImage | DebianImage,
        name: str,
        machine: _Machine,
        gate_port: int | None,
        gdb_port: int,
        control_port: int,
        detach: bool,
        boot_timeout: float,
        capture_kallsyms: Path | None,
    ) -> Guest:
        reap_stale()
        token = secrets.token_hex(4)
        run_dir = run_root() / f"{name}-{token}"
        run_dir.mkdir(parents=True)
        memory_path = Path("/dev/shm") / f"vims-{name}-{token}"
        console = run_dir / "console.log"
        gate = gate_port if gate_port is not None else free_port()
        accel = machine.accel or ("kvm" if kvm_available() else "tcg")
        cmd, ports = _qemu_command(image, name, machine, accel, memory_path, console, run_dir, gdb_port,
                                   control_port, gate, capture_kallsyms)
        process = _spawn(cmd, run_dir / "qemu.log", detach)
        started = time.time()
        state = _initial_state(image, name, machine, accel, process.pid, memory_path, run_dir, console, gdb_port,
                               control_port, gate, started, detach, cmd, ports)
        (run_dir / "state.json").write_text(json.dumps(state, indent=2))  # for reap_stale()
        guest = cls(state, process)
        try:
            guest._wait_boot(boot_timeout)
        except BaseException:
            guest.stop()
            raise
        state["boot_seconds"] = round(time.time() - started, 2)
        (run_dir / "state.json").write_text(json.dumps(state, indent=2))
        if detach:
            cls._state_file(name).write_text(json.dumps(state, indent=2))
        return guest

    def _qemu_log(self) -> str:
        # the gate's reconnect notices are expected while nothing listens there
        lines = _tail(self.run_dir / "qemu.log", 40).splitlines()
        return "\n".join(line for line in lines if "character device gate" not in line)[-2000:]

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is None and _pid_alive(self.pid):
            return
        log = self._qemu_log()
        for port in (self.gdb_address[1], self.control_address[1]):
            if f"{port}" in log and ("in use" in log or "Failed to bind" in log):
                raise _PortTakenError(f"port {port} on 127.0.0.1 is taken")
        raise GuestBootError(
            f"QEMU exited (status {self._process.returncode if self._process else '?'}) "
            f"while the guest {self.name!r} booted.\n"
            f"QEMU said:\n{log or '(nothing)'}\nconsole tail:\n{self.console_tail(30) or '(empty)'}"
        )

    def reboot(self, timeout: float = 240.0) -> None:
        """Reboot the Debian guest in place (``systemctl reboot``; the same QEMU and RAM file, a new
        boot with new KASLR offsets) and wait until it answers again."""
        if self.kind != "debian":
            raise VimsError("only the Debian guest reboots in place (the busybox guest's QEMU ends)")
        before = self.run("cat /proc/sys/kernel/random/boot_id", check=True).strip()
        with contextlib.suppress(VimsError):  # the connection may drop before the answer
            self.execute("systemctl reboot", timeout=10, wait=20.0)
        self._drop_control_master()  # its connection dies with this boot: new commands must not wait on it
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(VimsError, OSError):  # a traced guest logs in slowly: a long wait
                now = self.execute("cat /proc/sys/kernel/random/boot_id", timeout=30, wait=90.0)[1].strip()
                if now and now != before:
                    self._profile = None  # the symbols moved
                    return
            if time.monotonic() > deadline:
                raise GuestBootError(f"the guest {self.name!r} did not come back within {timeout:g} s of "
                                     f"its reboot.\nconsole tail:\n{self.console_tail(30) or '(empty)'}")
            time.sleep(1.0)

    def _wait_boot(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                self.execute("echo ready", timeout=10, wait=20.0 if self.kind == "debian" else 4.0)
                return
            except GuestBootError:
                raise
            except (VimsError, OSError):
                pass
            if time.monotonic() > deadline:
                raise GuestBootError(
                    f"the guest {self.name!r} did not answer within {timeout:g} s of starting.\n"
                    f"console tail:\n{self.console_tail(30) or '(empty)'}"
                )
            time.sleep(0.5)

    # -- finding a detached guest ----------------------------------------------------------------
    @classmethod
    def attach(cls, name: str = "vims-guest") -> Guest:
        """The detached guest called ``name`` (started by ``vims guest up``)."""
        path = cls._state_file(name)
        if not path.exists():
            raise VimsError(f"no guest named {name!r} is running (start one: `vims guest up --name {name}`)")
        state = json.loads(path.read_text())
        return cls(state)

    @classmethod
    def detached(cls) -> list[str]:
        """Names of the detached guests that have a state file."""
        return sorted(p.stem for p in run_root().glob("*.json"))

    # -- stopping --------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether QEMU still runs."""
        if self._process is not None:
            return self._process.poll() is None
        return _pid_alive(self.pid)

    def stop(self) -> None:
        """Stop QEMU, remove the memory file and the guest's files."""
        if self._stopped:
            return
        self._stopped = True
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(5)
        elif _pid_alive(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            for _ in range(100):
                if not _pid_alive(self.pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.memory_path.unlink()
        if self.plugin_shm is not None:
            with contextlib.suppress(FileNotFoundError):
                self.plugin_shm.unlink()
        if self.state.get("detached"):
            with contextlib.suppress(FileNotFoundError):
                self._state_file(self.name).unlink()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what it is ------------------------------------------------------------------------------
    @property
    def profile(self) -> KernelProfile:
        """The kernel profile of the guest's kernel, its symbols where this boot put them (KASLR)."""
        if self._profile is not None and self.kind == "debian" and not self._profile_holds(self._profile):
            self._profile = None  # rebooted in place (by us or by the user): KASLR moved the kernel
        if self._profile is None:
            from vims.collector.profile import KernelProfile

            profile = KernelProfile.load(self.profile_path)
            if profile.relocatable:  # the Debian guest's: link-time symbols, moved by KASLR
                from vims.collector.kaslr import relocate
                from vims.collector.memory import PhysicalMemory

                with PhysicalMemory.open(self.memory_path) as memory:
                    profile = relocate(memory, profile, require_live=True)
            self._profile = profile
        return self._profile

    def forget_profile(self) -> None:
        """Find the kernel in RAM again at the next :attr:`profile` (one found during a boot may not hold)."""
        self._profile = None

    def _profile_holds(self, profile: KernelProfile) -> bool:
        """Whether the relocated ``profile`` still fits this boot: the kernel it places runs
        (:func:`~vims.collector.kaslr.is_live`; a reboot leaves the old kernel's copy in RAM)."""
        from vims.collector.kaslr import at_clock_pace, is_live
        from vims.collector.kernel import KernelView
        from vims.collector.memory import PhysicalMemory

        try:
            with PhysicalMemory.open(self.memory_path) as memory:
                # Its clock moved since the last look, at a clock's pace: live, without waiting for a tick.
                now, at = KernelView(memory, profile).u64(profile.symbol("jiffies_64")), time.monotonic()
                last, self._clock = self._clock, (profile, now, at)
                moved = last is not None and last[0] is profile and now != last[1]
                if moved and last is not None and at_clock_pace(now - last[1], at - last[2]):
                    return True
                return is_live(memory, profile)
        except (VimsError, OSError):
            return False

    def status(self) -> dict[str, Any]:
        """What ``vims guest status --json`` prints."""
        s = self.state
        out: dict[str, Any] = {
            "name": self.name,
            "running": self.running,
            "pid": self.pid,
            "accel": s["accel"],
            "cpu": s["cpu"],
            "memory_mb": s["memory_mb"],
            "memory_path": s["memory_path"],
            "gdb": {"host": self.gdb_address[0], "port": self.gdb_address[1]},
            "profile": s["profile"],
            "release": s["release"],
            "kernel": s["kernel"],
            "initramfs": s["initramfs"],
            "serial": {
                "console": {"ttyS": 0, "file": s["console_path"]},
                "control": {"ttyS": 1, "host": "127.0.0.1", "port": s["control_port"], "mode": "server"},
                "gate": {"ttyS": 2, "host": "127.0.0.1", "port": s["gate_port"], "mode": "client"},
            },
            "started": s["started"],
            "boot_seconds": s.get("boot_seconds"),
            "detached": s.get("detached", False),
        }
        if self.kind == "debian":
            out = {**out, "image": "debian", "smp": s.get("smp"), "kernel_args": s.get("kernel_args")}
            out["serial"] = {"console": {"ttyS": 0, "file": s["console_path"]}}
            out["ssh"] = {"host": "127.0.0.1", "port": s["ssh_port"], "key": s["ssh_key"]}
            out["http"] = {"host": "127.0.0.1", "port": s["http_port"]}
            out["gate"] = {"guest": s.get("gate_guest"), "host_port": s["gate_port"]}
            out["kaslr"] = self._kaslr_status()
        return out

    def _kaslr_status(self) -> dict[str, Any]:
        """The kernel's load offsets found in the guest's RAM (:mod:`vims.collector.kaslr`)."""
        from vims.collector.kaslr import find_kaslr

        try:
            from vims.collector.profile import KernelProfile

            raw = KernelProfile.load(self.profile_path)
            if not raw.relocatable:
                return {"enabled": False, "how": ["nokaslr profile"]}
            return find_kaslr(self.memory_path, raw, gdb=self.gdb_address).as_dict()
        except VimsError as exc:
            return {"error": str(exc)}

    def console_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the guest's console."""
        return _tail(self.console_path, lines)

    # -- control channel -------------------------------------------------------------------------
    def execute(self, command: str, timeout: float = 60.0, wait: float | None = None) -> tuple[int, str]:
        """Run a shell command in the guest; return its exit status and output (stdout + stderr).

        ``timeout`` bounds the command in the guest; ``wait`` the time this side waits for the answer
        (default ``timeout`` plus a margin for a slow, emulated guest).
        """
        if self.kind == "debian":
            return self._ssh(command, timeout, timeout + 30.0 if wait is None else wait)
        ident = secrets.token_hex(6)
        script = base64.b64encode(command.encode()).decode()
        limit = max(1, int(timeout + 0.999))
        request = f"VIMS {ident} {limit} {script}\n".encode()
        wait = timeout + 30.0 if wait is None else wait
        deadline = time.monotonic() + wait
        begin, end = f"@@BEGIN {ident}".encode(), f"@@END {ident} ".encode()
        with self._lock:
            try:
                sock = socket.create_connection(self.control_address, timeout=min(wait, 10.0))
            except OSError as exc:
                raise VimsError(
                    f"cannot reach the control port of guest {self.name!r} at "
                    f"{self.control_address[0]}:{self.control_address[1]}: {exc}"
                ) from exc
            with sock:
                sock.sendall(b"\n" + request)  # the newline ends any half line left on the port
                buf = bytearray()
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise VimsError(
                            f"guest {self.name!r} did not answer {command[:60]!r} within {wait:g} s "
                            "(is it halted by a GDB client?)"
                        )
                    sock.settimeout(left)
                    try:
                        chunk = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        raise VimsError(f"guest {self.name!r} closed the control channel (QEMU gone?)")
                    buf += chunk
                    start = buf.find(begin)
                    if start < 0:
                        continue
                    stop = buf.find(end, start)
                    if stop < 0 or buf.find(b"\n", stop) < 0:
                        continue
                    line_end = buf.find(b"\n", stop)
                    rc = int(buf[stop + len(end) : line_end].strip() or b"255")
                    body = bytes(buf[start + len(begin) : stop])
                    text = base64.b64decode(b"".join(body.split()) or b"").decode("utf-8", "replace")
                    return rc, text

    def ssh_command(self, user: str = "root") -> list[str]:
        """The host's ``ssh`` command line that logs into the Debian guest as ``user`` (add a command)."""
        if self.ssh_address is None:
            raise VimsError(f"guest {self.name!r} has no ssh port (the busybox guest uses its control port)")
        return [
            "ssh", *_SSH_OPTIONS, "-i", str(self.state["ssh_key"]), "-p", str(self.ssh_address[1]),
            f"{user}@{self.ssh_address[0]}",
        ]  # fmt: skip

    def _control_master(self) -> list[str]:
        """Options that run a control command over one shared ssh connection (a new login costs about
        a second under TCG, a channel on an open one a few tens of ms); the master is started here,
        detached with its output closed, and ends with the guest or after five idle minutes."""
        path = self.console_path.with_suffix(".ssh")
        opts = ["-o", f"ControlPath={path}", "-o", "ControlMaster=no"]
        if not path.exists():
            ssh = self.ssh_command()
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([ssh[0], "-M", "-N", "-f", "-o", f"ControlPath={path}",
                                "-o", "ControlPersist=300", *ssh[1:]],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=30, check=False)
        return opts if path.exists() else []  # no master: a login of its own, as before

    def _drop_control_master(self) -> None:
        """End the shared ssh connection (if any) and forget it; the next command starts a new one."""
        path = self.console_path.with_suffix(".ssh")
        if path.exists():
            ssh = self.ssh_command()
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([ssh[0], "-o", f"ControlPath={path}", "-O", "exit", ssh[-1]], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=10, check=False)  # fmt: skip
            path.unlink(missing_ok=True)

    def _ssh(self, command: str, timeout: float, wait: float) -> tuple[int, str]:
        if shutil.which("ssh") is None:
            raise MissingDependencyError("ssh not found: apt-get install openssh-client")
        limit = max(1, int(timeout + 0.999))
        remote = f"timeout {limit} sh -c {_quote(command)}"
        ssh = self.ssh_command()
        try:
            proc = subprocess.run(
                [ssh[0], *self._control_master(), *ssh[1:], remote], stdin=subprocess.DEVNULL,
                capture_output=True, timeout=wait, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise VimsError(
                f"guest {self.name!r} did not answer {command[:60]!r} within {wait:g} s "
                "(is it halted by a GDB client?)"
            ) from None
        stderr = proc.stderr.decode("utf-8", "replace")
        if "mux_client" in stderr:  # a master left from before a reboot: ssh went direct; start a new one
            self._drop_control_master()
            stderr = "".join(line for line in stderr.splitlines(keepends=True) if "mux_client" not in line)
        if proc.returncode == 255:  # ssh's own failure: no connection, refused, auth
            raise VimsError(f"cannot ssh into guest {self.name!r}: {stderr[-300:]}")
        return proc.returncode, proc.stdout.decode("utf-8", "replace") + stderr

    def run(self, command: str, timeout: float = 60.0, check: bool = False) -> str:
        """Run a shell command in the guest through the control channel and return its output.

        With ``check``, a non-zero exit status raises :class:`VimsError` with the output.
        """
        rc, text = self.execute(command, timeout)
        if check and rc != 0:
            raise VimsError(f"{command[:60]!r} failed in guest {self.name!r} (exit {rc}): {text[-500:]}")
        return text

    def scenario(self, name: str, timeout: float = 120.0) -> str:
        """Play a scenario in the guest (``normal``, ``webshell``, ``adduser``, ``tamper-binary``).

        Returns the guest's one-line answer; a scenario that fails raises :class:`VimsError`.
        """
        if name not in SCENARIOS:
            raise VimsError(f"unknown scenario {name!r}: one of {', '.join(SCENARIOS)}")
        if self.kind == "debian":
            raise VimsError(f"the scenarios are the busybox guest's (`vims guest up --image mini`); guest "
                            f"{self.name!r} is the Debian guest: `vims guest workload` plays its normal life")
        return self.run(f"/sbin/vims-scenario {name}", timeout=timeout, check=True).strip()


    def reset(self, timeout: float = 60.0) -> str:
        """Undo every scenario (restore the tampered program, remove added users, stop ``nc``)."""
        return self.run("/sbin/vims-scenario reset", timeout=timeout, check=True).strip()


class _PortTakenError(VimsError):
    pass


@dataclass(frozen=True)
class _Machine:
    """The virtual hardware of one guest."""

    memory_mb: int
    smp: int
    cpu: str
    accel: str | None
    extra_args: tuple[str, ...] = ()
    plugin: PluginInstall | None = None  # run under the plugin's QEMU with the syscall plugin
    plugin_slots: int = 65536


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def gate_relay(port: int) -> None:
    """Carry one connection of the guest's client to the gate on 127.0.0.1:``port``.

    QEMU's ``guestfwd`` runs this once per connection the guest opens to :data:`GATE_GUEST_ADDRESS`,
    with the connection as file descriptor 0. Bytes go both ways unchanged and each side's end of
    stream is passed on; when nothing listens on the gate port, the guest's connection closes unanswered.
    """
    guest = socket.socket(fileno=0)
    try:
        gate = socket.create_connection(("127.0.0.1", port), timeout=10.0)
    except OSError:
        guest.close()
        return
    gate.settimeout(None)
    back = threading.Thread(target=_pump, args=(gate, guest), daemon=True)
    back.start()
    _pump(guest, gate)
    back.join()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)


def _gate_forward(gate: int, address: tuple[str, int] = GATE_GUEST_ADDRESS) -> str:
    """The ``guestfwd`` option that runs :func:`gate_relay` (this Python) for each guest connection to
    ``address``, carrying it to the host's port ``gate``."""
    host, port = address
    code = f"from vims.collector.guest.qemu import gate_relay; gate_relay({int(gate)})"
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}".replace(",", ",,")  # QEMU's escape
    return f"guestfwd=tcp:{host}:{port}-cmd:{command}"


def _debian_devices(
    image: DebianImage, ports: dict[str, int], gate: int, extra_args: tuple[str, ...]
) -> list[str]:
    """QEMU options of the Debian guest: command line, virtio disk and NIC on a restricted network."""
    net = (
        f"user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{ports['ssh_port']}-:22,"
        f"hostfwd=tcp:127.0.0.1:{ports['http_port']}-:80,{_gate_forward(gate)},"
        f"{_gate_forward(ports['attacker_port'], ATTACKER_GUEST_ADDRESS)}"
    )
    return [
        "-append", " ".join((DEBIAN_KERNEL_ARGS, *extra_args)),
        "-drive", f"file={image.disk},if=virtio,format=raw,snapshot=on",
        "-netdev", net, "-device", "virtio-net-pci,netdev=net0",
    ]  # fmt: skip


def _qemu_command(image: GuestImage | DebianImage, name: str, machine: _Machine, accel: str, memory_path: Path,
                  console: Path, run_dir: Path, gdb_port: int, control_port: int, gate: int,
                  capture_kallsyms: Path | None) -> tuple[list[str], dict[str, int]]:
    """QEMU's command line for ``image``, and the host ports it forwards (ssh and http of a Debian guest)."""
    memory_mb, cpu = machine.memory_mb, machine.cpu
    cmd = [
        str(machine.plugin.qemu) if machine.plugin else QEMU,
        "-name", name, "-nodefaults", "-no-user-config", "-display", "none",
        "-accel", f"{accel},thread=multi" if accel == "tcg" and machine.smp > 1 else accel,
        "-cpu", cpu, "-smp", str(machine.smp), "-m", f"{memory_mb}M",
        "-object",
        f"memory-backend-file,id=mem,size={memory_mb}M,mem-path={memory_path},share=on",
        "-machine", "pc,memory-backend=mem",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
        "-gdb", f"tcp:127.0.0.1:{gdb_port}",
        "-pidfile", str(run_dir / "qemu.pid"),
    ]  # fmt: skip
    ports: dict[str, int] = {}
    if isinstance(image, DebianImage):  # a reboot restarts it in place, as a user's VM (new KASLR offsets)
        ports = {"ssh_port": free_port(), "http_port": free_port(), "attacker_port": free_port()}
        cmd += _debian_devices(image, ports, gate, machine.extra_args)
    else:
        append = KERNEL_ARGS + (" vims.capture=1" if capture_kallsyms else "")
        cmd += [
            "-no-reboot",  # the busybox guest's panic=-1 ends QEMU
            "-append", append,
            "-chardev", f"socket,id=control,host=127.0.0.1,port={control_port},server=on,wait=off",
            "-serial", "chardev:control",
            "-chardev", f"socket,id=gate,host=127.0.0.1,port={gate},reconnect=1",
            "-serial", "chardev:gate",
        ]  # fmt: skip
    if machine.plugin is not None:
        for data in machine.plugin.data_dirs:
            cmd += ["-L", str(data)]
        shm = memory_path.with_name(memory_path.name.replace("vims-", "vims-plugin-", 1))
        cmd += ["-plugin", f"file={machine.plugin.library},shm={shm},slots={machine.plugin_slots}"]
    if capture_kallsyms is not None:
        cmd += ["-chardev", f"file,id=ksyms,path={capture_kallsyms}", "-serial", "chardev:ksyms"]
    return cmd, ports


def _spawn(cmd: list[str], log_path: Path, detach: bool) -> subprocess.Popen[bytes]:
    """Start QEMU with its output in ``log_path``; a detached one outlives this process."""
    log = open(log_path, "wb")  # noqa: SIM115  (QEMU writes it for its whole life)
    try:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            preexec_fn=None if detach else _pdeathsig,
        )
    finally:
        log.close()
    return process


def _initial_state(image: GuestImage | DebianImage, name: str, machine: _Machine, accel: str, pid: int,
                   memory_path: Path, run_dir: Path, console: Path, gdb_port: int, control_port: int, gate: int,
                   started: float, detach: bool, cmd: list[str],
                   ports: dict[str, int]) -> dict[str, Any]:
    """What ``state.json`` says of a guest just started (``vims guest status`` and :meth:`Guest.attach` read it)."""
    debian = isinstance(image, DebianImage)
    state: dict[str, Any] = {
        "name": name,
        "pid": pid,
        "accel": accel,
        "cpu": machine.cpu,
        "smp": machine.smp,
        "kind": "debian" if debian else "mini",
        "memory_mb": machine.memory_mb,
        "memory_path": str(memory_path),
        "gdb_port": gdb_port,
        "control_port": control_port,
        "gate_port": gate,
        "run_dir": str(run_dir),
        "console_path": str(console),
        "profile": str(image.profile),
        "kernel": str(image.kernel),
        "initramfs": str(image.initramfs),
        "release": image.release,
        "image": str(image.directory),
        "started": started,
        "detached": detach,
        "command": cmd,
        **ports,
    }
    if machine.plugin is not None:
        state["plugin_shm"] = str(memory_path.with_name(memory_path.name.replace("vims-", "vims-plugin-", 1)))
        state["plugin_slots"] = machine.plugin_slots
        state["qemu_version"] = machine.plugin.version
    if isinstance(image, DebianImage):
        state["ssh_key"] = str(image.ssh_key)
        state["kernel_args"] = " ".join((DEBIAN_KERNEL_ARGS, *machine.extra_args))
        state["gate_guest"] = list(GATE_GUEST_ADDRESS)
        state["attacker_guest"] = list(ATTACKER_GUEST_ADDRESS)
    return state
