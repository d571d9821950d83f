"""The websocket protocol, version 1, as the server reads it.

docs/protocol.md is the contract; this module holds what the server checks
on the wire: the version, the sample rates a session may ask for,
``session.start`` validation, the input-rate limit, and how each way a
session ends maps to a ``session.ended`` reason, an error event and a
close code. Nothing here touches a socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from pipeline.frames import now

PROTOCOL_VERSION: Final = 1
MIN_RATE, MAX_RATE = 8000, 48000
RATE_WINDOW_S: Final = 2.0  # the input rate check's burst allowance, in seconds of wall clock


class ProtocolError(Exception):
    """A client message the protocol does not allow: becomes an ``error`` event."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class SessionStart:
    """What a client asked for in ``session.start``."""

    input_rate: int
    output_rate: int
    client: str


def parse_start(text: str | bytes, default_input: int, default_output: int) -> SessionStart:
    """Validate the first message; raise a fatal ``protocol`` error if it is not a session.start."""
    if isinstance(text, bytes):
        raise ProtocolError("protocol", "the first message must be session.start (got audio)", fatal=True)
    try:
        message = json.loads(text)
    except ValueError:
        raise ProtocolError("protocol", "the first message must be session.start (got text that is not JSON)", True) from None
    if not isinstance(message, dict) or message.get("type") != "session.start":
        kind = message.get("type") if isinstance(message, dict) else type(message).__name__
        raise ProtocolError("protocol", f"the first message must be session.start (got {kind!r})", fatal=True)
    if message.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(
            "protocol", f"unsupported protocol {message.get('protocol')!r}; this server speaks {PROTOCOL_VERSION}", True
        )
    rates = []
    for key, default in (("input_rate", default_input), ("output_rate", default_output)):
        value = message.get(key, default)
        if type(value) is not int or not MIN_RATE <= value <= MAX_RATE:
            raise ProtocolError("protocol", f"{key}: expected an integer from {MIN_RATE} to {MAX_RATE}, got {value!r}", True)
        rates.append(value)
    client = message.get("client", "")
    if not isinstance(client, str):
        raise ProtocolError("protocol", f"client: expected a string, got {client!r}", fatal=True)
    return SessionStart(input_rate=rates[0], output_rate=rates[1], client=client[:80])


class InputRateLimit:
    """A token bucket of audio seconds: refills at ``rate`` x real time.

    It holds ``rate * window_s`` seconds, so a client that sends in bursts
    (network hiccups, big messages) is fine while one that streams faster
    than ``rate`` x real time runs dry within a few seconds.
    """

    def __init__(self, rate: float, window_s: float = RATE_WINDOW_S) -> None:
        self.rate = rate
        self.capacity = max(rate * window_s, 1.0)
        self._tokens = self.capacity
        self._at = now()

    def take(self, seconds: float, at: float) -> bool:
        self._tokens = min(self.capacity, self._tokens + (at - self._at) * self.rate)
        self._at = at
        self._tokens -= seconds
        return self._tokens >= 0


@dataclass(frozen=True)
class Ending:
    """How a session ends: the event it is told, and the close code."""

    close_code: int
    ended_reason: str | None  # session.ended's reason; None: no session.ended
    error: tuple[str, str] | None = None  # a fatal error event (code, message) instead
    cancel_turns: bool = True


ENDINGS: Final[dict[str, Ending]] = {
    "input_ended": Ending(1000, "input_ended", cancel_turns=False),
    "session_end": Ending(1000, "session_end"),
    "idle_timeout": Ending(1000, "idle_timeout"),
    "shutdown": Ending(1001, "shutdown"),
    "disconnected": Ending(1006, None),
    "input_rate": Ending(1008, None, ("input_rate", "audio is arriving faster than the server allows")),
    "internal": Ending(1011, None, ("internal", "internal server error; the session is closed")),
}
