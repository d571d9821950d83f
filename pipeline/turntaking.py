"""Turn-taking: who holds the floor, and barge-in.

The pipeline is full duplex: the VAD listens while the assistant speaks. Two
rules keep the assistant from ever talking over its user:

* **Hold.** A reply's audio waits while any *other* user turn is open (the
  user began speaking again before the answer started). If that new turn
  turns out to hold words, the held reply is superseded and dropped (the
  user went on; the answer to everything comes next); if it was only noise
  (no words), the held reply plays.
* **Barge-in.** When the VAD confirms user speech *while reply audio is
  playing* (stricter thresholds, see ``barge_in`` in the config and
  :class:`pipeline.vad.VADSettings`), the reply is stopped at once: the
  output is cleared, the turn is cancelled (the vLLM request is aborted and
  pending synthesis dropped by the turn's cancel callbacks), and the
  conversation history keeps only what was actually heard, marked
  interrupted. The new turn keeps the audio of the interruption (the VAD's
  pre-roll), so nothing the user said is lost.

:class:`Floor` is the shared state (read by the VAD and the playback
stage); :class:`TurnTaking` applies the rules, from the bus events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from .frames import (
    Event,
    ReplyAudioEnded,
    ReplyAudioStarted,
    ReplyInterrupted,
    SpeechStarted,
    TranscriptFinal,
    TurnCancelled,
    TurnCompleted,
)
from .runtime import PipelineContext

log = logging.getLogger("pipeline.turntaking")


class Floor:
    """Who is speaking now: open user turns, and turns whose reply is playing."""

    def __init__(self) -> None:
        self.user_turns: set[int] = set()  # opened by the VAD, words not yet resolved
        self.assistant_turns: set[int] = set()  # reply audio handed to the output
        self._changed = asyncio.Event()

    @property
    def assistant_speaking(self) -> bool:
        return bool(self.assistant_turns)

    def others_speaking(self, turn_id: int) -> bool:
        """Whether a user turn other than ``turn_id`` is open."""
        return any(t != turn_id for t in self.user_turns)

    async def wait_clear_for(self, turn_id: int) -> None:
        """Wait until no other user turn is open (the reply may then play)."""
        while self.others_speaking(turn_id):
            self._changed.clear()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()


class ReplyStopper(Protocol):
    def stop(self, turn_id: int) -> tuple[int, float, str, int]:
        """Stop a turn's reply audio now: (samples heard, when the last of
        them plays, the reply text heard, sample rate)."""
        ...


class TurnTaking:
    """Applies the hold, supersede and barge-in rules from the bus events."""

    def __init__(
        self,
        ctx: PipelineContext,
        floor: Floor,
        playback: ReplyStopper,
        record_heard: Callable[[int, str], None],
        barge_in: bool = True,
        hold: bool = True,
    ) -> None:
        self.ctx = ctx
        self.hold = hold
        self.floor = floor
        self.playback = playback
        self.record_heard = record_heard
        self.barge_in = barge_in
        self._replying: set[int] = set()  # turns whose reply is being prepared or played
        self.interruptions: list[ReplyInterrupted] = []
        self.superseded = 0
        ctx.bus.subscribe(self.observe)

    def observe(self, event: Event) -> None:
        turn_id = event.turn_id
        if turn_id is None:
            return
        floor = self.floor
        match event:
            case SpeechStarted():
                if self.hold:
                    floor.user_turns.add(turn_id)
                    floor._notify()
                if self.barge_in:
                    for playing in sorted(floor.assistant_turns - {turn_id}):
                        self.interrupt(playing, event.onset_at, turn_id)
            case TranscriptFinal() if not event.speculative:
                self._replying.add(turn_id)
                floor.user_turns.discard(turn_id)
                floor._notify()
                if self.hold:
                    self._supersede(turn_id)
            case ReplyAudioStarted():
                if not self.ctx.turns.is_cancelled(turn_id):  # an apology after a cancel is not a reply
                    floor.assistant_turns.add(turn_id)
            case ReplyAudioEnded():
                floor.assistant_turns.discard(turn_id)
            case TurnCompleted() | TurnCancelled():
                floor.assistant_turns.discard(turn_id)
                floor.user_turns.discard(turn_id)
                self._replying.discard(turn_id)
                floor._notify()
            case _:
                pass

    def _supersede(self, turn_id: int) -> None:
        """The user said more before an older reply started: drop that reply."""
        for older in sorted(t for t in self._replying if t < turn_id):
            if older in self.floor.assistant_turns:
                continue  # already playing: only a barge-in stops it
            self.record_heard(older, "")
            if self.ctx.turns.cancel(older, f"superseded: the user went on speaking (turn {turn_id})"):
                self.superseded += 1

    def interrupt(self, turn_id: int, onset_at: float, by_turn: int | None) -> ReplyInterrupted | None:
        """Barge-in: stop the turn's reply where it is, keep what was heard."""
        turn = self.ctx.turns.get(turn_id)
        if turn is None or turn.cancelled:
            return None
        samples, stopped_at, heard, rate = self.playback.stop(turn_id)
        self.record_heard(turn_id, heard)
        event = ReplyInterrupted(
            turn_id=turn_id,
            heard_text=heard,
            played_samples=samples,
            sample_rate=rate,
            onset_at=onset_at,
            stopped_at=stopped_at,
            by_turn=by_turn,
        )
        self.interruptions.append(event)
        if len(self.interruptions) > 256:
            del self.interruptions[:128]
        self.ctx.bus.publish(event)
        self.ctx.cancel_turn(turn_id, f"interrupted by the user (turn {by_turn})")
        log.info("turn %d interrupted after %d samples; stop took %.0f ms", turn_id, samples, event.stop_ms)
        return event
