"""The per-turn report: what each turn heard, said, and when (REPORT.json).

:class:`TurnReport` turns the bus events into each turn's transcript, reply,
milestones and span latencies; the names and spans are those of
:mod:`pipeline.metrics`. The budgets come from the session's
:class:`~pipeline.runtime.Watchdog`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .frames import (
    BudgetExceeded,
    BufferTranscribed,
    Event,
    LLMDone,
    LLMToken,
    ReplyAudioEnded,
    ReplyCancelled,
    ReplyInterrupted,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    StageError,
    TextChunk,
    TranscriptFinal,
    TranscriptPartial,
    TurnCancelled,
    TurnCompleted,
)
from .metrics import REPLY_MILESTONES, REPORT_MILESTONES, REPORT_SPANS, milestone_ms, milestones_of, span_ms
from .runtime import EventBus, Watchdog

__all__ = ["TurnRecord", "TurnReport"]


@dataclass
class TurnRecord:
    turn_id: int
    transcript: str = ""
    partials: list[str] = field(default_factory=list)
    reply: str = ""  # as the model finished it; cut short: as written so far
    written: list[str] = field(default_factory=list)  # the reply's tokens until LLMDone
    stamps: dict[str, float] = field(default_factory=dict)
    status: str = "open"
    cancel_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    asr_final_reused: bool | None = None
    llm_tokens: int = 0
    chunks: list[str] = field(default_factory=list)
    reply_samples: int = 0
    budget_events: list[dict[str, Any]] = field(default_factory=list)
    early_reply: bool = False
    replies_discarded: int = 0
    asr_final_forced: bool = False
    interrupted: bool = False
    heard_text: str | None = None
    barge_in_stop_ms: float | None = None
    barge_in: bool = False  # this turn itself interrupted a reply
    speech_end_position: int | None = None  # input samples up to the last voiced one

    def stamp(self, name: str, at: float) -> None:
        self.stamps.setdefault(name, at)

    @property
    def noise(self) -> bool:
        """Noise that opened a turn but held no words: not worth reporting."""
        return self.status == "cancelled" and not self.transcript


class TurnReport:
    """Collects each turn's transcript, reply and milestone stamps from the bus.

    ``keep`` bounds what a long-lived session holds (a kiosk runs for weeks,
    a browser tab for hours): past ``keep`` closed turns the oldest are
    forgotten, here and in the watchdog's results, once their listeners have
    seen them. ``closed`` counts every turn closed, forgotten or not.
    """

    def __init__(
        self, bus: EventBus, origin: float, output_rate: int, watchdog: Watchdog | None = None,
        keep: int | None = None, input_rate: int = 16000,
    ) -> None:
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        self.origin = origin
        self.output_rate = output_rate
        self.input_rate = input_rate
        self.watchdog = watchdog
        self.keep = keep
        self.closed = 0
        self.turns: dict[int, TurnRecord] = {}
        self._closed_ids: deque[int] = deque()
        self.listeners: list[Callable[[TurnRecord], None]] = []
        bus.subscribe(self.observe)

    def _turn(self, turn_id: int) -> TurnRecord:
        if turn_id not in self.turns:
            self.turns[turn_id] = TurnRecord(turn_id)
        return self.turns[turn_id]

    def observe(self, event: Event) -> None:
        if event.turn_id is None:
            return
        t = self._turn(event.turn_id)
        # The first stamp of each milestone counts. A pause's end of speech
        # is only provisional (the user may go on): the report takes the stop's.
        if not isinstance(event, SpeechPaused):
            for name, at in milestones_of(event):
                t.stamp(name, at)
        match event:
            case SpeechStarted():
                t.barge_in = event.barge_in
            case SpeechStopped():
                t.speech_end_position = event.last_voiced_position
            case ReplyInterrupted():
                t.interrupted = True
                t.heard_text = event.heard_text
                t.barge_in_stop_ms = round(event.stop_ms, 1)
                t.reply_samples = event.played_samples
            case TranscriptPartial():
                t.partials.append(event.text)
            case TranscriptFinal() if event.speculative:
                t.early_reply = True
            case ReplyCancelled():
                t.replies_discarded += 1
                for name in REPLY_MILESTONES:
                    t.stamps.pop(name, None)
                t.chunks.clear()
                t.llm_tokens = 0
                t.written.clear()
            case TranscriptFinal():
                t.transcript = event.text
                t.asr_final_reused = event.reused
                t.asr_final_forced = event.forced
            case BufferTranscribed():
                t.transcript = event.text
            case LLMToken():
                t.llm_tokens += 1
                t.written.append(event.text)
            case LLMDone():
                t.reply = event.text
            case TextChunk():
                if event.text:
                    t.chunks.append(event.text)
            case ReplyAudioEnded():
                t.reply_samples = event.samples
            case TurnCompleted():
                t.status = "completed"
                self._closed(t)
            case TurnCancelled():
                t.status = "interrupted" if t.interrupted else "cancelled"
                t.cancel_reason = event.reason
                if not t.reply:  # stopped while the model was still writing
                    t.reply = "".join(t.written).strip()
                self._closed(t)
            case StageError():
                t.errors.append(f"{event.stage}: {event.message}")
            case BudgetExceeded():
                t.budget_events.append(
                    {
                        "stage": event.stage,
                        "budget_ms": event.budget_ms,
                        "elapsed_ms": event.elapsed_ms,
                        "policy": event.policy,
                        "at_ms": round((event.at - self.origin) * 1000, 1),
                    }
                )
            case _:
                pass

    def _closed(self, t: TurnRecord) -> None:
        self.closed += 1
        for listener in self.listeners:
            listener(t)
        if self.keep is None:
            return
        self._closed_ids.append(t.turn_id)
        while len(self._closed_ids) > self.keep:
            old = self._closed_ids.popleft()
            self.turns.pop(old, None)
            if self.watchdog is not None:
                self.watchdog.results.pop(old, None)

    def to_json(self, include_dropped: bool = False) -> list[dict[str, Any]]:
        out = []
        for t in sorted(self.turns.values(), key=lambda r: r.turn_id):
            if not include_dropped and t.noise:
                continue  # noise that opened a turn but held no words
            out.append(self.turn_json(t))
        return out

    def turn_json(self, t: TurnRecord) -> dict[str, Any]:
        latency = span_ms(t.stamps, REPORT_SPANS)
        return {
            "turn": t.turn_id,
            "status": t.status,
            "cancel_reason": t.cancel_reason,
            "transcript": t.transcript,
            "reply": t.reply,
            "reply_chunks": t.chunks,
            "partial_transcripts": t.partials,
            "asr_final_reused_partial_decode": t.asr_final_reused,
            "asr_final_forced_by_budget": t.asr_final_forced,
            "reply_started_at_pause": t.early_reply,
            "early_replies_discarded": t.replies_discarded,
            "llm_tokens": t.llm_tokens,
            "reply_audio_seconds": round(t.reply_samples / self.output_rate, 3),
            "interrupted": t.interrupted,
            "heard_text": t.heard_text,
            "barge_in_stop_ms": t.barge_in_stop_ms,
            "opened_by_barge_in": t.barge_in,
            "milestones_ms": milestone_ms(t.stamps, REPORT_MILESTONES, self.origin),
            "latency_ms": latency,
            "voice_to_voice_ms": latency.get("voice_to_voice"),
            "speech_end_input_ms": (
                round(t.speech_end_position / self.input_rate * 1000, 1) if t.speech_end_position is not None else None
            ),
            "budgets": self.watchdog.results.get(t.turn_id, {}) if self.watchdog is not None else {},
            "budget_exceeded": t.budget_events,
            "errors": t.errors,
        }
