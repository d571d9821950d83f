"""``voice-assistant client``: talk to a remote ``serve`` through a file.

:class:`RemoteSession` speaks the websocket protocol (docs/protocol.md)
from the client side: it streams PCM at real-time pace, collects every
event, and places the reply audio on the session's own timeline (where a
listener would have heard it). The CLI, the tests and
``scripts/bench_server.py`` all use it, so they exercise the same code a
remote program would. Message names and encoding are
:mod:`assistant.server.v1.codec`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from pipeline.frames import now

from .errors import InputError, UserError
from .server.face import decode, encode
from .server.v1.codec import MessageType, session_start

TOKEN_ENV = "VOICE_ASSISTANT_TOKEN"
FRAME_MS = 20


class ClientError(UserError):
    """The server cannot be reached, refused the session, or dropped it."""

    exit_code = 4


def websocket_url(url: str) -> str:
    """``http://host:port/`` or ``ws://host:port`` -> ``ws://host:port/ws``."""
    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise InputError(f"--url: {url!r} is not a ws://, wss://, http:// or https:// URL")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


@dataclass
class AudioSegment:
    """Reply audio between one response.audio.start and its .end."""

    turn_id: int
    position: int  # where it starts on the session timeline, in samples at the output rate
    chunks: list[bytes] = field(default_factory=list)
    ended: bool = False

    @property
    def samples(self) -> int:
        return sum(len(c) for c in self.chunks) // 2


class RemoteSession:
    """One protocol session seen from the client.

    ``events`` holds every JSON event with the local time it arrived;
    ``metrics`` the ``turn.metrics`` of each turn; ``segments`` the reply
    audio. :meth:`stream` keeps one real-time clock for the whole session,
    so calls one after another stream a continuous signal.
    """

    def __init__(self, ws: ClientConnection, ready: dict[str, Any], on_event: Callable[[dict[str, Any]], None] | None) -> None:
        self.ws = ws
        self.ready = ready
        self.session_id: str = ready["session_id"]
        self.input_rate: int = ready["input_rate"]
        self.output_rate: int = ready["output_rate"]
        self.on_event = on_event
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.metrics: dict[int, dict[str, Any]] = {}
        self.segments: list[AudioSegment] = []
        self.binary_outside_segment = 0
        self.ended_reason: str | None = None
        self.fatal_error: dict[str, Any] | None = None
        self.t0 = now()  # the session timeline's origin: when audio streaming may begin
        self._sent = 0  # input samples streamed so far
        self._cursor = 0  # end of the reply audio timeline, in output samples
        self._changed = asyncio.Event()
        self._receiver = asyncio.create_task(self._receive(), name=f"client:{self.session_id}")

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        token: str | None = None,
        input_rate: int = 16000,
        output_rate: int = 22050,
        client: str = "voice-assistant client",
        on_event: Callable[[dict[str, Any]], None] | None = None,
        origin: str | None = None,
        open_timeout: float = 10.0,
    ) -> RemoteSession:
        """Connect, send session.start, wait for session.ready."""
        ws_url = websocket_url(url)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            ws = await connect(
                ws_url, additional_headers=headers, origin=origin, open_timeout=open_timeout,  # type: ignore[arg-type]
                max_size=None, close_timeout=2,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            why = {401: "missing or wrong token (--token or VOICE_ASSISTANT_TOKEN)", 403: "origin not allowed"}.get(
                status, exc.response.body.decode("utf-8", "replace").strip()[:100] if exc.response.body else ""
            )
            raise ClientError(f"cannot connect to {ws_url}: HTTP {status} {why}".rstrip()) from None
        except InvalidURI:
            raise InputError(f"--url: {url!r} is not a valid websocket URL") from None
        except (InvalidHandshake, TimeoutError) as exc:
            raise ClientError(f"cannot connect to {ws_url}: {exc or 'timed out'}") from None
        except OSError as exc:
            why = "connection refused" if isinstance(exc, ConnectionRefusedError) else (exc.strerror or str(exc))
            raise ClientError(f"cannot connect to {ws_url}: {why}") from None
        try:
            # A server with no room refuses at once, maybe before session.start
            # arrives: the send then fails, and its error is still read below.
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode(session_start(input_rate, output_rate, client)))
            async with asyncio.timeout(open_timeout):
                while True:
                    message = await ws.recv()
                    if not isinstance(message, str):
                        continue
                    event = decode(message)
                    if event.get("type") == MessageType.SESSION_READY:
                        return cls(ws, event, on_event)
                    if event.get("type") == MessageType.ERROR:
                        raise ClientError(f"server refused the session: {event.get('message')} ({event.get('code')})")
        except ConnectionClosed as exc:
            raise ClientError(f"server closed the connection before the session started (code {exc.code})") from None
        except TimeoutError:
            await ws.close()
            raise ClientError(f"no session.ready from {ws_url} within {open_timeout:.0f} s") from None
        except ClientError:
            await ws.close()
            raise

    # ---- receiving ----------------------------------------------------

    async def _receive(self) -> None:
        current: AudioSegment | None = None
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                if isinstance(message, bytes):
                    if current is None or current.ended:
                        self.binary_outside_segment += 1
                    else:
                        current.chunks.append(message)
                    continue
                event = decode(message)
                self.events.append((now(), event))
                kind = event.get("type")
                if kind == MessageType.RESPONSE_AUDIO_START:
                    heard_at = int((now() - self.t0) * self.output_rate)
                    current = AudioSegment(event["turn_id"], max(self._cursor, heard_at))
                    self.segments.append(current)
                elif kind == MessageType.RESPONSE_AUDIO_END and current is not None:
                    current.ended = True
                    self._cursor = current.position + current.samples
                elif kind == MessageType.RESPONSE_INTERRUPTED and current is not None:
                    self._cursor = current.position + current.samples
                elif kind == MessageType.TURN_METRICS:
                    self.metrics[event["turn_id"]] = event
                elif kind == MessageType.SESSION_ENDED:
                    self.ended_reason = event.get("reason")
                elif kind == MessageType.ERROR and event.get("fatal"):
                    self.fatal_error = event
                if self.on_event is not None:
                    self.on_event(event)
                self._changed.set()
        self._changed.set()

    @property
    def closed(self) -> bool:
        return self._receiver.done()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e.get("type") == kind]

    async def wait_for(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``condition()`` holds (checked after each message) or the connection closes."""
        async with asyncio.timeout(timeout):
            while not condition():
                if self.closed:
                    return condition()
                self._changed.clear()
                await self._changed.wait()
        return True

    # ---- sending -------------------------------------------------------

    async def stream(self, pcm: np.ndarray, realtime: bool = True) -> None:
        """Send PCM16 at ``input_rate`` in 20 ms frames, at real-time pace by default."""
        size = self.input_rate * FRAME_MS // 1000
        data = np.asarray(pcm, dtype=np.int16)
        for offset in range(0, len(data), size):
            chunk = data[offset : offset + size]
            if realtime:
                delay = self.t0 + (self._sent + len(chunk)) / self.input_rate - now()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.ws.send(chunk.astype("<i2").tobytes())
            self._sent += len(chunk)

    async def stream_silence_until(self, condition: Callable[[], bool], max_s: float) -> bool:
        """Keep the microphone 'open' (silence at real-time pace) until ``condition()`` or ``max_s``."""
        frame = np.zeros(self.input_rate * FRAME_MS // 1000, np.int16)
        deadline = now() + max_s
        while not condition() and now() < deadline and not self.closed:
            await self.stream(frame)
        return condition()

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send(encode(message))

    async def end_input(self) -> None:
        await self.send_json({"type": MessageType.INPUT_END})

    async def end_session(self) -> None:
        await self.send_json({"type": MessageType.SESSION_END})

    async def wait_closed(self, timeout: float) -> None:
        """Wait for the server to end the session and close."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._receiver)

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._receiver), 3)

    def audio(self, min_samples: int = 0) -> np.ndarray:
        """The reply audio placed on the session timeline (int16 at ``output_rate``)."""
        length = max([min_samples] + [s.position + s.samples for s in self.segments])
        out = np.zeros(length, np.int16)
        for segment in self.segments:
            pcm = np.frombuffer(b"".join(segment.chunks), dtype="<i2")
            out[segment.position : segment.position + len(pcm)] = pcm
        return out


# --------------------------------------------------------------------------
# voice-assistant client
# --------------------------------------------------------------------------


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _printer(out: Any = sys.stdout) -> Callable[[dict[str, Any]], None]:
    """Conversation lines as the events arrive."""

    def show(event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == MessageType.TRANSCRIPT_FINAL:
            print(f"  you: {event['text']}", file=out, flush=True)
        elif kind == MessageType.RESPONSE_TEXT_DONE:
            print(f"  assistant: {event['text']}", file=out, flush=True)
        elif kind == MessageType.RESPONSE_INTERRUPTED:
            print(f"  (interrupted after: {event.get('heard_text', '')!r})", file=out, flush=True)
        elif kind == MessageType.TURN_METRICS:
            v2v = event.get("voice_to_voice_ms")
            if v2v is not None:
                print(f"  voice-to-voice: {v2v:.0f} ms", file=out, flush=True)
            if event.get("status") == "cancelled" and event.get("transcript"):
                print(f"  (turn cancelled: {event.get('cancel_reason')})", file=out, flush=True)
        elif kind == MessageType.ERROR and not event.get("fatal"):
            _say(f"  server error: {event.get('code')}: {event.get('message')}")

    return show


def client(args: argparse.Namespace, max_input_seconds: float) -> int:
    """Stream ``--input`` to the server at real-time pace; save the reply audio."""
    from audio.files import decode_file, write_wav

    url = websocket_url(args.url)
    if args.output and not Path(args.output).parent.exists():
        raise InputError(f"--output: folder {Path(args.output).parent} does not exist")
    rate = 16000
    pcm = decode_file(args.input, rate, max_input_seconds)
    _say(f"input: {args.input}, {len(pcm) / rate:.1f} s")
    token = args.token or os.environ.get(TOKEN_ENV) or None

    async def talk() -> RemoteSession:
        session = await RemoteSession.open(url, token=token, input_rate=rate, on_event=_printer())
        _say(f"session {session.session_id} on {url}: streaming at real-time pace...")
        try:
            await session.stream(pcm)
            await session.end_input()
        except ConnectionClosed:
            pass
        # The server ends the session once every turn is answered.
        try:
            await session.wait_closed(timeout=float(getattr(args, "timeout", 120)))
        except TimeoutError:
            await session.close()
            raise ClientError(f"the server did not finish within {getattr(args, 'timeout', 120):.0f} s") from None
        return session

    session = asyncio.run(talk())
    if args.output:
        write_wav(args.output, session.audio(len(pcm) * session.output_rate // rate), session.output_rate)
        _say(f"wrote {args.output}")
    turns = [m for m in session.metrics.values() if m.get("transcript")]
    if session.fatal_error is not None:
        raise ClientError(f"server closed the session: {session.fatal_error.get('message')} ({session.fatal_error.get('code')})")
    if session.ended_reason is None:
        raise ClientError(f"the connection was closed (code {session.close_code}) before the session ended")
    _say(f"done: {len(turns)} turn(s), session ended ({session.ended_reason})")
    return 0
