"""Stopping the shared Debian guest where a test needs it (for the tests of this folder)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from vims.collector.gdbstub import GdbStub
from vims.collector.guest import Guest


@contextmanager
def halted_in_kernel(guest: Guest) -> Iterator[tuple[GdbStub, int]]:
    """The guest stopped, with a vCPU that was in the kernel (its page tables map the kernel under PTI);
    resumed at the end."""
    with GdbStub(*guest.gdb_address) as gdb:
        for _ in range(50):
            gdb.halt()
            vcpu = next((v for v in gdb.vcpus() if gdb.register("rip", v) >> 63), None)
            if vcpu is not None:
                break
            gdb.resume()
        else:
            pytest.fail("no vCPU stopped in the kernel in 50 tries")
        try:
            yield gdb, vcpu
        finally:
            gdb.resume()
