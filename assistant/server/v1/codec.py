"""The websocket protocol, version 1 (``/ws``): every message on the wire.

docs/protocol.md is the contract; this module is its codec. It holds

* the names: message types (:class:`MessageType`) and which pipeline
  events a client sees (:data:`EVENT_TYPES`); error and close codes are the
  server's (:mod:`assistant.server.face`);
* the client's messages, checked and parsed into typed requests
  (:class:`~assistant.server.face.SessionStart`, :class:`PlaybackPosition`,
  :class:`PlaybackHeard`, :class:`InputEnd`, :class:`SessionEnd`) or refused
  with a :class:`~assistant.server.face.ProtocolError`;
* every server message, built from the session's typed events
  (:mod:`pipeline.frames`) by :class:`ProtocolV1`, one per connection,
  which also derives from those events the little per-turn state the wire
  needs (which turns are open, which were interrupted).

Nothing here touches a socket or a session: the face
(:mod:`assistant.server.v1.face`) acts on what this parses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from pipeline import frames
from pipeline.frames import Event, now

from ..face import (
    SHUTDOWN_BEFORE_START,
    Closing,
    Ending,
    ErrorCode,
    Message,
    ProtocolError,
    SessionStart,
    encode,
    load_client_json,
)

PROTOCOL_VERSION: Final = 1
MIN_RATE, MAX_RATE = 8000, 48000


class MessageType(StrEnum):
    """Every ``"type"`` on the wire, both ways."""

    # client -> server
    SESSION_START = "session.start"
    PLAYBACK_POSITION = "playback.position"
    PLAYBACK_HEARD = "playback.heard"
    INPUT_END = "input.end"
    SESSION_END = "session.end"
    # server -> client
    SESSION_READY = "session.ready"
    SPEECH_STARTED = "speech.started"
    SPEECH_STOPPED = "speech.stopped"
    TRANSCRIPT_PARTIAL = "transcript.partial"
    TRANSCRIPT_FINAL = "transcript.final"
    RESPONSE_TEXT_DELTA = "response.text.delta"
    RESPONSE_TEXT_DONE = "response.text.done"
    RESPONSE_CANCELLED = "response.cancelled"
    RESPONSE_AUDIO_START = "response.audio.start"
    RESPONSE_AUDIO_END = "response.audio.end"
    RESPONSE_INTERRUPTED = "response.interrupted"
    TOOL_CALL = "tool.call"
    TOOL_RESULT = "tool.result"
    TURN_METRICS = "turn.metrics"
    BUDGET_EXCEEDED = "budget.exceeded"
    ERROR = "error"
    SESSION_ENDED = "session.ended"


EVENT_TYPES: Final[dict[type[Event], MessageType]] = {
    frames.SpeechStarted: MessageType.SPEECH_STARTED,
    frames.SpeechStopped: MessageType.SPEECH_STOPPED,
    frames.TranscriptPartial: MessageType.TRANSCRIPT_PARTIAL,
    frames.TranscriptFinal: MessageType.TRANSCRIPT_FINAL,  # the confirmed one; speculative finals stay off the wire
    frames.LLMToken: MessageType.RESPONSE_TEXT_DELTA,
    frames.LLMDone: MessageType.RESPONSE_TEXT_DONE,
    frames.ReplyCancelled: MessageType.RESPONSE_CANCELLED,
    frames.ReplyInterrupted: MessageType.RESPONSE_INTERRUPTED,
    frames.ToolCalled: MessageType.TOOL_CALL,
    frames.ToolResult: MessageType.TOOL_RESULT,
    frames.BudgetExceeded: MessageType.BUDGET_EXCEEDED,
    frames.StageError: MessageType.ERROR,  # code stage_failed
}
"""The pipeline events a client sees, and their names on the wire. The
others stay inside; turn.metrics comes from the session's report, the audio
markers from the paced output."""


def session_start(input_rate: int, output_rate: int, client: str) -> Message:
    """The client's first message."""
    return {"type": MessageType.SESSION_START, "protocol": PROTOCOL_VERSION, "input_rate": input_rate,
            "output_rate": output_rate, "client": client}


# --------------------------------------------------------------------------
# What a client asks for
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlaybackPosition:
    """``playback.position``: samples of the turn's reply the client has played, at its output rate."""

    turn_id: int
    samples: int


@dataclass(frozen=True, slots=True)
class PlaybackHeard:
    """``playback.heard``: voice to voice as the client measured it, from its
    microphone's capture of the user's last voiced sample to its speaker's
    output of the reply's first (the browser: AudioContext timestamps)."""

    turn_id: int
    voice_to_voice_ms: float


MAX_HEARD_MS = 600_000.0  # ten minutes: more is a client's clock error, not a latency


@dataclass(frozen=True, slots=True)
class InputEnd:
    """``input.end``: no more audio will come."""


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """``session.end``: stop now."""


ClientRequest = PlaybackPosition | PlaybackHeard | InputEnd | SessionEnd


# --------------------------------------------------------------------------
# Protocol v1
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _TurnSeen:
    """What the wire has said about one turn."""

    open: bool = False  # speech.started sent, turn.metrics not yet
    interrupted: bool = False  # response.interrupted sent


class ProtocolV1(Closing):
    """Protocol v1's messages on one connection (docs/protocol.md): every one
    parsed or built, and the little per-turn state the wire needs.

    ``origin``: the session clock's zero, from which every ``at_ms`` counts
    (the connection's start until the session exists, then the session's).
    ``pipeline_rate``: the sample rate of the session's reply audio, the
    fallback for an interruption that does not say its own.
    """

    def __init__(self, origin: float, pipeline_rate: int) -> None:
        self.origin = origin
        self.pipeline_rate = pipeline_rate
        self.start: SessionStart | None = None  # set by ready()
        self._turns: dict[int, _TurnSeen] = {}

    def ms(self, at: float) -> float:
        """A time on the session clock, as every ``at_ms`` carries it."""
        return round((at - self.origin) * 1000, 1)

    def encode(self, message: Message) -> str:
        return encode(message)

    # ---- client -> server -------------------------------------------------

    def parse_start(self, frame: str | bytes, default_input: int, default_output: int) -> SessionStart:
        """Check the first message; raise a fatal ``protocol`` error if it is not a valid session.start."""
        if isinstance(frame, bytes):
            raise _bad_start("the first message must be session.start (got audio)")
        try:
            message = load_client_json(frame)
        except ValueError as exc:
            said = "got text that is not JSON" if str(exc) == "text frame is not JSON" else exc
            raise _bad_start(f"the first message must be session.start ({said})") from None
        if not isinstance(message, dict) or message.get("type") != MessageType.SESSION_START:
            kind = message.get("type") if isinstance(message, dict) else type(message).__name__
            raise _bad_start(f"the first message must be session.start (got {kind!r})")
        if type(message.get("protocol")) is not int or message["protocol"] != PROTOCOL_VERSION:  # not True, not 1.0
            raise _bad_start(f"unsupported protocol {message.get('protocol')!r}; this server speaks {PROTOCOL_VERSION}")
        rates = []
        for key, default in (("input_rate", default_input), ("output_rate", default_output)):
            value = message.get(key, default)
            if type(value) is not int or not MIN_RATE <= value <= MAX_RATE:
                raise _bad_start(f"{key}: expected an integer from {MIN_RATE} to {MAX_RATE}, got {value!r}")
            rates.append(value)
        client = message.get("client", "")
        if not isinstance(client, str):
            raise _bad_start(f"client: expected a string, got {client!r}")
        return SessionStart(input_rate=rates[0], output_rate=rates[1], client=client[:80])

    def parse(self, text: str) -> ClientRequest:
        """A text frame after session.start; a non-fatal ``bad_message`` error if it is not one the protocol has."""
        try:
            message = load_client_json(text)
        except ValueError as exc:
            raise _bad_message(str(exc)) from None
        if not isinstance(message, dict):
            raise _bad_message("expected a JSON object with a \"type\"")
        kind = message.get("type")
        if kind == MessageType.PLAYBACK_POSITION:
            turn_id, samples = message.get("turn_id"), message.get("samples")
            if type(turn_id) is not int or type(samples) is not int or samples < 0:
                raise _bad_message("playback.position: turn_id and samples must be integers >= 0")
            return PlaybackPosition(turn_id, samples)
        if kind == MessageType.PLAYBACK_HEARD:
            turn_id, heard = message.get("turn_id"), message.get("voice_to_voice_ms")
            if (
                type(turn_id) is not int
                or turn_id < 0
                or type(heard) not in (int, float)
                or not 0 <= heard <= MAX_HEARD_MS
            ):
                raise _bad_message(
                    f"playback.heard: turn_id must be an integer >= 0 and voice_to_voice_ms a number "
                    f"from 0 to {MAX_HEARD_MS:.0f}"
                )
            return PlaybackHeard(turn_id, float(heard))
        if kind == MessageType.INPUT_END:
            return InputEnd()
        if kind == MessageType.SESSION_END:
            return SessionEnd()
        if kind == MessageType.SESSION_START:
            raise _bad_message("the session has already started")
        if not isinstance(kind, str):
            raise _bad_message("message has no \"type\"")
        raise _bad_message(f"unknown message type {kind[:40]!r}")

    def check_audio(self, data: bytes, input_closed: bool) -> None:
        """A binary frame: PCM16, and only before input.end (non-fatal ``bad_audio`` errors)."""
        if input_closed:
            raise ProtocolError(ErrorCode.BAD_AUDIO, "audio after input.end is ignored")
        if len(data) % 2:
            raise ProtocolError(ErrorCode.BAD_AUDIO, f"binary frame of odd length ({len(data)} bytes): expected PCM16")

    # ---- server -> client -------------------------------------------------

    def ready(self, session_id: str, start: SessionStart, frame_ms: int, budgets_ms: dict[str, float]) -> Message:
        """``session.ready``; stamped now, so call it when the session is ready."""
        self.start = start
        return {
            "type": MessageType.SESSION_READY,
            "protocol": PROTOCOL_VERSION,
            "session_id": session_id,
            "input_rate": start.input_rate,
            "output_rate": start.output_rate,
            "frame_ms": frame_ms,
            "budgets_ms": budgets_ms,
            "at_ms": self.ms(now()),
        }

    def message_of(self, event: Event) -> Message | None:
        """The message a session event becomes (None: it stays off the wire); notes what the turns did."""
        kind = EVENT_TYPES.get(type(event))
        if kind is None or (isinstance(event, frames.TranscriptFinal) and event.speculative):
            return None
        if isinstance(event, frames.StageError):
            return self.error(ErrorCode.STAGE_FAILED, f"{event.stage}: {event.message}", fatal=False, event=event)
        if event.turn_id is not None and isinstance(event, frames.SpeechStarted | frames.ReplyInterrupted):
            seen = self._turns.setdefault(event.turn_id, _TurnSeen())
            if isinstance(event, frames.SpeechStarted):
                seen.open = True
            else:
                seen.interrupted = True
        return {"type": kind, "turn_id": event.turn_id, **self._fields(event), "at_ms": self.ms(event.at)}

    def _fields(self, event: Event) -> dict[str, Any]:
        match event:
            case frames.SpeechStarted():
                return {"barge_in": bool(event.barge_in)}
            case frames.SpeechStopped():
                return {"speech_end_ms": self.ms(event.last_voiced_at)}
            case frames.TranscriptPartial() | frames.TranscriptFinal() | frames.LLMToken() | frames.LLMDone():
                return {"text": event.text}
            case frames.ReplyCancelled():
                return {"reason": event.reason}
            case frames.ReplyInterrupted():
                client_rate = self.start.output_rate if self.start is not None else self.pipeline_rate
                rate = event.sample_rate or self.pipeline_rate
                return {
                    "heard_text": event.heard_text,
                    "played_samples": int(round(event.played_samples * client_rate / rate)),
                    "stop_ms": round(event.stop_ms, 1),
                    "by_turn": event.by_turn,
                }
            case frames.ToolCalled():
                return {"calls": [{"call_id": c.call_id, "name": c.name, "arguments": c.arguments}
                                  for c in event.calls]}
            case frames.ToolResult():
                return {"call_id": event.call_id, "name": event.name, "output": event.output, "error": event.error,
                        "elapsed_ms": event.elapsed_ms}
            case frames.BudgetExceeded():
                return {"stage": event.stage, "budget_ms": event.budget_ms, "elapsed_ms": event.elapsed_ms,
                        "policy": event.policy}
        raise AssertionError(f"no wire fields for {type(event).__name__}")  # EVENT_TYPES and this match disagree

    def turn_metrics(self, turn_id: int, data: dict[str, Any]) -> Message:
        """``turn.metrics`` from the report's record of a closed turn (``turn_json``); the turn is closed."""
        seen = self._turns.pop(turn_id, None)
        return {
            "type": MessageType.TURN_METRICS,
            "turn_id": turn_id,
            "status": data["status"],
            "cancel_reason": data["cancel_reason"],
            "interrupted": bool(data.get("interrupted")) or (seen is not None and seen.interrupted),
            "heard_text": data.get("heard_text"),
            "transcript": data["transcript"],
            "reply": data["reply"],
            "voice_to_voice_ms": data["voice_to_voice_ms"],
            # Where the user's last voiced sample was in the audio the client
            # sent (ms from the session's first sample): the client's own
            # voice to voice starts there (playback.heard).
            "speech_end_input_ms": data.get("speech_end_input_ms"),
            "latency_ms": data["latency_ms"],
            "budgets": data["budgets"],
            "at_ms": self.ms(now()),
        }

    @property
    def open_turns(self) -> list[int]:
        """Turns with speech.started sent and no turn.metrics yet, oldest first."""
        return sorted(turn_id for turn_id, seen in self._turns.items() if seen.open)

    def audio_start(self, turn_id: int, sample_rate: int, at: float) -> Message:
        return {"type": MessageType.RESPONSE_AUDIO_START, "turn_id": turn_id, "sample_rate": sample_rate,
                "at_ms": self.ms(at)}

    def audio(self, pcm16: bytes) -> bytes:
        """A reply audio frame: the PCM itself, in a binary frame."""
        return pcm16

    def audio_end(self, turn_id: int, samples: int, at: float) -> Message:
        return {"type": MessageType.RESPONSE_AUDIO_END, "turn_id": turn_id, "samples": samples, "at_ms": self.ms(at)}

    def error(
        self, code: ErrorCode, message: str, *, fatal: bool, at: float | None = None, event: Event | None = None
    ) -> Message:
        """Every ``error`` event. ``at_ms`` is when it happened on the session clock: the
        ``event``'s stamp for a pipeline event (whose ``turn_id`` it carries), else ``at``."""
        about = {"turn_id": event.turn_id} if event is not None else {}
        stamp = event.at if event is not None else at
        assert stamp is not None, "an error needs a time: at, or the event's"
        return {"type": MessageType.ERROR, "code": code, **about, "message": message, "fatal": fatal,
                "at_ms": self.ms(stamp)}

    def ending(self, reason: str) -> Ending:
        """How the connection ends for ``reason``; before session.start, a shutdown just closes."""
        if reason == "shutdown" and self.start is None:
            return SHUTDOWN_BEFORE_START
        return super().ending(reason)

    def final(self, ending: Ending, at: float) -> Message | None:
        """The last event before the close: the fatal error, else session.ended, else none."""
        if ending.error is not None:
            return super().final(ending, at)
        if ending.ended_reason is not None:
            return {"type": MessageType.SESSION_ENDED, "reason": ending.ended_reason, "at_ms": self.ms(at)}
        return None


def _bad_start(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL, message, fatal=True)


def _bad_message(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, message)
