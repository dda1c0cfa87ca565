"""A small protected service for tests and the demo: a line service on loopback.

Each line ``L`` a client sends is answered with ``data: L``; ``quit`` closes the connection.

>>> import asyncio
>>> async def demo():
...     server = await start_line_service()
...     port = server.sockets[0].getsockname()[1]
...     r, w = await asyncio.open_connection("127.0.0.1", port)
...     w.write(b"hello\\n")
...     line = await r.readline()
...     w.close(); server.close()
...     return line
>>> asyncio.run(demo())
b'data: hello\\n'
"""

from __future__ import annotations

import asyncio
import contextlib


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError, ValueError):
        while True:
            line = await reader.readline()
            if not line or line.strip() == b"quit":
                break
            writer.write(b"data: " + line if line.endswith(b"\n") else b"data: " + line + b"\n")
            await writer.drain()
    writer.close()


async def start_line_service(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start the service; ``server.sockets[0].getsockname()[1]`` is its port."""
    return await asyncio.start_server(_serve, host, port)
