"""Loopback ports: the one place that picks a free TCP port (REM-S gates, the demo, tests)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago.

    Returns
    -------
    int
        The port number.
    """
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on loopback that were free a moment ago (held together while chosen).

    Parameters
    ----------
    n : int
        How many ports.

    Returns
    -------
    list of int
        The port numbers.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()
