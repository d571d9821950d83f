"""The websocket bridge: ``voice-assistant serve``.

One port serves three things (docs/protocol.md is the contract):

* ``GET /`` and the browser client's files from ``assistant/server/web/``;
* ``GET /healthz``, a JSON status;
* the websocket endpoint ``/ws``: each connection is one
  :class:`~assistant.session.Session` over the models loaded once per
  process. Sessions run concurrently; the one vLLM engine batches their
  requests (each has its own request ids), nothing serializes them here.

Everything a client sends is untrusted. A malformed message gets an
``error`` event; a client that breaks the protocol, floods the server or
goes silent is closed with the close code the protocol names; a bug while
serving one session closes that session with 1011 and nothing else. No
exception ever reaches the websockets library's handler (which would log a
traceback).

This module is the connection lifecycle, the limits (auth, Origin, sizes,
input rate, session cap, idle timeout), the static files and the process
around them. It never builds or reads a message: each connection has a
:class:`~assistant.server.protocol.WireProtocol` (protocol v1, in
:mod:`assistant.server.protocol`) that parses what the client sends, turns
the session's events into messages and says how each ending closes; paced
reply audio is :mod:`assistant.server.output`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import http
import json
import logging
import mimetypes
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from websockets.asyncio.server import Server as WSServer
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from audio.framing import StreamFramer
from audio.resample import Resampler
from pipeline.frames import AudioFrame, Event, now
from pipeline.runtime import Channel, budgets_of

from ..config import Config
from ..errors import UserError
from .protocol import (
    PROTOCOL_VERSION,
    Ending,
    InputEnd,
    PlaybackHeard,
    PlaybackPosition,
    ProtocolError,
    ProtocolV1,
    SessionEnd,
    SessionStart,
    WireProtocol,
    input_too_fast,
    messages_too_fast,
    start_timeout,
    too_many_sessions,
)
from .output import WebSocketOutput

log = logging.getLogger("assistant.server")

WS_PATH: Final = "/ws"
TOKEN_ENV: Final = "VOICE_ASSISTANT_TOKEN"
WEB_DIR: Final = Path(__file__).resolve().parent / "web"
START_TIMEOUT_S: Final = 10.0  # the first message must be session.start by then
CLOSE_TIMEOUT_S: Final = 2.0  # closing handshake
SETTLE_TIMEOUT_S: Final = 2.0  # a cancelled session's pipeline gets this long to wind down
INPUT_QUEUE_FRAMES: Final = 500  # 10 s of 20 ms frames; the oldest are dropped beyond
RATE_WINDOW_S: Final = 2.0  # the input rate check's burst allowance, in seconds of wall clock
MAX_PATH_CHARS: Final = 2048  # a longer request target gets 414 (no file of the client is named that long)
MAX_HEAD_BYTES: Final = 65536  # past this without a blank line, the websockets parser's own limits answer
ALLOWED_METHODS: Final = ("GET", "HEAD")

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wasm": "application/wasm",
    ".wav": "audio/wav",
    ".txt": "text/plain; charset=utf-8",
}


class ListenError(UserError):
    """The server cannot listen on the requested address."""

    exit_code = 4


class TokenBucket:
    """A token bucket: holds ``capacity``, refills at ``rate`` per second.

    Two per connection: audio seconds (refilling at ``server.max_input_rate``
    x real time) and messages (``server.max_messages_per_s``). A client that
    sends in bursts (network hiccups, big messages) is fine while one that
    sends faster than the rate runs dry after one burst.
    """

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = max(capacity, 1.0)
        self._tokens = self.capacity
        self._at = now()

    def take(self, amount: float, at: float) -> bool:
        self._tokens = min(self.capacity, self._tokens + (at - self._at) * self.rate)
        self._at = at
        self._tokens -= amount
        return self._tokens >= 0


def audio_bucket(max_input_rate: float, max_message_bytes: int, input_rate: int) -> TokenBucket:
    """The input-rate check for a session whose audio comes at ``input_rate``.

    It holds ``RATE_WINDOW_S`` of audio at the allowed rate, or one message of
    the largest size the server accepts if that is more (262,142 bytes are
    8.19 s at 16 kHz): the docs allow any even length up to
    ``max_message_bytes``, so one such frame must pass.
    """
    largest = max_message_bytes // 2 / input_rate
    return TokenBucket(max_input_rate, max(max_input_rate * RATE_WINDOW_S, largest))


# --------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------


_END_OF_INPUT: Final = object()


class _Connection:
    """One websocket connection: one Session, spoken to through its wire protocol."""

    def __init__(self, server: Server, ws: ServerConnection) -> None:
        self.server = server
        self.ws = ws
        self.config: Config = server.config
        self.peer = _peer(ws)
        self.session: Any = None
        self.output: WebSocketOutput | None = None
        self.wire: WireProtocol = ProtocolV1(now(), self.config.audio.output_rate)
        self._ending: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[Any]] = []
        self._input: Channel[Any] = Channel("ws.input", maxsize=INPUT_QUEUE_FRAMES)
        self._input_closed = False
        self._draining = False  # shutting down: audio is no longer listened to
        self._framer = StreamFramer(self.config.audio.input_rate, self.config.audio.frame_ms)
        self._resampler: Resampler | None = None
        self._audio_limit: TokenBucket | None = None  # made at the first audio, at session.start's rate
        self._message_limit = TokenBucket(self.config.server.max_messages_per_s, self.config.server.message_burst)
        self._start: SessionStart | None = None
        self._fatal: ProtocolError | None = None  # the client's fatal error, when that is how it ends

    @property
    def id(self) -> str:
        return self.session.id if self.session is not None else f"pending@{self.peer}"

    def end(self, reason: str) -> None:
        """Ask the connection to end (first reason wins)."""
        if not self._ending.done():
            self._ending.set_result(reason)

    # ---- lifecycle ----------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a bug: this session only
            log.error("session %s: internal error: %s: %s", self.id, type(exc).__name__, exc)
            log.debug("session %s: traceback", self.id, exc_info=True)
            with contextlib.suppress(Exception):
                await self._close_with(self.wire.ending("internal"))
        finally:
            tasks = list(self._tasks)  # finished jobs leave the list as they end (realtime.py)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            if self.output is not None:
                self.output.close()

    async def _run(self) -> None:
        start = await self._read_start()
        if start is None:
            return
        self._start = start
        config = self.config
        from ..session import LIVE_TURNS_KEPT, Session

        self.output = WebSocketOutput(
            self.ws, self.wire, config.audio.output_rate, start.output_rate, config.server.jitter_buffer_ms / 1000,
            self.wire.origin,
        )
        session = self.session = Session(self.server.models, config, self.output, keep_turns=LIVE_TURNS_KEPT)
        self.wire.origin = self.output.origin = session.origin
        self._resampler = Resampler(start.input_rate, config.audio.input_rate)
        session.bus.subscribe(self._on_event)
        session.report.listeners.append(self._on_turn_closed)
        observed = self.server.telemetry.observe(session)
        try:
            await self._serve_session(session, start, config)
        finally:
            observed()

    async def _serve_session(self, session: Any, start: SessionStart, config: Config) -> None:
        sender = self._spawn(self.output.run(), "send")
        budgets_ms = {b.stage: b.ms for b in budgets_of(config)}
        self.output.send_event(self.wire.ready(session.id, start, config.audio.frame_ms, budgets_ms))
        log.info("session %s opened from %s (%s), audio in %d Hz, out %d Hz",
                 session.id, self.peer, start.client or "client", start.input_rate, start.output_rate)
        pipeline = self._spawn(session.run(self._frames()), "session")
        pipeline.add_done_callback(
            lambda t: self.end("input_ended" if not t.cancelled() and t.exception() is None else "internal")
        )
        self._spawn(self._receive(), "recv")
        reason = await self._ending
        if reason == "internal" and pipeline.done() and not pipeline.cancelled() and pipeline.exception():
            exc = pipeline.exception()
            log.error("session %s: pipeline failed: %s: %s", session.id, type(exc).__name__, exc)
            log.debug("session %s: traceback", session.id, exc_info=exc)
        await self._finish(reason, pipeline, sender)

    def _spawn(self, coro: Any, what: str) -> asyncio.Task[Any]:
        """A task of this connection; one that fails ends the connection (1011), never silently."""
        task = asyncio.create_task(coro, name=f"{self.session.id if self.session else 'ws'}:{what}")
        self._tasks.append(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        # A receive loop that died of a bug used to leave the connection
        # waiting forever (no idle timeout either): its slot leaked.
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if not task.get_name().endswith(":session"):  # the pipeline's own failure is logged in _run
            log.error("session %s: internal error in %s: %s: %s", self.id, task.get_name(), type(exc).__name__, exc)
            log.debug("session %s: traceback", self.id, exc_info=exc)
        self.end("internal")

    async def _read_start(self) -> SessionStart | None:
        """Wait for session.start (or a shutdown); refuse anything else."""
        receive = asyncio.ensure_future(self.ws.recv())
        try:
            done, _ = await asyncio.wait({receive, self._ending}, timeout=START_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receive.done():
                receive.cancel()
        if self._ending.done():  # shutdown before the session started
            await self._close_with(self.wire.ending(self._ending.result()))
            return None
        if receive not in done:
            await self._refuse(start_timeout(START_TIMEOUT_S))
            return None
        try:
            message = receive.result()
        except ConnectionClosed:
            return None
        audio = self.config.audio
        try:
            return self.wire.parse_start(message, audio.input_rate, audio.output_rate)
        except ProtocolError as exc:
            await self._refuse(exc)
            return None

    async def _refuse(self, error: ProtocolError) -> None:
        """Close a connection whose session never started: the fatal error, then its close code."""
        log.info("connection from %s refused: %s", self.peer, error.message)
        await self._close_with(self.wire.refusal(error))

    async def _finish(self, reason: str, pipeline: asyncio.Task[None], sender: asyncio.Task[None]) -> None:
        fatal = self._fatal is not None and reason == self._fatal.code
        ending = self.wire.refusal(self._fatal) if fatal and self._fatal is not None else self.wire.ending(reason)
        assert self.output is not None
        if reason == "disconnected":
            self.output.close()
        if reason == "shutdown":
            # In-flight turns get the grace period to finish (their audio
            # included); the client's audio meanwhile is dropped quietly.
            self._draining = True
            self._end_input()
            hurry = asyncio.ensure_future(self.server.hurried.wait())
            try:  # the grace ends early when a second signal hurries the shutdown
                await asyncio.wait({pipeline, hurry}, timeout=self.server.shutdown_grace_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                hurry.cancel()
        if ending.cancel_turns:
            self._cancel_turns(reason.replace("_", " "))
        self._end_input()
        if not pipeline.done():
            done, _ = await asyncio.wait({pipeline}, timeout=SETTLE_TIMEOUT_S)
            if not done:
                log.warning("session %s: pipeline did not wind down in %.0f s; cancelling it", self.id, SETTLE_TIMEOUT_S)
                pipeline.cancel()
                with contextlib.suppress(BaseException):
                    await pipeline
        await self._close_with(ending, sender)
        turns = self.session.report.closed if self.session is not None else 0
        log.info("session %s closed (%s) after %d turn(s)", self.id, reason, turns)

    async def _close_with(self, ending: Ending, sender: asyncio.Task[None] | None = None) -> None:
        """Send the ending's last event (after what the send loop holds, if it runs), then close."""
        final = self.wire.final(ending, now())
        if self.output is not None and sender is not None and not sender.done():
            await self.output.finish(sender, final, CLOSE_TIMEOUT_S)
        elif final is not None and ending.error is not None:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(self.wire.encode(final))
        if ending.closes:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.close(ending.close_code, ending.close_reason)

    def _cancel_turns(self, reason: str) -> None:
        for turn_id in self.wire.open_turns:
            self.session.cancel_turn(turn_id, reason)

    # ---- input ----------------------------------------------------------

    async def _frames(self) -> AsyncIterator[AudioFrame]:
        while True:
            item = await self._input.get()
            if item is _END_OF_INPUT:
                return
            yield item

    def _end_input(self) -> None:
        """No more audio: the last partial frame is padded and the source ends."""
        if self._input_closed:
            return
        self._input_closed = True
        if self._resampler is not None:
            self._push(self._resampler.flush(), now())
        for frame in self._framer.end(now()):
            self._input.put_nowait(frame)
        self._input.put_nowait(_END_OF_INPUT)

    def _on_audio(self, data: bytes) -> None:
        assert self._start is not None and self._resampler is not None
        if self._input_closed and self._draining:
            return
        self.wire.check_audio(data, self._input_closed)
        if not data:
            return
        arrived = now()
        if self._audio_limit is None:  # the first audio: session.start has said its rate
            server = self.config.server
            self._audio_limit = audio_bucket(server.max_input_rate, server.max_message_bytes, self._start.input_rate)
        if not self._audio_limit.take(len(data) / 2 / self._start.input_rate, arrived):
            raise input_too_fast()
        pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)
        self._push(self._resampler.process(pcm), arrived)

    def _push(self, pcm: np.ndarray, arrived: float) -> None:
        for frame in self._framer.push(pcm, arrived):
            self._input.put_nowait(frame)

    async def _receive(self) -> None:
        idle = self.config.server.idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(None if self._input_closed else idle):
                    message = await self.ws.recv()
            except TimeoutError:
                self.end("idle_timeout")
                return
            except ConnectionClosed:
                self.end("disconnected")
                return
            try:
                if not self._message_limit.take(1, now()):
                    raise messages_too_fast(self.config.server.max_messages_per_s, self.config.server.message_burst)
                if isinstance(message, bytes):
                    self._on_audio(message)
                else:
                    self._on_text(message)
            except ProtocolError as exc:
                if exc.fatal:
                    self._fatal = self._fatal or exc
                    self.end(exc.code)
                    return
                self._send(self.wire.error(exc.code, exc.message, fatal=False, at=now()))
            # Fairness: a connection whose messages are already buffered would
            # otherwise run this loop without ever giving way (a flood of tiny
            # frames held /healthz up to 4.4 s); one message, then the others' turn.
            await asyncio.sleep(0)

    def _on_text(self, text: str) -> None:
        match self.wire.parse(text):
            case PlaybackPosition(turn_id=turn_id, samples=samples):
                assert self.output is not None
                self.output.report_position(turn_id, samples)
            case PlaybackHeard(turn_id=turn_id, voice_to_voice_ms=heard):
                self.server.telemetry.client_voice_to_voice.observe(heard / 1000)
                log.info("session %s turn %d: voice to voice as the client heard it: %.0f ms", self.id, turn_id, heard)
            case InputEnd():
                self._end_input()
            case SessionEnd():
                self.end("session_end")

    # ---- events out -----------------------------------------------------

    def _send(self, message: dict[str, Any] | None) -> None:
        if message is not None:
            assert self.output is not None
            self.output.send_event(message)

    def _on_event(self, event: Event) -> None:
        """Bus observer: the session's events, as the wire says them (must be quick)."""
        self._send(self.wire.on_event(event))

    def _on_turn_closed(self, record: Any) -> None:
        """Report listener: a closed turn's metrics."""
        self._send(self.wire.turn_metrics(record.turn_id, self.session.report.turn_json(record)))


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


class _HTTPConnection(ServerConnection):
    """A websockets connection that hands its parser the request head alone.

    The websockets server reads the request head, then parses what follows
    as websocket frames even before it has answered: a second, pipelined
    request or a request body became a bogus frame, the parser ended the
    stream, and answering the first request then failed an assertion inside
    the library (a traceback per request). Here the head is cut at its blank
    line; anything after it before the answer (or a head announcing a body)
    gets a plain 400, and the connection closes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head: bytearray | None = bytearray()  # None: the head is complete

    def data_received(self, data: bytes) -> None:
        if self.protocol.state is not State.CONNECTING:
            super().data_received(data)
            return
        if self._head is None:  # more bytes after the head, before the answer
            self._bad_request("one request per connection, without a body")
            return
        start = len(self._head)
        self._head += data
        end = self._head.find(b"\r\n\r\n", max(0, start - 3))
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self._head = None  # let the library refuse it with its own limits
            super().data_received(data)
            return
        head, extra = bytes(self._head[: end + 4]), len(self._head) > end + 4
        self._head = None
        if extra or _announces_body(head):
            self._bad_request("one request per connection, without a body")
            return
        super().data_received(data[: end + 4 - start])

    def _bad_request(self, why: str) -> None:
        if self.transport.is_closing():
            return
        log.info("HTTP request from %s refused: %s", _peer(self), why)
        response = _response(http.HTTPStatus.BAD_REQUEST, f"bad request: {why}\n".encode())
        response.headers["Server"] = "voice-assistant"
        self.transport.write(response.serialize())
        self.transport.close()


def _announces_body(head: bytes) -> bool:
    """A request head with a body to follow (Content-Length other than 0, or Transfer-Encoding)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


class Server:
    """The websocket endpoint and the static browser client on one port.

    Usable in-process (tests, benchmarks)::

        async with Server(models, config, port=0) as server:
            ...  # server.url, server.ws_url

    ``token``: None takes ``VOICE_ASSISTANT_TOKEN`` or ``server.auth_token``;
    "" turns auth off whatever they say.
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
        self.shutdown_grace_s = s.shutdown_grace_s
        self._sock = sock
        self._ws: WSServer | None = None
        self._connections: set[_Connection] = set()
        self._started_at = time.monotonic()
        self.hurried = asyncio.Event()  # a second signal: in-flight turns get no more grace
        from ..telemetry import Telemetry

        self.telemetry = Telemetry()
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
            create_connection=_HTTPConnection,
            max_size=s.max_message_bytes,
            ping_interval=s.ping_interval_s,
            ping_timeout=s.ping_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            server_header="voice-assistant",
            select_subprotocol=realtime.select_subprotocol,
            **where,
        )
        self.port = self._ws.sockets[0].getsockname()[1]

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop listening, end every session (in-flight turns get ``grace``), close."""
        if self._ws is None:
            return
        if grace is not None:
            self.shutdown_grace_s = grace
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

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://{_url_host(self.host)}:{self.port}{WS_PATH}"

    # ---- connections ------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        connection = (realtime.RealtimeConnection if realtime.is_realtime(ws.request.path) else _Connection)(self, ws)
        if len(self._connections) >= self.config.server.max_sessions:
            log.info("connection from %s refused: %d sessions open", connection.peer, len(self._connections))
            with contextlib.suppress(Exception):
                await connection._refuse(too_many_sessions(self.config.server.max_sessions))
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
            log.error("HTTP request from %s: internal error: %s: %s", _peer(ws), type(exc).__name__, exc)
            log.debug("traceback", exc_info=True)
            return _response(http.HTTPStatus.INTERNAL_SERVER_ERROR, b"internal server error\n")

    def _answer(self, ws: ServerConnection, request: Request) -> Response | None:
        if len(request.path) > MAX_PATH_CHARS:
            log.info("HTTP request from %s refused: a path of %d characters", _peer(ws), len(request.path))
            return _response(http.HTTPStatus.REQUEST_URI_TOO_LONG, b"request path too long\n")
        parts = urlsplit(request.path)
        websocket = parts.path in (WS_PATH, realtime.REALTIME_PATH)
        if request.method not in ALLOWED_METHODS or (request.method != "GET" and websocket):
            allowed = "GET" if websocket else ", ".join(ALLOWED_METHODS)
            response = _response(http.HTTPStatus.METHOD_NOT_ALLOWED, f"method not allowed; use {allowed}\n".encode())
            response.headers["Allow"] = allowed
            return response
        if websocket:
            return self._check_handshake(ws, request, parts.query)
        response = self._page(parts.path)
        if request.method == "HEAD":  # the GET's headers, Content-Length included, and no body
            return Response(response.status_code, response.reason_phrase, response.headers, b"")
        return response

    def _page(self, path: str) -> Response:
        """What a GET of ``path`` (not a websocket) answers."""
        if path == "/metrics":
            body, content_type = self.telemetry.exposition()
            return _response(http.HTTPStatus.OK, body, content_type)
        if path == "/healthz":
            serving = self._ws is not None and self._ws.is_serving()
            engine = self.models.llm.health() if self.models is not None else {"state": "none"}
            body = {
                # up: the process answers; ready: it can hold a conversation
                # (models loaded, which a Server implies, and the engine answering)
                "status": "ok" if serving else "stopping",
                "ready": serving and engine["state"] == "up",
                "protocol": PROTOCOL_VERSION,
                "sessions": len(self._connections),
                "max_sessions": self.config.server.max_sessions,
                "auth": self.token is not None,
                "uptime_s": round(time.monotonic() - self._started_at, 1),
                "engine": engine,
            }
            return _response(http.HTTPStatus.OK, json.dumps(body).encode(), "application/json")
        return self._static(path)

    def _check_handshake(self, ws: ServerConnection, request: Request, query: str) -> Response | None:
        if self.token is not None:
            given = None
            authorization = request.headers.get("Authorization", "")
            if authorization.lower().startswith("bearer "):
                given = authorization[7:].strip()
            else:
                given = (parse_qs(query).get("token") or [None])[0] or realtime.subprotocol_key(request.headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                log.info("handshake from %s refused: %s token", _peer(ws), "wrong" if given else "no")
                response = ws.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin, request.headers.get("Host", "")):
            log.info("handshake from %s refused: origin %r not allowed", _peer(ws), origin)
            return ws.respond(http.HTTPStatus.FORBIDDEN, f"origin {origin} is not allowed\n")
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        """An explicit allow-list, or else only the page this server serves itself."""
        normalized = origin.rstrip("/").lower()
        if self.allowed_origins:
            return "*" in self.allowed_origins or normalized in self.allowed_origins
        parts = urlsplit(normalized)
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host.lower()

    def _static(self, path: str) -> Response:
        """A file of the browser client; nothing outside its folder, ever."""
        relative = unquote(path)
        if relative in ("", "/"):
            relative = "/index.html"
        segments = relative.lstrip("/").split("/")
        bad = "\x00" in relative or "\\" in relative or any(s in ("", ".", "..") or s.startswith(".") for s in segments)
        try:  # a name too long for the file system is just not there (no OSError traceback)
            target = None if bad else (self.web_dir.joinpath(*segments)).resolve()
            found = target is not None and target.is_relative_to(self.web_dir) and target.is_file()
        except (OSError, ValueError):
            found = False
        if not found or target is None:
            if relative == "/index.html":
                return _response(http.HTTPStatus.NOT_FOUND, b"the browser client is not installed (assistant/server/web)\n")
            return _response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        try:
            body = target.read_bytes()
        except OSError:
            return _response(http.HTTPStatus.NOT_FOUND, b"not found\n")
        kind = CONTENT_TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return _response(http.HTTPStatus.OK, body, kind)


def _response(status: http.HTTPStatus, body: bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    headers = Headers(
        [
            ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# --------------------------------------------------------------------------
# voice-assistant serve
# --------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    """Bind first, before minutes of model loading, so a busy port fails at once."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def serve(args: argparse.Namespace, config: Config) -> int:
    """``voice-assistant serve``: load the models, serve until SIGTERM/SIGINT.

    The first signal shuts down gracefully; a second one hurries it (turns
    cancelled, sessions still told). Whatever happens, the vLLM engine's
    processes end with this one: a signal outside the event loop (model
    loading, engine shutdown) stops them and exits at once.
    """
    from ..models import load_models, stop_child_processes

    host = args.host if args.host is not None else config.server.host
    port = args.port if args.port is not None else config.server.port
    sock = _listen(host, port)
    _exit_on_signal()
    try:
        models = load_models(config)
    except BaseException:
        sock.close()
        stop_child_processes()
        raise
    try:
        code = asyncio.run(_serve(args, config, models, host, sock))
    finally:
        _exit_on_signal()  # asyncio.run put back the default handlers
        started = time.monotonic()
        models.close()
        stopped = stop_child_processes()
        log.info("engine stopped in %.1f s%s", time.monotonic() - started,
                 f" ({stopped} process(es) left over were stopped)" if stopped else "")
    # Sessions are closed and the engine is stopped: nothing is left to
    # save. Interpreter teardown of torch, CTranslate2 and vLLM's modules
    # took another 3.4 s, which a supervisor waiting on SIGTERM would see
    # as a hung process.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_on_signal() -> None:
    """Outside the event loop, SIGTERM/SIGINT stop the engine's processes and exit now (128 + signal)."""
    from ..models import stop_child_processes

    def handler(signum: int, _frame: Any) -> None:
        print(f"signal {signum}: stopping the engine and exiting", file=sys.stderr, flush=True)
        stop_child_processes(timeout=1.0)
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


async def _serve(args: argparse.Namespace, config: Config, models: Any, host: str, sock: socket.socket) -> int:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    say("warming up...")
    await models.warm_up()
    say(f"warm in {time.monotonic() - started:.1f} s")
    engine = models.llm.health()
    if engine["state"] != "up":
        say(f"note: the language model server at {engine['url']} does not answer ({engine['error']}); "
            "turns get an apology until it does (retrying in the background)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    server = Server(models, config, host=host, token=args.token, sock=sock)

    def on_signal() -> None:
        if stop.is_set():  # the second one: no more grace, but the sessions are still told
            if not server.hurried.is_set():
                say("second signal: cancelling in-flight turns...")
            server.hurry()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):  # kept until the loop ends: a second signal must not kill
        loop.add_signal_handler(sig, on_signal)
    await server.start()
    if not (server.web_dir / "index.html").is_file():
        say(f"note: no browser client in {server.web_dir}; the websocket endpoint works without it")
    print(f"serving on {server.url}  (websocket {server.ws_url})", flush=True)
    if server.token is not None:
        say("auth: clients need the token (Authorization: Bearer TOKEN, or ?token=TOKEN)")
    if host in ("", "0.0.0.0", "::"):
        say(f"listening on all interfaces, port {server.port}")
    await stop.wait()
    say(f"shutting down ({server.sessions} session(s) open)...")
    await server.shutdown()
    say("stopped")
    return 0


# OpenAI's Realtime events on /v1/realtime: a connection that builds on
# _Connection, so it is imported once this module is complete.
from . import realtime  # noqa: E402
