"""The last stage: reply audio to an output, and the turn's closing events.

An :class:`AudioOutput` is where reply audio goes: a live speaker, or a
:class:`TimelineOutput` that places it on the input's own timeline (for
``converse INPUT --output OUT.wav``). The stage stamps the moment the first
sample of a reply plays (:class:`ReplyAudioStarted`, the end point of voice
to voice latency) and, after the last one, :class:`ReplyAudioEnded` and
:class:`TurnCompleted`. Cancelling a turn clears its audio from the output
at once. When a reply may start is not this stage's decision: it waits on
the turn controller's gate (:class:`ReplyGate`) before a reply's first
sample.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np

from .frames import (
    Event,
    ReplyAudioEnded,
    ReplyCancelled,
    ReplyAudioStarted,
    SpeechStopped,
    TextChunk,
    TTSAudio,
    TTSDone,
    TurnCancelled,
    TurnCompleted,
    now,
)
from .runtime import PipelineContext, Stage


class ReplyGate(Protocol):
    async def wait_to_play(self, turn_id: int) -> None:
        """Return once the turn's reply may start playing."""
        ...


class AudioOutput(Protocol):
    sample_rate: int

    def write(self, turn_id: int, pcm: np.ndarray) -> tuple[float, int]:
        """Queue audio; return (time its first sample plays, its position)."""
        ...

    def clear(self, turn_id: int) -> None:
        """Drop the turn's audio that has not played yet."""
        ...

    def played(self, turn_id: int) -> tuple[int, float]:
        """How much of the turn's audio has been heard: (samples, as of when).

        Asked at a barge-in, right after :meth:`clear`: the samples are what
        the listener really heard (the history is cut there) and the time is
        when the last of them plays (the end of the barge-in stop time).
        """
        ...

    async def drain(self, turn_id: int) -> float:
        """Wait until the turn's audio has played; return when it ended."""
        ...


class TimelineOutput:
    """Virtual playback onto the input's timeline, rendered to one array.

    A reply is placed where it would have started playing: at the end of the
    user's speech plus the time the pipeline took, measured on the monotonic
    clock from the turn's last voiced frame. Replies never overlap each
    other; a late chunk leaves the gap a listener would have heard.
    """

    def __init__(self, sample_rate: int, input_rate: int, realtime: bool = True) -> None:
        self.sample_rate = sample_rate
        self._input_rate = input_rate
        # Real-time input: a reply "plays" until its last sample is due, so
        # the assistant is speaking (and can be interrupted) that long. Input
        # fed faster than real time has no such clock: drain returns at once.
        self.realtime = realtime
        self._anchors: dict[int, tuple[float, float]] = {}  # turn -> (stamp, position)
        self._pieces: list[tuple[int, np.ndarray, int]] = []  # (position, pcm, turn)
        self._cursor = 0
        self._ends: dict[int, float] = {}

    def observe(self, event: Any) -> None:
        """Bus observer: remember where each user turn ended."""
        if isinstance(event, SpeechStopped) and event.turn_id is not None:
            position = event.last_voiced_position * self.sample_rate / self._input_rate
            self._anchors[event.turn_id] = (event.last_voiced_at, position)

    def _time_of(self, turn_id: int, position: float) -> float:
        stamp, anchor = self._anchors.get(turn_id, (now(), float(self._cursor)))
        return stamp + (position - anchor) / self.sample_rate

    def write(self, turn_id: int, pcm: np.ndarray) -> tuple[float, int]:
        t = now()
        stamp, anchor = self._anchors.setdefault(turn_id, (t, float(self._cursor)))
        due = int(round(anchor + (t - stamp) * self.sample_rate))
        start = max(self._cursor, due)
        self._pieces.append((start, pcm, turn_id))
        self._cursor = start + len(pcm)
        self._ends[turn_id] = self._time_of(turn_id, self._cursor)
        return self._time_of(turn_id, start), start

    def clear(self, turn_id: int) -> None:
        """Cut the turn's audio at the point it had reached by now."""
        played_until = None
        if turn_id in self._anchors:
            stamp, anchor = self._anchors[turn_id]
            played_until = int(anchor + (now() - stamp) * self.sample_rate)
        kept: list[tuple[int, np.ndarray, int]] = []
        for start, pcm, owner in self._pieces:
            if owner != turn_id:
                kept.append((start, pcm, owner))
            elif played_until is not None and start < played_until:
                kept.append((start, pcm[: played_until - start], owner))
        self._pieces = kept
        self._cursor = max((s + len(p) for s, p, _ in kept), default=0)

    def played(self, turn_id: int) -> tuple[int, float]:
        """Samples of the turn placed before the present moment, and now."""
        t = now()
        if turn_id not in self._anchors:
            return 0, t
        stamp, anchor = self._anchors[turn_id]
        played_until = int(anchor + (t - stamp) * self.sample_rate)
        heard = sum(
            max(0, min(len(pcm), played_until - start)) for start, pcm, owner in self._pieces if owner == turn_id
        )
        return heard, t

    async def drain(self, turn_id: int) -> float:
        if self.realtime:
            while (remaining := self._ends.get(turn_id, 0.0) - now()) > 0:
                await asyncio.sleep(min(remaining, 0.1))
        return self._ends.get(turn_id, now())

    def span(self, start: int, end: int) -> np.ndarray:
        """The timeline's samples in [start, end): what a speaker played then."""
        out = np.zeros(max(0, end - start), dtype=np.int16)
        for begin, pcm, _ in self._pieces:
            lo, hi = max(start, begin), min(end, begin + len(pcm))
            if lo < hi:
                out[lo - start : hi - start] = pcm[lo - begin : hi - begin]
        return out

    def render(self, min_samples: int = 0) -> np.ndarray:
        length = max([min_samples] + [s + len(p) for s, p, _ in self._pieces])
        out = np.zeros(length, dtype=np.int16)
        for start, pcm, _ in self._pieces:
            out[start : start + len(pcm)] = pcm
        return out


class PlaybackStage(Stage):
    """Hands reply audio to the output and closes each turn."""

    name = "playback"
    scope = "reply"

    def __init__(self, ctx: PipelineContext, output: AudioOutput, gate: ReplyGate | None = None) -> None:
        super().__init__(ctx)
        self.output = output
        self.gate = gate  # the turn controller: when a reply may start
        self._started: dict[int, int] = {}
        # What each turn's audio says, to cut the history where playback
        # stopped: chunk texts by index, and (start sample, end sample,
        # chunk index or None for a canned phrase) per piece written.
        self._texts: dict[int, dict[int, str]] = {}
        self._pieces: dict[int, list[tuple[int, int, int | None]]] = {}
        ctx.bus.subscribe(self._observe)

    def _observe(self, event: Event) -> None:
        """Remember what each chunk says, to cut the history where playback stops."""
        turn_id = event.turn_id
        if turn_id is None:
            return
        if isinstance(event, TextChunk):
            self._texts.setdefault(turn_id, {})[event.index] = event.text
        elif isinstance(event, (TurnCancelled, TurnCompleted)):
            self._texts.pop(turn_id, None)
            self._pieces.pop(turn_id, None)
        elif isinstance(event, ReplyCancelled):
            self._texts.pop(turn_id, None)

    async def handle(self, item: Any) -> None:
        if isinstance(item, TTSAudio):
            turn_id = item.turn_id
            if self.gate is not None and turn_id not in self._started:
                await self.gate.wait_to_play(turn_id)
            at, position = self.output.write(turn_id, item.pcm)
            self._note_piece(turn_id, len(item.pcm), item.chunk_index)
            if turn_id not in self._started:
                self._started[turn_id] = 0
                turn = self.ctx.turns.get(turn_id)
                if turn is not None:
                    turn.on_cancel(lambda: self._cut(turn_id))
                self.publish(
                    ReplyAudioStarted(turn_id=turn_id, at=at, position=position, sample_rate=self.output.sample_rate)
                )
            self._started[turn_id] += len(item.pcm)
        elif isinstance(item, TTSDone):
            turn_id = item.turn_id
            assert turn_id is not None
            ended = await self.output.drain(turn_id)
            samples = self._started.pop(turn_id, 0)
            self.publish(ReplyAudioEnded(turn_id=turn_id, at=ended, samples=samples))
            self.publish(TurnCompleted(turn_id=turn_id))
        else:
            await self.send(item)

    def has_started(self, turn_id: int) -> bool:
        """Whether any audio of the turn has gone to the output."""
        return turn_id in self._started

    def interject(self, turn_id: int, pcm: np.ndarray) -> None:
        """Play a canned phrase for a turn now (acknowledgement, apology).

        It goes to the output ahead of whatever the turn says later, which
        then follows right after it: no overlap, and no gap if the answer
        is ready by the time the phrase ends. If it is the first audio of the
        turn it marks the reply's start, so nobody waits in dead silence.
        """
        at, position = self.output.write(turn_id, pcm)
        self._note_piece(turn_id, len(pcm), None)
        if turn_id not in self._started:
            self._started[turn_id] = 0
            turn = self.ctx.turns.get(turn_id)
            if turn is not None and not turn.cancelled:
                turn.on_cancel(lambda: self._cut(turn_id))
            self.publish(
                ReplyAudioStarted(turn_id=turn_id, at=at, position=position, sample_rate=self.output.sample_rate)
            )
        self._started[turn_id] += len(pcm)

    def _note_piece(self, turn_id: int, samples: int, chunk_index: int | None) -> None:
        pieces = self._pieces.setdefault(turn_id, [])
        start = pieces[-1][1] if pieces else 0
        pieces.append((start, start + samples, chunk_index))

    def stop(self, turn_id: int) -> tuple[int, float, str, int]:
        """Barge-in: stop the turn's audio now.

        Returns (samples heard, when the last of them plays, the reply text
        they carried, sample rate). The text is cut at the played position:
        whole chunks that played, and the share of the words of the chunk
        that was playing (speech runs at an even pace within a chunk).
        """
        self.output.clear(turn_id)
        samples, at = self.output.played(turn_id)
        texts = self._texts.get(turn_id, {})
        heard: list[str] = []
        for start, end, index in self._pieces.get(turn_id, []):
            if index is None or start >= samples:
                continue
            text = texts.get(index, "")
            if not text:
                continue
            # A chunk's audio may come in several pieces: take its span.
            first = min(s for s, _, i in self._pieces[turn_id] if i == index)
            last = max(e for _, e, i in self._pieces[turn_id] if i == index)
            if start != first:
                continue
            if samples >= last:
                heard.append(text)
            else:
                words = text.split()
                share = int(len(words) * (samples - first) / max(1, last - first))
                if share:
                    heard.append(" ".join(words[:share]))
        return samples, at, " ".join(heard).strip(), self.output.sample_rate

    def _cut(self, turn_id: int) -> None:
        self.output.clear(turn_id)
        self._started.pop(turn_id, None)

    async def finish(self) -> None:
        await asyncio.sleep(0)
