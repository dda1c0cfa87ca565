"""The LibVMI tracer (INT3 + single-step) against the fake ``libvmi`` package (tests/fakes/libvmi), on the
toy Linux memory image of tests/test_libvmi_backend.py."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vims.collector.memory import START_KERNEL_MAP
from vims.schemas import EVENT_SCHEMA
from vims.tracing_policy import Policy

HERE = Path(__file__).parent
TARGET = START_KERNEL_MAP + 0x18_0010  # "entry_SYSCALL_64_after_hwframe" in the toy kernel's text
PATH_VA = 0x7FFF_F000_0FF8  # "/etc/shadow", across two pages of httpd's memory


def _toy() -> ModuleType:
    """The toy image builder of the LibVMI backend's tests (one synthetic guest for both)."""
    spec = importlib.util.spec_from_file_location("_toy_libvmi_image", HERE / "test_libvmi_backend.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any, Any]]:
    """(backend, fake domain, libvmi module): the toy guest opened through the fake LibVMI."""
    toy = _toy()
    monkeypatch.syspath_prepend(str(toy.FAKES))
    for name in [m for m in sys.modules if m == "libvmi" or m.startswith("libvmi.")]:
        monkeypatch.delitem(sys.modules, name)
    lib = importlib.import_module("libvmi")
    assert Path(lib.__file__).is_relative_to(toy.FAKES)
    from libvmi._fake import FakeDomain

    from vims.collector.backends import LibvmiBackend

    img, profile = toy.build()
    profile.data["symbols"]["entry_SYSCALL_64_after_hwframe"] = {"address": TARGET, "type": "T"}
    img.ram[TARGET - START_KERNEL_MAP] = 0x50  # push %rax, as the real kernel has there
    dom = FakeDomain("toy-trace", img.ram, kernel_dtb=img.kernel_dtb, symbols=dict(img.symbols), vcpus=2)
    user = toy._user_pgd(img)
    dom.pids = {42: user}
    gs = toy.POB + 0x3A_0000  # vCPU 0's per-cpu area: current_task is httpd
    for regs in dom.registers:
        regs.update(cr3=user, gs_base=gs)
    backend = LibvmiBackend("toy-trace", profile)
    yield backend, dom, lib
    backend.close()
    dom.close()


def _syscall(dom: Any, nr: int, *args: int, vcpu: int = 0, ip: int = 0x40_1234) -> None:
    regs = dict(zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), (*args, 0, 0, 0, 0, 0, 0), strict=False))
    dom.execute(vcpu, TARGET, rax=nr, rcx=ip, **regs)


def test_int3_events_become_rows(toy: tuple[Any, Any, Any]) -> None:
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, dom, _ = toy
    tracer = LibvmiSyscallTracer(backend, "toy")
    tracer.start()
    tracer.poll(0)
    assert bytes(dom.ram[TARGET - START_KERNEL_MAP:][:1]) == b"\xcc"
    _syscall(dom, 257, 0xFFFFFF9C, PATH_VA, 0)  # openat(AT_FDCWD, "/etc/shadow", O_RDONLY)
    _syscall(dom, 0, 3, 0x7FFF_F000_0000, 16, vcpu=1)  # read
    dom.execute(0, TARGET + 0x100)  # an instruction without a breakpoint: nothing
    tracer.poll(0)
    # after each hit: the original byte ran under single-step, then the breakpoint came back
    assert bytes(dom.ram[TARGET - START_KERNEL_MAP:][:1]) == b"\xcc"
    assert tracer.stats["steps"] == 2 and dom.reinjected == 0
    result = tracer.finish("done")
    assert bytes(dom.ram[TARGET - START_KERNEL_MAP:][:1]) == b"\x50" and dom.events == []
    rows = result.events.to_pylist()
    assert result.events.schema.equals(EVENT_SCHEMA) and result.reason == "done"
    assert [(r["seq"], r["vcpu"], r["pid"], r["tgid"], r["comm"], r["nr"]) for r in rows] == [
        (0, 0, 42, 42, "httpd", 257), (1, 1, 42, 42, "httpd", 0)]
    assert rows[0]["path"] == "/etc/shadow" and rows[1]["path"] is None
    assert rows[0]["args"][:3] == [0xFFFFFF9C, PATH_VA, 0] and rows[0]["user_ip"] == 0x40_1234
    assert rows[0]["ppid"] == 1 and rows[0]["cr3"] == dom.pids[42]
    # the toy profile has no maple-tree layout: call sites fall back to page offsets, and say so
    assert rows[0]["site"] == "?+0x234" and any("page offsets" in n for n in tracer.notes)


def test_the_guests_own_int3_is_reinjected(toy: tuple[Any, Any, Any]) -> None:
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, dom, _ = toy
    other = START_KERNEL_MAP + 0x18_0100
    dom.ram[other - START_KERNEL_MAP] = 0xCC  # e.g. a kprobe of the guest's own
    tracer = LibvmiSyscallTracer(backend, "toy")
    tracer.start()
    tracer.poll(0)
    dom.execute(0, other)
    tracer.poll(0)
    assert dom.reinjected == 1 and tracer.stats["reinjected"] == 1 and tracer.stats["events"] == 0
    tracer.finish("done")


def test_rate_cap_takes_the_breakpoint_out(toy: tuple[Any, Any, Any]) -> None:
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, dom, _ = toy
    tracer = LibvmiSyscallTracer(backend, "toy", policy=Policy(max_events_per_s=2, exclude=("init",)))
    tracer.start()
    tracer.poll(0)
    for nr in (1, 2, 3):
        _syscall(dom, nr)
    tracer.poll(0)
    assert tracer.stats["events"] == 2
    # the cap is reached for this second: the original instruction is back, the guest runs untrapped
    assert bytes(dom.ram[TARGET - START_KERNEL_MAP:][:1]) == b"\x50"
    result = tracer.finish("done")
    assert result.stats["capped"] == 1 and result.events["nr"].to_pylist() == [1, 2]


def test_a_policy_given_while_tracing_applies_at_the_next_poll(toy: tuple[Any, Any, Any]) -> None:
    """set_policy (REM-S changing the policy of a running trace: the one RecordingTracer switch every
    tracer shares) takes effect at the next poll, keeping the counts so far."""
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, dom, _ = toy
    tracer = LibvmiSyscallTracer(backend, "toy")
    tracer.start()
    tracer.poll(0)
    _syscall(dom, 1)
    tracer.poll(0)
    tracer.set_policy(Policy(exclude=("httpd",)))
    assert tracer.policy.exclude == ()  # not yet: only at the loop's next turn
    tracer.poll(0)
    _syscall(dom, 2)
    tracer.poll(0)
    result = tracer.finish("done")
    assert tracer.policy.exclude == ("httpd",) and tracer.recorder.policy is tracer.policy
    assert result.events["nr"].to_pylist() == [1] and result.stats["filtered"] == 1
    assert any(n.startswith("policy changed while tracing") for n in tracer.notes)


def test_finish_keeps_pending_hits_and_a_vanished_domain_ends_run(toy: tuple[Any, Any, Any]) -> None:
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, dom, _ = toy
    tracer = LibvmiSyscallTracer(backend, "toy")
    tracer.start()
    tracer.poll(0)
    _syscall(dom, 39)  # hit, not yet delivered
    result = tracer.finish("done")
    assert result.stats["events"] == 1 and dom.events == []
    # run(): the domain goes away under the tracer (LibvmiError at the next listen)
    tracer = LibvmiSyscallTracer(backend, "toy")
    tracer.start()
    tracer.poll(0)
    _syscall(dom, 60)
    tracer.poll(0)
    backend.vmi.destroy()
    result = tracer.run(duration=30)
    assert result.reason.startswith("guest-gone: LibVMI") and result.events["nr"].to_pylist() == [60]
    assert any("could not remove the breakpoint" in n for n in tracer.notes)


def test_run_stops_at_max_events(toy: tuple[Any, Any, Any]) -> None:
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, dom, _ = toy
    tracer = LibvmiSyscallTracer(backend, "toy")
    tracer.start()
    tracer.poll(0)
    for nr in (0, 1, 2):
        _syscall(dom, nr)
    result = tracer.run(duration=30, max_events=2)
    # the three hits were delivered in one listen; the loop stops after it
    assert result.reason == "max-events" and result.stats["events"] == 3


def test_unreadable_tasks_end_the_trace(toy: tuple[Any, Any, Any]) -> None:
    from vims.collector.recorder import MAX_UNREADABLE
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, dom, _ = toy
    tracer = LibvmiSyscallTracer(backend, "toy")
    tracer.start()
    tracer.poll(0)
    for _ in range(MAX_UNREADABLE):
        dom.execute(0, TARGET, rax=1, gs_base=0xFFFF_FFFF_FFFF_0000)  # GS base outside guest memory
    with pytest.raises(Exception, match="stops in a row"):
        tracer.poll(0)
    result = tracer.finish("guest-unreadable")
    assert result.stats["unreadable"] == MAX_UNREADABLE and result.events.num_rows == 0
    assert bytes(dom.ram[TARGET - START_KERNEL_MAP:][:1]) == b"\x50"


def test_missing_symbol_is_a_clear_error(toy: tuple[Any, Any, Any]) -> None:
    from vims.collector.tracer import TracerError
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, _, _ = toy
    del backend.profile.data["symbols"]["entry_SYSCALL_64_after_hwframe"]
    with pytest.raises(TracerError, match="entry_SYSCALL_64_after_hwframe"):
        LibvmiSyscallTracer(backend, "toy")


def test_an_idle_guest_still_gives_heartbeats(toy: tuple[Any, Any, Any]) -> None:
    """No system call for 2.5 s: empty batches keep coming (the collector is alive), then a real one."""
    from vims.collector.tracer_libvmi import LibvmiSyscallTracer

    backend, dom, _ = toy
    got: list[Any] = []
    tracer = LibvmiSyscallTracer(backend, "toy", on_batch=got.append, keep=False)
    result = tracer.run(duration=2.5)
    assert result.stats["heartbeats"] >= 2 and len(got) == result.stats["heartbeats"]
    assert all(b.num_rows == 0 and b.schema.equals(EVENT_SCHEMA) for b in got)
    tracer = LibvmiSyscallTracer(backend, "toy", on_batch=got.append, keep=False)
    tracer.start()
    tracer.poll(0)
    _syscall(dom, 60)
    tracer.poll(0)
    tracer.finish("done")
    assert got[-1].num_rows == 1 and tracer.stats["heartbeats"] == 0
