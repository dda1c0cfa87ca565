"""A fake of the ``libvmi`` Python package (LibVMI's bindings), for tests on hosts without Xen/KVMi.

It keeps the real package's public names and signatures (``libvmi/__init__.py``, ``libvmi.libvmi``,
``libvmi.event`` of https://github.com/libvmi/python) and backs them with a guest memory image and
scripted vCPUs instead of a hypervisor: see :class:`libvmi._fake.FakeDomain`. Everything a real
caller can do works the same; what only tests do (creating a domain, making a vCPU reach an
instruction) is in ``libvmi._fake``, which the real package does not have.

Put ``tests/fakes`` on ``sys.path`` (before any real ``libvmi``) to use it.
"""

# flake8: noqa
from .libvmi import INIT_DOMAINNAME, INIT_DOMAINID, INIT_EVENTS
from .libvmi import (Libvmi, LibvmiError, VMIConfig, VMIMode, AccessContext,
                     TranslateMechanism, X86Reg, Registers)
from .libvmi import VMIStatus, LibvmiInitError, PageMode
from .libvmi import VMIArch, VMIOS, VMIWinVer

__all__ = [
    "INIT_DOMAINID", "INIT_DOMAINNAME", "INIT_EVENTS", "VMIOS", "AccessContext", "Libvmi", "LibvmiError",
    "LibvmiInitError", "PageMode", "Registers", "TranslateMechanism", "VMIArch", "VMIConfig", "VMIMode",
    "VMIStatus", "VMIWinVer", "X86Reg",
]
