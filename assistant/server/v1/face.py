"""Protocol v1's face: what a ``/ws`` client's messages do to its session.

:class:`V1Face` is :class:`~assistant.server.v1.codec.ProtocolV1` (the
messages) plus the one thing it adds, acting on what the client sends:
audio to the session's input, the client's playback position and its own
voice-to-voice figure, the end of its input or of the session. Everything
goes through the session's verbs and the connection's
:class:`~assistant.server.face.Link`; nothing here does I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.frames import Event

from ..face import Link, Message, Route, SessionVerbs
from .codec import InputEnd, PlaybackHeard, PlaybackPosition, ProtocolV1, SessionEnd

if TYPE_CHECKING:
    from websockets.http11 import Request

    from ...config import Config

WS_PATH = "/ws"


class V1Face(ProtocolV1):
    """Protocol v1 on one connection; implements :class:`~assistant.server.face.Face`."""

    wants_start = True  # the first message is session.start

    def __init__(self, origin: float, pipeline_rate: int) -> None:
        super().__init__(origin, pipeline_rate)
        self._session: SessionVerbs | None = None
        self._link: Link | None = None
        self._client_ended = False  # the client sent input.end

    def bind(self, session: SessionVerbs, link: Link) -> None:
        self._session, self._link = session, link

    def receive(self, message: str | bytes) -> list[Message]:
        assert self._session is not None and self._link is not None, "bind() first"
        if isinstance(message, bytes):
            self.check_audio(message, self._client_ended)
            if message:
                self._link.feed(message)
            return []
        match self.parse(message):
            case PlaybackPosition(turn_id=turn_id, samples=samples):
                self._session.played(turn_id, samples)
            case PlaybackHeard(turn_id=turn_id, voice_to_voice_ms=heard):
                self._link.heard(turn_id, heard)
            case InputEnd():
                self._client_ended = True
                self._session.end_input()
            case SessionEnd():
                self._link.end("session_end")
        return []

    def on_event(self, event: Event) -> list[Message]:
        message = self.message_of(event)
        return [message] if message is not None else []

    def turn_closed(self, turn_id: int, data: dict[str, Any]) -> list[Message]:
        return [self.turn_metrics(turn_id, data)]


def v1_face(config: Config, request: Request | None, origin: float) -> V1Face:
    return V1Face(origin, config.audio.output_rate)


ROUTE = Route(WS_PATH, v1_face)
