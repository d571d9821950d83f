"""The one port of ``voice-assistant serve``: websocket faces by path, HTTP pages, auth and Origin.

The listener serves, on one port (docs/protocol.md is the contract):

* ``GET /`` and the browser client's files from ``assistant/server/web/``;
* ``GET /healthz``, a JSON status, and ``GET /metrics`` (Prometheus);
* a websocket face on each path of :data:`ROUTES`: ``/ws`` (protocol v1,
  :mod:`.v1`) and ``/v1/realtime`` (the OpenAI Realtime API,
  :mod:`.realtime`). Each connection is one
  :class:`~assistant.server.connection.Connection` over a new session of the
  models loaded once per process; sessions run concurrently and the one
  vLLM engine batches their requests.

It checks every handshake (the bearer token, the Origin, the path, the
session cap) before a face exists; what a connection says and does is its
face's and its connection's. The ``serve`` command around it is
:mod:`.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import http
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server as WSServer
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from pipeline.frames import now

from ..config import Config
from ..telemetry import Telemetry
from . import realtime, v1
from .capacity import Capacity, Load
from .connection import CLOSE_TIMEOUT_S, SETTLE_TIMEOUT_S, Connection
from .face import Route, too_many_sessions
from .http import ALLOWED_METHODS, MAX_PATH_CHARS, WEB_DIR, HTTPConnection, peer, response, static_file, url_host
from .v1.codec import PROTOCOL_VERSION

log = logging.getLogger("assistant.server")

TOKEN_ENV: Final = "VOICE_ASSISTANT_TOKEN"
WS_PATH: Final = v1.WS_PATH

ROUTES: Final[tuple[Route, ...]] = (
    v1.ROUTE,  # /ws: the project's protocol, the browser page's
    realtime.ROUTE,  # /v1/realtime: the OpenAI Realtime API
)
"""Every websocket face, by path: a new wire is one more row."""


class Server:
    """The websocket endpoint and the static browser client on one port.

    Usable in-process (tests, benchmarks)::

        async with Server(models, config, port=0) as server:
            ...  # server.url, server.ws_url

    ``token``: None takes ``VOICE_ASSISTANT_TOKEN`` or ``server.auth_token``;
    "" turns auth off whatever they say. ``routes``: the faces it speaks
    (:data:`ROUTES`).
    """

    def __init__(
        self,
        models: Any,
        config: Config,
        *,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        web_dir: Path | None = None,
        sock: socket.socket | None = None,
        routes: tuple[Route, ...] = ROUTES,
    ) -> None:
        s = config.server
        self.models = models
        self.config = config
        self.host = s.host if host is None else host
        self.port = s.port if port is None else port
        if token is None:
            token = os.environ.get(TOKEN_ENV) or s.auth_token
        self.token = token or None
        self.web_dir = (web_dir or WEB_DIR).resolve()
        self.allowed_origins = {o.rstrip("/").lower() for o in s.allowed_origins}
        self.routes = {route.path: route for route in routes}
        self.shutdown_grace_s = s.shutdown_grace_s
        self._sock = sock
        self._ws: WSServer | None = None
        self._connections: set[Connection] = set()
        self._started_at = time.monotonic()
        self.hurried = asyncio.Event()  # a second signal: in-flight turns get no more grace
        self.telemetry = Telemetry()
        self.capacity = Capacity(s.max_sessions, config.budgets.voice_to_voice_ms, s.load_threshold, s.load_window_s)
        self.telemetry.voice_to_voice_listeners.append(self.capacity.turn)
        self.telemetry.watch_load(self.load)
        self._watch: asyncio.Task[None] | None = None
        if models is not None:  # (the HTTP tests run a server without models)
            self.telemetry.models_loaded.set(1)
            self.telemetry.watch_engine(models.llm.health)

    # ---- life -----------------------------------------------------------

    async def start(self) -> None:
        s = self.config.server
        self.telemetry.watch_loop(asyncio.get_running_loop())
        where: dict[str, Any] = {"sock": self._sock} if self._sock is not None else {"host": self.host, "port": self.port}
        self._ws = await ws_serve(
            self._handle,
            process_request=self._process_request,
            create_connection=HTTPConnection,
            max_size=s.max_message_bytes,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            server_header="voice-assistant",
            select_subprotocol=self._select_subprotocol,
            **where,
        )
        self.port = self._ws.sockets[0].getsockname()[1]
        self._watch = asyncio.get_running_loop().create_task(self.capacity.watch_loop(), name="loop-lag")

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop listening, end every session (in-flight turns get ``grace``), close."""
        if self._ws is None:
            return
        if grace is not None:
            self.shutdown_grace_s = grace
        if self._watch is not None:
            self._watch.cancel()
        self._ws.close(close_connections=False)
        for connection in list(self._connections):
            connection.end("shutdown")
        limit = self.shutdown_grace_s + SETTLE_TIMEOUT_S + CLOSE_TIMEOUT_S + 1
        try:
            await asyncio.wait_for(self._ws.wait_closed(), limit)
        except TimeoutError:
            log.warning("sessions still open %.0f s after shutdown began; dropping them", limit)
            for connection in list(self._connections):
                connection.ws.transport.abort()
        self._ws = None

    def hurry(self) -> None:
        """End the shutdown's grace now: turns are cancelled, sessions still told (session.ended, 1001)."""
        self.shutdown_grace_s = 0
        self.hurried.set()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    @property
    def sessions(self) -> int:
        return len(self._connections)

    def load(self) -> Load:
        """Whether one more session fits now (:mod:`.capacity`)."""
        return self.capacity.read(len(self._connections))

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://{url_host(self.host)}:{self.port}{WS_PATH}"

    # ---- connections ------------------------------------------------------

    def _route(self, request: Request | None) -> Route | None:
        return self.routes.get(urlsplit(request.path).path) if request is not None else None

    def _select_subprotocol(self, ws: ServerConnection, offered: Any) -> str | None:
        """The first subprotocol the client offers that its face accepts (a browser
        refuses a realtime socket without one); none for clients that offer none."""
        route = self._route(ws.request)
        accepted = route.subprotocols if route is not None else ()
        return next((p for p in offered if p in accepted), None)

    async def _handle(self, ws: ServerConnection) -> None:
        route = self._route(ws.request)
        if route is None:  # the handshake check let only the table's paths through
            await ws.close(CloseCode.INTERNAL_ERROR, "no face for this path")
            return
        connection = Connection(self, ws, route.face(self.config, ws.request, now()))
        load = self.load()
        if not load.accepting:
            log.info("connection from %s refused: %s (%d sessions open)", connection.peer, load.reason,
                     len(self._connections))
            with contextlib.suppress(Exception):
                await connection.refuse(too_many_sessions(self.config.server.max_sessions, load.reason))
            return
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)

    # ---- HTTP -------------------------------------------------------------

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Every HTTP request, the websocket handshake included; a bug is a 500 and one log line."""
        try:
            return self._answer(ws, request)
        except Exception as exc:
            log.error("HTTP request from %s: internal error: %s: %s", peer(ws), type(exc).__name__, exc)
            log.debug("traceback", exc_info=True)
            return response(http.HTTPStatus.INTERNAL_SERVER_ERROR, b"internal server error\n")

    def _answer(self, ws: ServerConnection, request: Request) -> Response | None:
        if len(request.path) > MAX_PATH_CHARS:
            log.info("HTTP request from %s refused: a path of %d characters", peer(ws), len(request.path))
            return response(http.HTTPStatus.REQUEST_URI_TOO_LONG, b"request path too long\n")
        parts = urlsplit(request.path)
        websocket = parts.path in self.routes
        if request.method not in ALLOWED_METHODS or (request.method != "GET" and websocket):
            allowed = "GET" if websocket else ", ".join(ALLOWED_METHODS)
            refused = response(http.HTTPStatus.METHOD_NOT_ALLOWED, f"method not allowed; use {allowed}\n".encode())
            refused.headers["Allow"] = allowed
            return refused
        if websocket:
            return self._check_handshake(ws, request, parts.query)
        page = self._page(parts.path)
        if request.method == "HEAD":  # the GET's headers, Content-Length included, and no body
            return Response(page.status_code, page.reason_phrase, page.headers, b"")
        return page

    def _page(self, path: str) -> Response:
        """What a GET of ``path`` (not a websocket) answers."""
        if path == "/metrics":
            body, content_type = self.telemetry.exposition()
            return response(http.HTTPStatus.OK, body, content_type)
        if path in ("/healthz", "/readyz"):
            serving = self._ws is not None and self._ws.is_serving()
            engine = self.models.llm.health() if self.models is not None else {"state": "none"}
            load = self.load()
            ready = serving and engine["state"] == "up"
            body = {
                # up: the process answers; ready: it can hold a conversation
                # (models loaded, which a Server implies, and the engine answering)
                "status": "ok" if serving else "stopping",
                "ready": ready,
                "protocol": PROTOCOL_VERSION,
                "sessions": len(self._connections),
                "max_sessions": self.config.server.max_sessions,
                **load.json(),
                "auth": self.token is not None,
                "uptime_s": round(time.monotonic() - self._started_at, 1),
                "engine": engine,
            }
            # /healthz: the process answers (200 while it runs); /readyz: send
            # it a new session (200) or not (503), for a load balancer's check.
            status = http.HTTPStatus.OK
            if path == "/readyz" and not (ready and load.accepting):
                status = http.HTTPStatus.SERVICE_UNAVAILABLE
            return response(status, json.dumps(body).encode(), "application/json")
        return static_file(self.web_dir, path)

    def _check_handshake(self, ws: ServerConnection, request: Request, query: str) -> Response | None:
        if self.token is not None:
            given = None
            authorization = request.headers.get("Authorization", "")
            if authorization.lower().startswith("bearer "):
                given = authorization[7:].strip()
            else:
                route = self._route(request)
                credential = route.credential if route is not None else None
                given = (parse_qs(query).get("token") or [None])[0] or (
                    credential(request.headers) if credential is not None else None)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                log.info("handshake from %s refused: %s token", peer(ws), "wrong" if given else "no")
                refused = ws.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
                refused.headers["WWW-Authenticate"] = "Bearer"
                return refused
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("Host", "")):
            log.info("handshake from %s refused: origin %r not allowed", peer(ws), origin)
            return ws.respond(http.HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed\n")
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        """An explicit allow-list, or else only the page this server serves itself."""
        normalized = origin.rstrip("/").lower()
        if self.allowed_origins:
            return "*" in self.allowed_origins or normalized in self.allowed_origins
        parts = urlsplit(normalized)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.lower()
