"""One websocket connection: one session, spoken to through its face.

:class:`Connection` is the I/O half of every websocket face (the
``websockets`` library's split of protocol state from I/O is the model):
it reads the socket, enforces the limits (message rate, input rate, idle
timeout), opens the :class:`~assistant.session.Session`, sends what the
face builds through the paced output (:mod:`.output`), and ends the
connection the way the face says each ending closes. It never reads or
builds a message itself. The face (:class:`~assistant.server.face.Face`) is
given at construction; the hooks it implements are the only thing that
differs between ``/ws`` and ``/v1/realtime``, and the face reaches back
only through :class:`~assistant.server.face.Link` (:meth:`Connection.feed`,
:meth:`Connection.end`, :meth:`Connection.heard`).

Everything a client sends is untrusted. A client's mistake is an ``error``
message, or for a fatal one the close code its protocol names; a bug while
serving one session closes that session with 1011 and nothing else; no
exception ever reaches the websockets library's handler (which would log a
traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final, Protocol

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from pipeline.frames import Event, now

from ..components import budgets_of
from ..config import Config
from ..session import LIVE_TURNS_KEPT, Session
from ..telemetry import Telemetry
from .face import Ending, Face, Message, ProtocolError, SessionStart, input_too_fast, messages_too_fast, start_timeout
from .http import peer
from .limits import TokenBucket, audio_bucket
from .output import WebSocketOutput

log = logging.getLogger("assistant.server")

START_TIMEOUT_S: Final = 10.0  # the first message must be session.start by then
CLOSE_TIMEOUT_S: Final = 2.0  # closing handshake
SETTLE_TIMEOUT_S: Final = 2.0  # a cancelled session's pipeline gets this long to wind down


class Host(Protocol):
    """What a connection needs of the server that accepted it."""

    config: Config
    models: Any
    telemetry: Telemetry
    hurried: asyncio.Event  # a second signal: in-flight turns get no more grace
    shutdown_grace_s: float


class Connection:
    """One websocket connection: one Session, spoken to through ``face``."""

    def __init__(self, server: Host, ws: ServerConnection, face: Face) -> None:
        self.server = server
        self.ws = ws
        self.face = face
        self.config: Config = server.config
        self.peer = peer(ws)
        self.session: Session | None = None
        self.output: WebSocketOutput | None = None
        self._ending: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task[Any]] = []
        self._draining = False  # shutting down: audio is no longer listened to
        self._audio_limit: TokenBucket | None = None  # made at the first audio, at the session's input rate
        self._message_limit = TokenBucket(self.config.server.max_messages_per_s, self.config.server.message_burst)
        self._start: SessionStart | None = None
        self._fatal: ProtocolError | None = None  # the client's fatal error, when that is how it ends

    @property
    def id(self) -> str:
        return self.session.id if self.session is not None else f"pending@{self.peer}"

    # ---- Link: what the face may ask -----------------------------------

    def end(self, reason: str) -> None:
        """Ask the connection to end (first reason wins)."""
        if not self._ending.done():
            self._ending.set_result(reason)

    def feed(self, pcm16: bytes) -> None:
        """The client's audio: the input-rate check, then the session (nothing while draining)."""
        assert self._start is not None and self.session is not None
        if self._draining or not pcm16:
            return
        arrived = now()
        if self._audio_limit is None:  # the first audio: the session's rate is known
            server = self.config.server
            self._audio_limit = audio_bucket(server.max_input_rate, server.max_message_bytes, self._start.input_rate)
        if not self._audio_limit.take(len(pcm16) / 2 / self._start.input_rate, arrived):
            raise input_too_fast()
        self.session.feed(np.frombuffer(pcm16, dtype="<i2").astype(np.int16), arrived)

    def heard(self, turn_id: int, voice_to_voice_ms: float) -> None:
        self.server.telemetry.client_voice_to_voice.observe(voice_to_voice_ms / 1000)
        log.info("session %s turn %d: voice to voice as the client heard it: %.0f ms",
                 self.id, turn_id, voice_to_voice_ms)

    # ---- lifecycle ----------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        except Exception as exc:  # a bug: this session only
            log.error("session %s: internal error: %s: %s", self.id, type(exc).__name__, exc)
            log.debug("session %s: traceback", self.id, exc_info=True)
            with contextlib.suppress(Exception):
                await self._close_with(self.face.ending("internal"))
        finally:
            tasks = list(self._tasks)
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
        self.output = WebSocketOutput(
            self.ws, self.face, config.audio.output_rate, start.output_rate, config.server.jitter_buffer_ms / 1000,
            self.face.origin,
        )
        session = self.session = Session(
            self.server.models, config, self.output, keep_turns=LIVE_TURNS_KEPT, input_rate=start.input_rate
        )
        self.face.origin = self.output.origin = session.origin
        self.face.bind(session, self)
        session.bus.subscribe(self._on_event)
        session.report.listeners.append(self._on_turn_closed)
        observed = self.server.telemetry.observe(session)
        try:
            await self._serve_session(session, start, config)
        finally:
            observed()

    async def _serve_session(self, session: Session, start: SessionStart, config: Config) -> None:
        assert self.output is not None
        sender = self._spawn(self.output.run(), "send")
        budgets_ms = {b.stage: b.ms for b in budgets_of(config)}
        self.output.send_event(self.face.ready(session.id, start, config.audio.frame_ms, budgets_ms))
        log.info("session %s opened from %s (%s), audio in %d Hz, out %d Hz",
                 session.id, self.peer, start.client or "client", start.input_rate, start.output_rate)
        pipeline = self._spawn(session.run(), "session")
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
        if not task.get_name().endswith(":session"):  # the pipeline's own failure is logged in _serve_session
            log.error("session %s: internal error in %s: %s: %s", self.id, task.get_name(), type(exc).__name__, exc)
            log.debug("session %s: traceback", self.id, exc_info=exc)
        self.end("internal")

    async def _read_start(self) -> SessionStart | None:
        """The session's rates: from the client's first message, where the face waits for one
        (refusing anything else), else the face's own; None when it never starts."""
        audio = self.config.audio
        if not self.face.wants_start:
            return self.face.parse_start(None, audio.input_rate, audio.output_rate)
        receive = asyncio.ensure_future(self.ws.recv())
        try:
            done, _ = await asyncio.wait({receive, self._ending}, timeout=START_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receive.done():
                receive.cancel()
        if self._ending.done():  # shutdown before the session started
            await self._close_with(self.face.ending(self._ending.result()))
            return None
        if receive not in done:
            await self.refuse(start_timeout(START_TIMEOUT_S))
            return None
        try:
            message = receive.result()
        except ConnectionClosed:
            return None
        try:
            return self.face.parse_start(message, audio.input_rate, audio.output_rate)
        except ProtocolError as exc:
            await self.refuse(exc)
            return None

    async def refuse(self, error: ProtocolError) -> None:
        """Close a connection whose session never started: the fatal error, then its close code."""
        log.info("connection from %s refused: %s", self.peer, error.message)
        await self._close_with(self.face.refusal(error))

    async def _finish(self, reason: str, pipeline: asyncio.Task[None], sender: asyncio.Task[None]) -> None:
        assert self.output is not None and self.session is not None
        fatal = self._fatal is not None and reason == self._fatal.code
        ending = self.face.refusal(self._fatal) if fatal and self._fatal is not None else self.face.ending(reason)
        if reason == "disconnected":
            self.output.close()
        if reason == "shutdown":
            # In-flight turns get the grace period to finish (their audio
            # included); the client's audio meanwhile is dropped quietly.
            self._draining = True
            self.session.end_input()
            hurry = asyncio.ensure_future(self.server.hurried.wait())
            try:  # the grace ends early when a second signal hurries the shutdown
                await asyncio.wait({pipeline, hurry}, timeout=self.server.shutdown_grace_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                hurry.cancel()
        if ending.cancel_turns:
            for turn_id in self.face.open_turns:
                self.session.cancel_turn(turn_id, reason.replace("_", " "))
        self.session.end_input()
        if not pipeline.done():
            done, _ = await asyncio.wait({pipeline}, timeout=SETTLE_TIMEOUT_S)
            if not done:
                log.warning("session %s: pipeline did not wind down in %.0f s; cancelling it", self.id, SETTLE_TIMEOUT_S)
                pipeline.cancel()
                with contextlib.suppress(BaseException):
                    await pipeline
        await self._close_with(ending, sender)
        log.info("session %s closed (%s) after %d turn(s)", self.id, reason, self.session.report.closed)

    async def _close_with(self, ending: Ending, sender: asyncio.Task[None] | None = None) -> None:
        """Send the ending's last event (after what the send loop holds, if it runs), then close."""
        final = self.face.final(ending, now())
        if self.output is not None and sender is not None and not sender.done():
            await self.output.finish(sender, final, CLOSE_TIMEOUT_S)
        elif final is not None and ending.error is not None:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(self.face.encode(final))
        if ending.closes:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.close(ending.close_code, ending.close_reason)

    # ---- what the client sends -------------------------------------------

    async def _receive(self) -> None:
        assert self.session is not None
        idle = self.config.server.idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(None if self.session.input_ended else idle):
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
                self._send_all(self.face.receive(message))
            except ProtocolError as exc:
                if exc.fatal:
                    self._fatal = self._fatal or exc
                    self.end(exc.code)
                    return
                self._send_all([self.face.error(exc.code, exc.message, fatal=False, at=now())])
            # Fairness: a connection whose messages are already buffered would
            # otherwise run this loop without ever giving way (a flood of tiny
            # frames held /healthz up to 4.4 s); one message, then the others' turn.
            await asyncio.sleep(0)

    # ---- what the session does -------------------------------------------

    def _send_all(self, messages: list[Message]) -> None:
        assert self.output is not None
        for message in messages:
            self.output.send_event(message)

    def _on_event(self, event: Event) -> None:
        """Bus observer: the session's events, as the face says them (must be quick)."""
        self._send_all(self.face.on_event(event))

    def _on_turn_closed(self, record: Any) -> None:
        """Report listener: a closed turn, as the face says it (v1's turn.metrics)."""
        assert self.session is not None
        self._send_all(self.face.turn_closed(record.turn_id, self.session.report.turn_json(record)))
