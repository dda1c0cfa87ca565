"""The C-VM: a Debian kernel and a busybox workload under QEMU, built and run from Python.

>>> from vims.collector.guest import SCENARIOS
>>> SCENARIOS
('normal', 'webshell', 'adduser', 'tamper-binary')
"""

from vims.collector.guest.image import GuestImage, build_guest
from vims.collector.guest.qemu import SCENARIOS, Guest, GuestBootError, kvm_available

__all__ = ["SCENARIOS", "Guest", "GuestBootError", "GuestImage", "build_guest", "kvm_available"]
