"""The websocket protocol, version 1: every message on the wire.

docs/protocol.md is the contract; this module is its one implementation.
It holds

* the names: message types (:class:`MessageType`), error codes
  (:class:`ErrorCode`), close codes (``websockets.frames.CloseCode``) and
  how each way a session ends maps onto them (:class:`Ending`);
* the client's messages, checked and parsed into typed requests
  (:class:`SessionStart`, :class:`PlaybackPosition`, :class:`InputEnd`,
  :class:`SessionEnd`) or refused with a :class:`ProtocolError`;
* every server message, built from the session's typed events
  (:mod:`pipeline.frames`) by :class:`ProtocolV1`, one per connection,
  which also derives from those events the little per-turn state the wire
  needs (which turns are open, which were interrupted).

The server (:mod:`assistant.server.server`) and the paced output
(:mod:`assistant.server.output`) send what this module builds and act on
what it parses; neither builds nor reads a message itself. Nothing here
touches a socket.

:class:`WireProtocol` is what the server asks of a protocol. Another one
(an OpenAI-Realtime-compatible endpoint, say) is a module beside this
one whose class implements it over the same session events (the OpenAI
Realtime API: :mod:`assistant.server.realtime`); the server picks it by the
websocket path. A protocol with no marker around reply audio returns None
from :meth:`WireProtocol.audio_start` / ``audio_end``, and None from
``audio`` for a frame it drops.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Protocol

from websockets.frames import CloseCode

from pipeline import frames
from pipeline.frames import Event, now

PROTOCOL_VERSION: Final = 1
MIN_RATE, MAX_RATE = 8000, 48000
CLOSE_REASON_BYTES: Final = 120  # a close frame's reason holds at most 123 bytes of UTF-8
MAX_TEXT_CHARS: Final = 65536  # the longest client text frame; every message of v1 fits in a few hundred
MAX_JSON_DEPTH: Final = 32  # the deepest nesting a client text frame may have (v1's messages are flat)

Message = dict[str, Any]  # one JSON text frame, before encoding


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
    TURN_METRICS = "turn.metrics"
    BUDGET_EXCEEDED = "budget.exceeded"
    ERROR = "error"
    SESSION_ENDED = "session.ended"


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` event."""

    BAD_MESSAGE = "bad_message"
    BAD_AUDIO = "bad_audio"
    STAGE_FAILED = "stage_failed"
    PROTOCOL = "protocol"
    TOO_MANY_SESSIONS = "too_many_sessions"
    INPUT_RATE = "input_rate"
    MESSAGE_RATE = "message_rate"
    INTERNAL = "internal"


FATAL_CLOSE: Final[dict[ErrorCode, CloseCode]] = {
    ErrorCode.PROTOCOL: CloseCode.POLICY_VIOLATION,
    ErrorCode.TOO_MANY_SESSIONS: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.INPUT_RATE: CloseCode.POLICY_VIOLATION,
    ErrorCode.MESSAGE_RATE: CloseCode.POLICY_VIOLATION,
    ErrorCode.INTERNAL: CloseCode.INTERNAL_ERROR,
}
"""The close code that follows a fatal error."""

EVENT_TYPES: Final[dict[type[Event], MessageType]] = {
    frames.SpeechStarted: MessageType.SPEECH_STARTED,
    frames.SpeechStopped: MessageType.SPEECH_STOPPED,
    frames.TranscriptPartial: MessageType.TRANSCRIPT_PARTIAL,
    frames.TranscriptFinal: MessageType.TRANSCRIPT_FINAL,  # the confirmed one; speculative finals stay off the wire
    frames.LLMToken: MessageType.RESPONSE_TEXT_DELTA,
    frames.LLMDone: MessageType.RESPONSE_TEXT_DONE,
    frames.ReplyCancelled: MessageType.RESPONSE_CANCELLED,
    frames.ReplyInterrupted: MessageType.RESPONSE_INTERRUPTED,
    frames.BudgetExceeded: MessageType.BUDGET_EXCEEDED,
    frames.StageError: MessageType.ERROR,  # code stage_failed
}
"""The pipeline events a client sees, and their names on the wire. The
others stay inside; turn.metrics comes from the session's report, the audio
markers from the paced output."""


def encode(message: Message) -> str:
    """One message as a text frame: compact JSON."""
    return json.dumps(message, separators=(",", ":"))


def decode(text: str) -> Message:
    """One text frame as a message (for clients; the server uses :meth:`ProtocolV1.parse`)."""
    message = json.loads(text)
    if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    return message


_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """How deep the brackets of ``text`` nest, strings skipped, without decoding it.

    The JSON decoder recurses once per level: 100,000 levels raised
    RecursionError out of ``json.loads``. Two regular-expression passes (C
    speed) and one pass over the brackets alone bound the work by the text's
    length. An unterminated string counts its brackets: such text is not
    JSON anyway.
    """
    depth = deepest = 0
    for bracket in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_client_json(text: str) -> Any:
    """A client's text frame decoded, its size and nesting checked first; ValueError says what is wrong."""
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"text frame of {len(text)} characters is over the limit of {MAX_TEXT_CHARS}")
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"text frame nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_refuse_constant)  # NaN and Infinity are not JSON
    except ValueError:  # JSONDecodeError, a number over Python's digit limit, NaN
        raise ValueError("text frame is not JSON") from None


def session_start(input_rate: int, output_rate: int, client: str) -> Message:
    """The client's first message."""
    return {"type": MessageType.SESSION_START, "protocol": PROTOCOL_VERSION, "input_rate": input_rate,
            "output_rate": output_rate, "client": client}


# --------------------------------------------------------------------------
# What a client asks for, and what it gets wrong
# --------------------------------------------------------------------------


class ProtocolError(Exception):
    """A client message the protocol does not allow: becomes an ``error`` event."""

    def __init__(self, code: ErrorCode, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


_INPUT_RATE_MESSAGE: Final = "audio is arriving faster than the server allows"
_INTERNAL_MESSAGE: Final = "internal server error; the session is closed"


def start_timeout(seconds: float) -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL, f"no session.start within {seconds:.0f} s", fatal=True)


def too_many_sessions(limit: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.TOO_MANY_SESSIONS, f"the server is at its limit of {limit} sessions; try again later", fatal=True
    )


def input_too_fast() -> ProtocolError:
    return ProtocolError(ErrorCode.INPUT_RATE, _INPUT_RATE_MESSAGE, fatal=True)


def messages_too_fast(per_second: float, burst: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.MESSAGE_RATE,
        f"more than {per_second:g} messages per second (bursts of {burst}) arrived; the session is closed",
        fatal=True,
    )


@dataclass(frozen=True, slots=True)
class SessionStart:
    """What a client asked for in ``session.start``."""

    input_rate: int
    output_rate: int
    client: str


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
# How a session ends
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ending:
    """How a connection ends: the last event it is told, and its close frame."""

    close_code: CloseCode  # ABNORMAL_CLOSURE: the connection is already gone, nothing is sent
    close_reason: str = ""
    ended_reason: str | None = None  # session.ended's reason; None: no session.ended
    error: tuple[ErrorCode, str] | None = None  # a fatal error event (code, message) instead
    cancel_turns: bool = True  # in-flight turns are cancelled, not finished

    @property
    def closes(self) -> bool:
        return self.close_code != CloseCode.ABNORMAL_CLOSURE


def _short(reason: str) -> str:
    return reason.encode()[:CLOSE_REASON_BYTES].decode("utf-8", "ignore")


def _ended(reason: str, close_code: CloseCode, cancel_turns: bool = True) -> Ending:
    return Ending(close_code, reason, ended_reason=reason, cancel_turns=cancel_turns)


def fatal(error: ProtocolError) -> Ending:
    """A fatal error: the ``error`` event, then the close code :data:`FATAL_CLOSE` names."""
    return Ending(FATAL_CLOSE[error.code], _short(error.message), error=(error.code, error.message))


ENDINGS: Final[dict[str, Ending]] = {
    "input_ended": _ended("input_ended", CloseCode.NORMAL_CLOSURE, cancel_turns=False),
    "session_end": _ended("session_end", CloseCode.NORMAL_CLOSURE),
    "idle_timeout": _ended("idle_timeout", CloseCode.NORMAL_CLOSURE),
    "shutdown": _ended("shutdown", CloseCode.GOING_AWAY),
    "disconnected": Ending(CloseCode.ABNORMAL_CLOSURE),
    "input_rate": fatal(input_too_fast()),
    "internal": fatal(ProtocolError(ErrorCode.INTERNAL, _INTERNAL_MESSAGE, fatal=True)),
}
"""Each way a started session ends, by the name the server gives it."""

SHUTDOWN_BEFORE_START: Final = Ending(CloseCode.GOING_AWAY, "server shutting down")
"""The server stops before the client sent session.start: no event, just the close."""


# --------------------------------------------------------------------------
# The interface a protocol implements
# --------------------------------------------------------------------------


class WireProtocol(Protocol):
    """What the server asks of a wire protocol, one object per connection.

    The server hands it what the client sent and what the session did
    (its bus events, its report's closed turns, the output's audio) and
    sends what it returns; messages are JSON-ready dicts until
    :meth:`encode`. ``origin`` is the session clock's zero.
    """

    origin: float

    def parse_start(self, frame: str | bytes, default_input: int, default_output: int) -> SessionStart: ...

    def parse(self, text: str) -> ClientRequest: ...

    def check_audio(self, data: bytes, input_closed: bool) -> None: ...

    def ready(self, session_id: str, start: SessionStart, frame_ms: int, budgets_ms: dict[str, float]) -> Message: ...

    def on_event(self, event: Event) -> Message | None: ...

    def turn_metrics(self, turn_id: int, data: dict[str, Any]) -> Message: ...

    def audio_start(self, turn_id: int, sample_rate: int, at: float) -> Message | None: ...

    def audio(self, pcm16: bytes) -> bytes | str | None: ...

    def audio_end(self, turn_id: int, samples: int, at: float) -> Message | None: ...

    def error(
        self, code: ErrorCode, message: str, *, fatal: bool, at: float | None = None, event: Event | None = None
    ) -> Message: ...

    def ending(self, reason: str) -> Ending: ...

    def refusal(self, error: ProtocolError) -> Ending: ...

    def final(self, ending: Ending, at: float) -> Message | None: ...

    def encode(self, message: Message) -> str: ...

    @property
    def open_turns(self) -> list[int]: ...


# --------------------------------------------------------------------------
# Protocol v1
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _TurnSeen:
    """What the wire has said about one turn."""

    open: bool = False  # speech.started sent, turn.metrics not yet
    interrupted: bool = False  # response.interrupted sent


class ProtocolV1:
    """Protocol v1 on one connection (docs/protocol.md); implements :class:`WireProtocol`.

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
            message = _load_client_json(frame)
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
            message = _load_client_json(text)
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

    def on_event(self, event: Event) -> Message | None:
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
        """How the connection ends for ``reason`` (a key of :data:`ENDINGS`)."""
        if reason == "shutdown" and self.start is None:
            return SHUTDOWN_BEFORE_START
        return ENDINGS[reason]

    def refusal(self, error: ProtocolError) -> Ending:
        """How a fatal error closes the connection (a session.start refused, the server full...)."""
        return fatal(error)

    def final(self, ending: Ending, at: float) -> Message | None:
        """The last event before the close: the fatal error, else session.ended, else none."""
        if ending.error is not None:
            code, message = ending.error
            return self.error(code, message, fatal=True, at=at)
        if ending.ended_reason is not None:
            return {"type": MessageType.SESSION_ENDED, "reason": ending.ended_reason, "at_ms": self.ms(at)}
        return None


def _bad_start(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.PROTOCOL, message, fatal=True)


def _bad_message(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, message)
