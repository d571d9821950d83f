"""The OpenAI Realtime API's face: what a ``/v1/realtime`` client's events do to its session.

It is the same session as ``/ws`` (the same pipeline, barge-in, endpointing
and budgets), spoken in OpenAI's events. There is no ``session.start``: the
session opens at once with ``session.created``, at 24 kHz both ways. Under
server VAD (``server_vad`` and ``semantic_vad`` alike) appended audio is
fed to the session as ``/ws`` audio is; with ``turn_detection: null`` the
session holds it until ``input_audio_buffer.commit`` makes it a user turn.
Items go into the history and responses start and stop through the
session's verbs; :class:`RealtimeFace` keeps no buffer, task or turn id of
its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, urlsplit

from pipeline.frames import Event

from ..face import Link, Message, Route, SessionStart, SessionVerbs
from .codec import (
    DEFAULT_MAX_INSTRUCTIONS,
    INSTRUCTIONS_CHARS_PER_TOKEN,
    RATE,
    SUBPROTOCOL,
    AudioAppend,
    AudioClear,
    AudioCommit,
    CallCreate,
    CallOutputCreate,
    Ignored,
    ItemCreate,
    ItemDelete,
    ItemRetrieve,
    ItemTruncate,
    RealtimeError,
    RealtimeRequest,
    ResponseCancel,
    ResponseCreate,
    ServerEvent,
    SessionUpdate,
    _bad,
    subprotocol_key,
)
from .state import RealtimeProtocol

if TYPE_CHECKING:
    from websockets.http11 import Request

    from ...config import Config

REALTIME_PATH: Final = "/v1/realtime"
MIN_COMMIT_MS: Final = 100  # a shorter committed buffer is input_audio_buffer_commit_empty


class RealtimeFace(RealtimeProtocol):
    """The realtime API on one connection; implements :class:`~assistant.server.face.Face`."""

    wants_start = False  # the session opens at once

    def __init__(self, origin: float, pipeline_rate: int, model: str, instructions: str, agent: str = "",
                 max_instructions: int = DEFAULT_MAX_INSTRUCTIONS) -> None:
        super().__init__(origin, pipeline_rate, model, instructions, max_instructions)
        self.agent = agent
        self._session: SessionVerbs | None = None
        self._link: Link | None = None

    def parse_start(self, frame: str | bytes | None, default_input: int, default_output: int) -> SessionStart:
        return SessionStart(RATE, RATE, f"realtime {self.agent}".strip()[:80])

    def bind(self, session: SessionVerbs, link: Link) -> None:
        self._session, self._link = session, link

    def on_event(self, event: Event) -> list[Message]:
        return self.events(event)

    def turn_closed(self, turn_id: int, data: dict[str, Any]) -> list[Message]:
        return []  # no turn.metrics on this wire (the report still has them)

    def receive(self, message: str | bytes) -> list[Message]:
        if isinstance(message, bytes):
            raise RealtimeError("invalid_value", "binary frames are not part of this protocol; "
                                "send input_audio_buffer.append")
        try:
            return self.act(self.parse(message))
        except RealtimeError as exc:
            return [self.refused(exc)]

    def act(self, request: RealtimeRequest) -> list[Message]:
        """What one request does to the session, and the events that say so."""
        session, link = self._session, self._link
        assert session is not None and link is not None, "bind() first"
        match request:
            case SessionUpdate(config=config):
                manual = config.turn_detection is None
                if manual != (self.config.turn_detection is None):
                    session.hold_input(manual)
                session.set_instructions(config.instructions or None)
                if (config.tools, config.tool_choice) != (self.config.tools, self.config.tool_choice):
                    session.set_tools(config.tools, config.tool_choice)
                return [self.updated(config)]
            case AudioAppend(pcm=pcm):
                link.feed(pcm)  # to the VAD, or held for the commit (turn_detection null)
            case AudioCommit(event_id=event_id):
                if self.config.turn_detection is not None:
                    return []  # the server ends turns itself
                turn_id = session.commit_input(MIN_COMMIT_MS)
                if turn_id is None:
                    raise _bad("the input audio buffer holds less than 100 ms of audio", None, event_id,
                               "input_audio_buffer_commit_empty")
                return self.committed(turn_id)
            case AudioClear():
                session.clear_input()
                return [self._msg(ServerEvent.CLEARED)]
            case ItemCreate(item_id=wanted, role=role, text=text, event_id=event_id):
                if not text:
                    raise _bad("the item has no text (images and audio parts are not supported)", "item.content",
                               event_id)
                turn_id = session.add_message(role, text)
                return self.text_item(self.item_id(wanted), turn_id, role, text)
            case CallOutputCreate(item_id=wanted, call_id=call_id, output=output):
                turn_id = session.add_result(call_id, output)
                return self.call_output_item(self.item_id(wanted), turn_id, call_id, output)
            case CallCreate(item_id=wanted, call=call):
                turn_id = session.add_call(call)
                return self.call_item(self.item_id(wanted), turn_id, call.call_id, call.name, call.arguments)
            case ItemTruncate(item_id=item_id, audio_end_ms=end, event_id=event_id):
                reply = self.reply_of(item_id)
                if reply is None:
                    raise _bad(f"no assistant item {item_id[:64]!r} to truncate", "item_id", event_id,
                               "item_truncate_invalid_item_id")
                if reply.active and session.playing(reply.turn_id):
                    # Still playing: cut where the client says it is, as a barge-in would.
                    session.played(reply.turn_id, end * RATE // 1000)
                    self.cancelling(reply, "client_cancelled")
                    session.stop_reply(reply.turn_id, "truncated by the client")
                else:
                    session.truncate(reply.turn_id, self.heard_at(reply, end))
                return [self.truncated(item_id, end)]
            case ItemDelete(item_id=item_id, event_id=event_id):
                if item_id not in self.items:
                    raise _bad(f"no item {item_id[:64]!r}", "item_id", event_id, "item_delete_invalid_item_id")
                turn_id, role = self.items[item_id]
                reply = self.reply_of(item_id)
                if reply is not None and reply.active:
                    self.cancelling(reply, "client_cancelled")
                    session.stop_reply(turn_id, "deleted by the client")
                session.remove_message(turn_id, role)
                return [self.forget(item_id)]
            case ItemRetrieve(item_id=item_id, event_id=event_id):
                if item_id not in self.items:
                    raise _bad(f"no item {item_id[:64]!r}", "item_id", event_id, "item_retrieve_invalid_item_id")
                turn_id, role = self.items[item_id]
                return [self.retrieved(item_id, session.message(turn_id, role))]
            case ResponseCreate(output_modalities=modalities, tools=tools, tool_choice=choice, event_id=event_id):
                if self.active() is not None:
                    raise _bad("a response is already in progress", None, event_id,
                               "conversation_already_has_active_response")
                offered = tools if tools is not None else self.config.tools
                # The session's forced choice is not forced again on the response
                # that follows a call's output (the session does the same).
                after_output = self._last_item is not None and self.items.get(self._last_item, (0, ""))[1] == "tool"
                forced = bool(offered) and (choice.forced if choice is not None
                                            else self.config.tool_choice.forced and not after_output)
                turn_id = session.respond(tools, choice)
                return self.start_response(turn_id, modalities, tools=tuple(t.name for t in offered), calls_only=forced)
            case ResponseCancel(response_id=response_id, event_id=event_id):
                reply = self.active(response_id)
                if reply is None:
                    if self.was_cancelled(response_id):
                        return []  # the second of a client's cancel/truncate pair
                    raise _bad("there is no active response to cancel", None, event_id, "response_cancel_not_active")
                self.cancelling(reply, "client_cancelled")
                session.stop_reply(reply.turn_id, "cancelled by the client")
            case Ignored():
                pass
        return []


def realtime_face(config: Config, request: Request | None, origin: float) -> RealtimeFace:
    """The face for a handshake: the model the client named (``?model=``) and its User-Agent."""
    query = parse_qs(urlsplit(request.path if request is not None else "").query)
    model = (query.get("model") or ["local-model"])[0][:80]
    agent = request.headers.get("User-Agent", "") if request is not None else ""
    return RealtimeFace(origin, config.audio.output_rate, model, config.llm.system_prompt, agent,
                        config.llm.max_model_len * INSTRUCTIONS_CHARS_PER_TOKEN)


ROUTE = Route(REALTIME_PATH, realtime_face, subprotocols=(SUBPROTOCOL,), credential=subprotocol_key)
