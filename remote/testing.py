"""Helpers for testing REM-S over real sockets: a deployment in a temp folder, a raw A-VM, waiting.

>>> wait_until(lambda: [1, 2], timeout=1.0, what="a list")
[1, 2]
>>> wait_until(lambda: None, timeout=0.05, what="nothing")
Traceback (most recent call last):
    ...
AssertionError: timed out after 0.05 s waiting for nothing
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from vims.net import free_ports
from vims.poll import poll_until
from vims.remote.client import AvmSession, dealer
from vims.remote.keys import AvmIdentity, ServerKeys
from vims.remote.protocol import ProtocolError
from vims.remote.server import ServerThread
from vims.remote.store import Store


def wait_until(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something true; raise AssertionError after ``timeout`` seconds."""
    return poll_until(pred, timeout, lambda: AssertionError(f"timed out after {timeout:g} s waiting for {what}"))


class Deployment:
    """REM-S keys, a database with enrolled A-VMs, and (when started) the server, all under ``folder``.

    Parameters
    ----------
    folder : Path
        A private temporary folder.
    vms : int
        How many VMs (``vm-1``...) with one A-VM each (``avm-1``...) to enrol.
    policy : dict, optional
        The policy every VM starts with.
    """

    def __init__(self, folder: Path, vms: int = 1, policy: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.db = self.folder / "rems.sqlite"
        self.keys = ServerKeys.generate()
        self.avms: dict[str, AvmIdentity] = {}
        self.ports: dict[str, int] = {}
        store = Store(self.db)
        ports = free_ports(vms + 1)
        # The control channel's own port, chosen with the gates' so no gate finds its port taken by it.
        self.control = f"tcp://127.0.0.1:{ports[-1]}"
        for i in range(1, vms + 1):
            ident = AvmIdentity.generate(f"avm-{i}")
            self.avms[f"vm-{i}"] = ident
            self.ports[f"vm-{i}"] = ports[i - 1]
            store.enroll(ident.public, f"vm-{i}", self.ports[f"vm-{i}"], policy or {})
        store.close()
        self.thread: ServerThread | None = None

    def start(self, **kwargs: Any) -> ServerThread:
        kwargs.setdefault("demo_service", True)
        kwargs.setdefault("control", self.control)
        self.thread = ServerThread(self.db, self.keys, **kwargs).start()
        return self.thread

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    @property
    def endpoint(self) -> str:
        assert self.thread is not None
        return self.thread.server.endpoint

    def metric(self, name: str, **labels: str) -> float:
        assert self.thread is not None
        server = self.thread.server
        return float(self.thread.call(lambda: server.metrics.get(name, **labels)))

    def line(self, name: str, **labels: str) -> str:
        """How the series starts its line in :meth:`scrape` (with the verifier's label)."""
        assert self.thread is not None
        return self.thread.server.metrics.line(name, **labels)

    def scrape(self) -> str:
        """The Prometheus text, fetched over HTTP like Prometheus would."""
        assert self.thread is not None and self.thread.server.metrics_bound
        url = f"http://127.0.0.1:{self.thread.server.metrics_bound}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())

    def store(self) -> Store:
        """A second connection to the database (as the CLI would open)."""
        return Store(self.db)

    def connect(self, vm_id: str = "vm-1", timeout: float = 20.0) -> socket.socket:
        """A client connection to ``vm_id``'s gate."""
        sock = socket.create_connection(("127.0.0.1", self.ports[vm_id]), timeout=timeout)
        sock.settimeout(timeout)
        return sock


def read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    """Read up to and including a newline (or EOF)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_all(sock: socket.socket) -> bytes:
    """Read until the peer closes."""
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


class RawAvm:
    """An A-VM driven by hand: the test decides what to send (tampered, replayed, stale reports).

    It answers policies with acks (as the real client does) and returns every other message.
    """

    def __init__(self, identity: AvmIdentity, endpoint: str, server_public: str, hello: bool = True) -> None:
        self.ctx = zmq.Context()
        self.sock = dealer(self.ctx, identity, server_public, endpoint)
        self.session = AvmSession(identity, {"checks": [], "collectors": ["raw"]})
        if hello:
            self.send(self.session.hello())
            self.expect("policy")

    def send(self, frame: bytes | list[bytes]) -> None:
        if isinstance(frame, list):
            self.sock.send_multipart(frame)
        else:
            self.sock.send(frame)

    def recv(self, timeout: float = 20.0) -> tuple[str, dict[str, Any]]:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"nothing from REM-S within {timeout:g} s")
        frame = self.sock.recv()
        try:
            events, replies = self.session.handle(frame)
        except ProtocolError as exc:
            raise AssertionError(f"unusable message from REM-S: {exc}") from exc
        for reply in replies:
            self.sock.send(reply)
        return events[0]

    def expect(self, kind: str, timeout: float = 20.0) -> dict[str, Any]:
        """The next message of ``kind`` (others are passed over)."""
        end = time.monotonic() + timeout
        while True:
            got, body = self.recv(max(0.01, end - time.monotonic()))
            if got == kind:
                return body

    def drain(self) -> None:
        while self.sock.poll(0):
            self.sock.recv()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
