"""What every face shares: the interface a wire protocol implements, and the server's vocabulary.

A *face* is one wire protocol spoken on one connection: the project's
``/ws`` protocol (:mod:`assistant.server.v1`), the OpenAI Realtime API
(:mod:`assistant.server.realtime`), and whatever comes next (a telephony
media stream, a WebRTC data channel). It holds the protocol's state and
builds and parses every message of its wire; it does no I/O. The one
connection class (:class:`~assistant.server.connection.Connection`) does
the I/O, the limits and the lifecycle, and calls the face's hooks
(:class:`Face`); the face acts on the conversation only through the
session's verbs (:class:`SessionVerbs`) and on its connection only through
:class:`Link`. The listener (:mod:`assistant.server.listener`) picks a face
by the websocket path from its route table, one :class:`Route` per face.

Adding a wire is one module (or folder) that implements :class:`Face` and
exports a :class:`Route`, and one row in the listener's ``ROUTES``; its
codec and state are tested without models (tests/test_protocol.py and
tests/test_realtime_codec.py show how).

Shared here: the error codes (:class:`ErrorCode`), a client's mistakes
(:class:`ProtocolError`), how each way a session ends maps onto a close
code (:class:`Ending`, :data:`ENDINGS`), and the guards every untrusted
text frame goes through before it is decoded (:func:`load_client_json`).
Wyoming, a request/response protocol over TCP with its own server
(:mod:`assistant.server.wyoming`), shares the session's loops but not this
interface.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np
from websockets.frames import CloseCode

from pipeline.frames import Event
from pipeline.tools import ToolCall, ToolChoice, ToolSpec

if TYPE_CHECKING:
    from websockets.http11 import Request

    from ..config import Config

CLOSE_REASON_BYTES: Final = 120  # a close frame's reason holds at most 123 bytes of UTF-8
MAX_TEXT_CHARS: Final = 65536  # the longest client text frame; every message of v1 fits in a few hundred
MAX_JSON_DEPTH: Final = 32  # the deepest nesting a client text frame may have (v1's messages are flat)

Message = dict[str, Any]  # one JSON text frame, before encoding


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


def encode(message: Message) -> str:
    """One message as a text frame: compact JSON."""
    return json.dumps(message, separators=(",", ":"))


def decode(text: str) -> Message:
    """One text frame as a message (for clients; a face parses with :func:`load_client_json`)."""
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


def load_client_json(text: str | bytes, max_chars: int = MAX_TEXT_CHARS, what: str = "text frame") -> Any:
    """A client's JSON decoded, its size and nesting checked first; ValueError says what is wrong.

    Every wire decodes what a client sends through this one guard (/ws,
    the Realtime API, Wyoming's headers): the decoder recurses once per
    level, so depth is checked before decoding, never after."""
    if isinstance(text, bytes):
        if len(text) > max_chars:
            raise ValueError(f"{what} of {len(text)} bytes is over the limit of {max_chars}")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{what} is not UTF-8") from None
    if len(text) > max_chars:
        raise ValueError(f"{what} of {len(text)} characters is over the limit of {max_chars}")
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"{what} nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_refuse_constant)  # NaN and Infinity are not JSON
    except ValueError:  # JSONDecodeError, a number over Python's digit limit, NaN
        raise ValueError(f"{what} is not JSON") from None


# --------------------------------------------------------------------------
# What a client gets wrong
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


def too_many_sessions(limit: int, reason: str | None = None) -> ProtocolError:
    """The refusal of a session the server has no room for: at ``limit``, or ``reason`` (its load)."""
    why = reason if reason is not None else f"at its limit of {limit} sessions"
    return ProtocolError(ErrorCode.TOO_MANY_SESSIONS, f"the server is {why}; try again later", fatal=True)


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
    """The audio rates a session runs at on its wire (``session.start`` in v1; fixed in the realtime API)."""

    input_rate: int
    output_rate: int
    client: str


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


class Closing:
    """How a face's connection ends, where the wire says nothing more than an error
    (a face may add a last event of its own: v1's ``session.ended``)."""

    def error(
        self, code: ErrorCode, message: str, *, fatal: bool, at: float | None = None, event: Event | None = None
    ) -> Message:
        raise NotImplementedError

    def ending(self, reason: str) -> Ending:
        """How the connection ends for ``reason`` (a key of :data:`ENDINGS`)."""
        return ENDINGS[reason]

    def refusal(self, error: ProtocolError) -> Ending:
        """How a fatal error closes the connection (a start refused, the server full...)."""
        return fatal(error)

    def final(self, ending: Ending, at: float) -> Message | None:
        """The last event before the close: the fatal error, if that is how it ends."""
        if ending.error is not None:
            code, message = ending.error
            return self.error(code, message, fatal=True, at=at)
        return None


# --------------------------------------------------------------------------
# The interface a face implements, and what it may use
# --------------------------------------------------------------------------


class SessionVerbs(Protocol):
    """What a face may do to its conversation (:class:`assistant.session.Session` implements it)."""

    id: str

    def feed(self, pcm: np.ndarray, arrived: float | None = None) -> None: ...

    def end_input(self) -> None: ...

    @property
    def input_ended(self) -> bool: ...

    def hold_input(self, held: bool) -> None: ...

    def commit_input(self, min_ms: float = 0.0) -> int | None: ...

    def clear_input(self) -> None: ...

    def open_turn(self) -> int: ...

    def add_message(self, role: str, text: str) -> int: ...

    def remove_message(self, turn_id: int, role: str) -> bool: ...

    def message(self, turn_id: int, role: str) -> str | None: ...

    def truncate(self, turn_id: int, heard: str) -> bool: ...

    def respond(self, tools: tuple[ToolSpec, ...] | None = None, choice: ToolChoice | None = None) -> int: ...

    def set_tools(self, tools: tuple[ToolSpec, ...], choice: ToolChoice | None = None) -> None: ...

    def add_call(self, call: ToolCall) -> int: ...

    def add_result(self, call_id: str, output: str) -> int: ...

    def stop_reply(self, turn_id: int, reason: str) -> None: ...

    def playing(self, turn_id: int) -> bool: ...

    def played(self, turn_id: int, samples: int) -> None: ...

    def set_instructions(self, text: str | None) -> None: ...

    def cancel_turn(self, turn_id: int, reason: str = "cancelled") -> bool: ...


class Link(Protocol):
    """What a face may ask of its connection (the I/O side)."""

    def feed(self, pcm16: bytes) -> None:
        """The client's audio (PCM16 at the session's input rate): the input-rate
        limit (a fatal :class:`ProtocolError`), then the session; dropped quietly
        while the server drains for shutdown."""

    def end(self, reason: str) -> None:
        """End the connection the way ``reason`` (a key of :data:`ENDINGS`) says."""

    def heard(self, turn_id: int, voice_to_voice_ms: float) -> None:
        """The client's own measure of voice to voice, for the server's metrics."""


class Face(Protocol):
    """One wire protocol on one connection: its state and its messages, no I/O.

    The connection calls, in order: :meth:`parse_start` (with the first
    message when ``wants_start``, else None), :meth:`bind` once the session
    exists, :meth:`ready` (the greeting); then :meth:`receive` for each
    client message, :meth:`on_event` for each session event,
    :meth:`turn_closed` for each closed turn of the report, and the output's
    audio hooks for reply audio; at the end :meth:`ending` (or
    :meth:`refusal`) and :meth:`final`. Messages are JSON-ready dicts until
    :meth:`encode`; ``origin`` is the session clock's zero. A hook that
    returns None for an audio marker, or for a frame, says the wire has none.
    A client's mistake is a :class:`ProtocolError` raised from
    :meth:`receive`: fatal ones end the connection, the others become
    :meth:`error` messages.
    """

    origin: float
    wants_start: bool

    def parse_start(self, frame: str | bytes | None, default_input: int, default_output: int) -> SessionStart: ...

    def bind(self, session: SessionVerbs, link: Link) -> None: ...

    def ready(self, session_id: str, start: SessionStart, frame_ms: int, budgets_ms: dict[str, float]) -> Message: ...

    def receive(self, message: str | bytes) -> list[Message]: ...

    def on_event(self, event: Event) -> list[Message]: ...

    def turn_closed(self, turn_id: int, data: dict[str, Any]) -> list[Message]: ...

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


@dataclass(frozen=True)
class Route:
    """One row of the listener's route table: a websocket path and the face spoken there.

    ``face`` builds the face for a new connection from the config and the
    handshake request. ``subprotocols``: those the face accepts (the first a
    client offers is chosen). ``credential``: where the wire carries the
    token other than ``Authorization: Bearer`` or ``?token=`` (the realtime
    API's browser subprotocol), or None.
    """

    path: str
    face: Callable[[Config, Request | None, float], Face]
    subprotocols: tuple[str, ...] = ()
    credential: Callable[[Any], str | None] | None = None
