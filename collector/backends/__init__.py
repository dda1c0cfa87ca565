"""Backends: how the collector reaches a guest's memory and vCPUs (QEMU here; LibVMI on Xen/KVMi).

>>> from vims.collector.backends import Backend, QemuBackend, LibvmiBackend
>>> sorted(b.name for b in (QemuBackend, LibvmiBackend))
['libvmi', 'qemu']
"""

from vims.collector.backends.base import REGISTERS, Backend, BackendError
from vims.collector.backends.libvmi import LibvmiBackend
from vims.collector.backends.qemu import QemuBackend

__all__ = ["REGISTERS", "Backend", "BackendError", "LibvmiBackend", "QemuBackend"]
