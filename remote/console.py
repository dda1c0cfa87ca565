"""REM-S's web console: the fleet, one VM, the decisions; live, read from the history store.

``vims remote serve --console 127.0.0.1:PORT`` runs :class:`ConsoleServer` in a thread beside the
server: a Starlette application on uvicorn, reading its own connection to the store through the one
set of views (:mod:`vims.remote.views`, the same JSON as the CLI's ``--json``). The pages are plain
HTML and JavaScript served from here (no build step); they fetch the JSON every two seconds.

Every request needs the access token (random, made at start): ``?token=...`` (which also sets a
cookie), the cookie, or ``Authorization: Bearer ...``; without it the answer is 401. There is no
unauthenticated mode, on loopback or elsewhere.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vims.remote import views
from vims.remote.store import Store

COOKIE = "vims_console"
PAGE = Path(__file__).with_name("console.html")


class ConsoleServer:
    """The console's web server in a thread of its own.

    Parameters
    ----------
    location : Path or str
        The store (as :class:`~vims.remote.store.Store` opens it); the console opens its own connection.
    host, port : str, int
        Where to listen (port 0: any free one; :attr:`url` says which).
    live : callable, optional
        What only the running server knows (``RemsServer.live``); without it the pages show no
        open connections.
    token : str, optional
        The access token (default: a fresh random one, :attr:`token`).
    """

    def __init__(self, location: Path | str, host: str = "127.0.0.1", port: int = 0,
                 live: Callable[[], dict[str, Any]] | None = None, token: str | None = None) -> None:
        import uvicorn

        self.location = location
        self.token = token or secrets.token_urlsafe(24)
        self.live = live
        self.store = Store(location)
        self._lock = threading.Lock()
        config = uvicorn.Config(self.app(), host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="rem-s-console", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 20.0) -> ConsoleServer:
        """Start listening; returns when the port is bound (raises VimsError if it cannot be)."""
        from vims.errors import VimsError
        from vims.poll import poll_until

        self._thread.start()
        poll_until(lambda: self._server.started or not self._thread.is_alive(), timeout,
                   lambda: VimsError(f"the console did not start within {timeout:g} s"))
        if not self._server.started:
            raise VimsError(f"cannot serve the console on {self.host}:{self.port}")
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        import ipaddress

        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = self.host == "localhost"
        if not loopback:
            logging.getLogger("vims.remote.server").warning(
                "the console listens on %s, not loopback: plain HTTP, so the token crosses the network in the "
                "clear; put it behind a TLS proxy or an SSH tunnel", self.host)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.store.close()

    def __enter__(self) -> ConsoleServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the application ------------------------------------------------------------------------------

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:  # one connection, one reader at a time
            return fn(self.store, *args)

    def _authorised(self, request: Any) -> bool:
        given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
        auth = request.headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def app(self) -> Any:
        """The Starlette application (pages and JSON, all behind the token)."""
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route

        def _int(request: Request, name: str, default: int | None, top: int = 1000) -> int | None:
            text = request.query_params.get(name)
            if text is None or text == "":
                return default
            if not text.isdigit():
                raise ValueError(f"{name} is not a whole number: {text!r}")
            return min(int(text), top)

        def page(request: Request) -> Response:
            resp = HTMLResponse(PAGE.read_text(), headers={"Cache-Control": "no-store"})
            if request.query_params.get("token"):
                resp.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return resp

        def status(request: Request) -> Response:
            return JSONResponse(self._read(views.fleet))

        def history(request: Request) -> Response:
            limit = _int(request, "limit", 50) or 50
            return JSONResponse(self._read(views.history, request.path_params["vm"], limit,
                                           _int(request, "before", None, 2**62)))

        def detail(request: Request) -> Response:
            return JSONResponse(self._read(views.vm_detail, request.path_params["vm"]))

        def decisions(request: Request) -> Response:
            return JSONResponse(self._read(views.decisions, request.query_params.get("q", ""),
                                           _int(request, "limit", 100) or 100))

        def live(request: Request) -> Response:
            import time

            return JSONResponse(self.live() if self.live else {"now": time.time(), "vms": {}})

        routes = [Route("/", page), Route("/vm/{vm}", page), Route("/decisions", page),
                  Route("/api/status", status), Route("/api/history/{vm}", history),
                  Route("/api/vm/{vm}", detail), Route("/api/decisions", decisions), Route("/api/live", live)]

        async def bad(request: Request, exc: Exception) -> Response:
            return PlainTextResponse(f"400: {exc}", status_code=400)

        inner = Starlette(routes=routes, exception_handlers={ValueError: bad})

        async def guarded(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                request = Request(scope)
                if not self._authorised(request):
                    await PlainTextResponse("401: the console needs its access token (?token=...)",
                                            status_code=401)(scope, receive, send)
                    return
            await inner(scope, receive, send)

        return guarded
