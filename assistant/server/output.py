"""Reply audio and events to one websocket, paced for real-time playback.

:class:`WebSocketOutput` is the :class:`pipeline.playback.AudioOutput` of a
websocket session: it resamples the reply to the client's rate and sends
each 20 ms frame ``server.jitter_buffer_ms`` before it is due to play, so a
client keeps a small buffer and a barge-in has little to throw away.

It paces; it does not speak the protocol: every message it sends (the
events the server hands it, the audio markers around each segment, the
audio frames themselves) is built by the connection's
:class:`~assistant.server.face.Face`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from audio.resample import Resampler
from pipeline.frames import Event, TurnCancelled, now

from .face import Face, Message

log = logging.getLogger("assistant.server")

OUT_FRAME_MS: Final = 20  # reply audio frame length


@dataclass(slots=True)
class _OutFrame:
    due: float  # when to send it: jitter_buffer ahead of when it plays
    turn_id: int
    data: bytes
    samples: int  # at the client's rate


@dataclass
class _TurnAudio:
    """One turn's reply audio on the connection's play clock."""

    turn_id: int
    resampler: Resampler
    pieces: list[tuple[float, int]] = field(default_factory=list)  # (plays at, samples at pipeline rate)
    written: int = 0  # pipeline-rate samples written
    sent_total: int = 0  # client-rate samples sent, all segments
    segment_sent: int = 0  # client-rate samples sent since the last response.audio.start
    queued: int = 0  # frames waiting in the lane
    open: bool = False  # response.audio.start sent, .end not yet
    closing: bool = False  # no more audio will come: send .end once the lane is dry
    cancelled: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    report: tuple[int, float] | None = None  # client's playback.position: (samples at client rate, when)
    frozen: tuple[int, float] | None = None  # what played() says after clear()


class WebSocketOutput:
    """:class:`pipeline.playback.AudioOutput` that streams to one websocket.

    Everything the connection sends goes through here, in one ordered
    stream: JSON events at once, reply audio at its due time. The pacing
    clock knows when each reply sample plays (``pieces``); a client's
    ``playback.position`` reports, when present, override it for
    :meth:`played`, so a barge-in cuts the history at what was heard.
    ``response.audio.start`` goes right before a segment's first frame and
    ``response.audio.end`` right after its last, both from the send loop,
    so no frame can fall outside them.
    """

    def __init__(
        self, ws: ServerConnection, wire: Face, sample_rate: int, client_rate: int, jitter_s: float,
        origin: float,
    ) -> None:
        self.wire = wire
        self.sample_rate = sample_rate  # what the pipeline writes (TTS rate)
        self.client_rate = client_rate
        self.origin = origin
        self._ws = ws
        self._jitter = jitter_s
        self._frame = max(1, client_rate * OUT_FRAME_MS // 1000)
        self._events: deque[str] = deque()
        self._audio: deque[_OutFrame] = deque()
        self._turns: dict[int, _TurnAudio] = {}
        self._play_end = 0.0  # when everything written so far has played
        self._wake = asyncio.Event()
        self._closed = False  # the connection is gone: drop everything
        self._stopping = False

    # ---- events -------------------------------------------------------

    def send_event(self, message: Message | None) -> None:
        """Queue an event; None (a marker the wire protocol does not say) is skipped."""
        if message is not None and not self._closed:
            self._events.append(self.wire.encode(message))
            self._wake.set()

    # ---- AudioOutput --------------------------------------------------

    def _turn(self, turn_id: int) -> _TurnAudio:
        turn = self._turns.get(turn_id)
        if turn is None:
            turn = self._turns[turn_id] = _TurnAudio(turn_id, Resampler(self.sample_rate, self.client_rate))
            if len(self._turns) > 32:  # long sessions: forget old turns
                for old in sorted(self._turns)[:-16]:
                    self._turns[old].ended.set()
                    del self._turns[old]
        return turn

    def write(self, turn_id: int, pcm: np.ndarray) -> tuple[float, int]:
        t = now()
        start = max(t, self._play_end)
        position = int(round((start - self.origin) * self.sample_rate))
        if self._closed:
            return start, position
        turn = self._turn(turn_id)
        if turn.ended.is_set() and not turn.open:  # audio after the segment ended: a new segment
            turn.ended.clear()
        turn.closing = turn.cancelled  # a cancelled turn's canned phrase closes itself
        turn.frozen = None
        turn.pieces.append((start, len(pcm)))
        turn.written += len(pcm)
        self._play_end = start + len(pcm) / self.sample_rate
        self._queue(turn, turn.resampler.process(pcm), start)
        return start, position

    def _queue(self, turn: _TurnAudio, out: np.ndarray, plays_at: float) -> None:
        data = out.astype("<i2", copy=False)
        for offset in range(0, len(data), self._frame):
            chunk = data[offset : offset + self._frame]
            due = plays_at + offset / self.client_rate - self._jitter
            self._audio.append(_OutFrame(due, turn.turn_id, chunk.tobytes(), len(chunk)))
            turn.queued += 1
        self._wake.set()

    def clear(self, turn_id: int) -> None:
        """Stop sending the turn's audio now; what was sent is all the client gets."""
        turn = self._turns.get(turn_id)
        if turn is None:
            return
        t = now()
        turn.frozen = (self._heard(turn, t), t)
        self._audio = deque(f for f in self._audio if f.turn_id != turn_id)
        turn.queued = 0
        turn.resampler.reset()
        turn.closing = True
        self._play_end = min(self._play_end, t)
        self._wake.set()

    def played(self, turn_id: int) -> tuple[int, float]:
        turn = self._turns.get(turn_id)
        t = now()
        if turn is None:
            return 0, t
        if turn.frozen is not None:
            return turn.frozen
        return self._heard(turn, t), t

    def _heard(self, turn: _TurnAudio, t: float) -> int:
        """Samples (pipeline rate) of the turn played by ``t``: the client's report, else the pacing clock."""
        if turn.report is not None:
            samples, at = turn.report
            client = min(samples + max(0.0, t - at) * self.client_rate, turn.sent_total)
            return min(turn.written, int(client * self.sample_rate / self.client_rate))
        return sum(min(n, max(0, int((t - start) * self.sample_rate))) for start, n in turn.pieces)

    def report_position(self, turn_id: int, samples: int) -> None:
        turn = self._turns.get(turn_id)
        if turn is not None and turn.frozen is None:
            turn.report = (samples, now())

    async def drain(self, turn_id: int) -> float:
        """Wait until the turn's last frame is sent and has played."""
        turn = self._turns.get(turn_id)
        if turn is None or self._closed:
            return now()
        tail = turn.resampler.flush()
        if len(tail):
            end = turn.pieces[-1][0] + turn.pieces[-1][1] / self.sample_rate if turn.pieces else now()
            self._queue(turn, tail, end - len(tail) / self.client_rate)
        turn.closing = True
        self._wake.set()
        await turn.ended.wait()
        end = max((start + n / self.sample_rate for start, n in turn.pieces), default=now())
        delay = end - now()
        if delay > 0 and not self._closed:
            await asyncio.sleep(delay)
        return end

    def observe(self, event: Event) -> None:
        """Bus observer (the session subscribes it): a cancelled turn's audio closes when it runs out."""
        if isinstance(event, TurnCancelled) and event.turn_id is not None:
            turn = self._turns.get(event.turn_id)
            if turn is not None:
                turn.cancelled = True
                turn.closing = True
                self._wake.set()

    # ---- the send loop -------------------------------------------------

    def _close_segments(self) -> None:
        for turn in self._turns.values():
            if turn.closing and turn.queued == 0 and not turn.ended.is_set():
                if turn.open:
                    turn.open = False
                    self.send_event(self.wire.audio_end(turn.turn_id, turn.segment_sent, now()))
                turn.ended.set()

    async def run(self) -> None:
        """Send events at once and audio frames when due, in one ordered stream."""
        try:
            while True:
                if self._events:
                    await self._ws.send(self._events.popleft())
                    continue
                self._close_segments()
                if self._events:
                    continue
                t = now()
                if self._audio and self._audio[0].due <= t:
                    frame = self._audio.popleft()
                    turn = self._turns.get(frame.turn_id)
                    if turn is None:
                        continue
                    turn.queued -= 1
                    if not turn.open:
                        turn.open = True
                        turn.segment_sent = 0
                        start = self.wire.audio_start(turn.turn_id, self.client_rate, t)
                        if start is not None:
                            await self._ws.send(self.wire.encode(start))
                    data = self.wire.audio(frame.data)
                    if data is not None:
                        await self._ws.send(data)
                    turn.segment_sent += frame.samples
                    turn.sent_total += frame.samples
                    continue
                if self._stopping and not self._audio:
                    return
                self._wake.clear()
                timeout = self._audio[0].due - t if self._audio else None
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        except ConnectionClosed:
            self.close()

    async def finish(self, sender: asyncio.Task[None], final: Message | None, timeout: float) -> None:
        """Drop unsent audio, close open segments, send ``final`` last, end the send loop."""
        self._audio.clear()
        for turn in self._turns.values():
            turn.queued = 0
            turn.closing = True
        self._close_segments()
        if final is not None:
            self.send_event(final)
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, ConnectionClosed):
            await asyncio.wait_for(asyncio.shield(sender), timeout)

    def close(self) -> None:
        """The connection is gone: nothing more is sent, nobody waits on a drain."""
        self._closed = True
        self._audio.clear()
        self._events.clear()
        for turn in self._turns.values():
            turn.ended.set()
        self._wake.set()
