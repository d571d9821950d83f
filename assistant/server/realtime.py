"""The OpenAI Realtime API (GA) on ``/v1/realtime``: every message of that wire.

Real clients (the ``openai`` SDK's ``client.realtime.connect``, the Agents
SDK's ``OpenAIRealtimeWebSocket``, Pipecat, LiveKit) can be pointed at this
server instead of OpenAI's. It is the same session as ``/ws`` (the same
pipeline, barge-in, endpointing and budgets), spoken in OpenAI's events:
docs/protocol.md ("OpenAI Realtime API") lists the subset and how it differs.

* :class:`RealtimeProtocol`, one per connection, parses the client's JSON
  events into typed requests and turns the session's pipeline events
  (:mod:`pipeline.frames`) into OpenAI's server events, in the order and
  with the fields strict clients validate. It sends no event type of its
  own: Pipecat rejects unknown ones.
* :class:`RealtimeConnection` is the server's connection
  (:mod:`assistant.server.server`) with no ``session.start``: it acts on
  those requests (audio into the pipeline or a manual buffer, items into
  the history, responses started and stopped through the turn controller).

Audio on this wire is PCM16 at 24 kHz, base64 in JSON both ways; the
pipeline hears 16 kHz and speaks the TTS rate, so both directions go
through :class:`audio.resample.Resampler` (the output's own, for replies).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import itertools
import json
import logging
import secrets
from collections import deque
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers

from audio.resample import Resampler
from pipeline import frames
from pipeline.frames import Event, now

from .protocol import ENDINGS, Ending, ErrorCode, Message, ProtocolError, SessionStart, encode, fatal
from .server import Server, _Connection, audio_bucket

log = logging.getLogger("assistant.server")

REALTIME_PATH: Final = "/v1/realtime"
RATE: Final = 24000  # the only PCM rate the GA API has
SUBPROTOCOL: Final = "realtime"
KEY_PREFIX: Final = "openai-insecure-api-key."
FORMAT: Final = {"type": "audio/pcm", "rate": RATE}
MAX_TOKENS_LIMIT: Final = 4096
RECENT_CANCELLED: Final = 16  # cancelled responses remembered, so a repeated cancel is no error


class ClientEvent(StrEnum):
    """The client events this endpoint acts on."""

    SESSION_UPDATE = "session.update"
    AUDIO_APPEND = "input_audio_buffer.append"
    AUDIO_COMMIT = "input_audio_buffer.commit"
    AUDIO_CLEAR = "input_audio_buffer.clear"
    ITEM_CREATE = "conversation.item.create"
    ITEM_TRUNCATE = "conversation.item.truncate"
    ITEM_DELETE = "conversation.item.delete"
    ITEM_RETRIEVE = "conversation.item.retrieve"
    RESPONSE_CREATE = "response.create"
    RESPONSE_CANCEL = "response.cancel"


IGNORED_CLIENT_EVENTS: Final = frozenset({"output_audio_buffer.clear"})
"""Accepted and ignored: WebRTC's playback buffer, which a websocket client holds itself."""


class ServerEvent(StrEnum):
    """Every server event this endpoint sends (all of them OpenAI's)."""

    SESSION_CREATED = "session.created"
    SESSION_UPDATED = "session.updated"
    SPEECH_STARTED = "input_audio_buffer.speech_started"
    SPEECH_STOPPED = "input_audio_buffer.speech_stopped"
    COMMITTED = "input_audio_buffer.committed"
    CLEARED = "input_audio_buffer.cleared"
    ITEM_ADDED = "conversation.item.added"
    ITEM_DONE = "conversation.item.done"
    ITEM_TRUNCATED = "conversation.item.truncated"
    ITEM_DELETED = "conversation.item.deleted"
    ITEM_RETRIEVED = "conversation.item.retrieved"
    TRANSCRIPTION_DELTA = "conversation.item.input_audio_transcription.delta"
    TRANSCRIPTION_COMPLETED = "conversation.item.input_audio_transcription.completed"
    RESPONSE_CREATED = "response.created"
    OUTPUT_ITEM_ADDED = "response.output_item.added"
    OUTPUT_ITEM_DONE = "response.output_item.done"
    PART_ADDED = "response.content_part.added"
    PART_DONE = "response.content_part.done"
    AUDIO_DELTA = "response.output_audio.delta"
    AUDIO_DONE = "response.output_audio.done"
    AUDIO_TRANSCRIPT_DELTA = "response.output_audio_transcript.delta"
    AUDIO_TRANSCRIPT_DONE = "response.output_audio_transcript.done"
    TEXT_DELTA = "response.output_text.delta"
    TEXT_DONE = "response.output_text.done"
    RESPONSE_DONE = "response.done"
    ERROR = "error"


# --------------------------------------------------------------------------
# Handshake: the browser's subprotocols
# --------------------------------------------------------------------------


def is_realtime(path: str) -> bool:
    return urlsplit(path).path == REALTIME_PATH


def select_subprotocol(ws: ServerConnection, offered: Any) -> str | None:
    """``realtime`` when a browser offers it (it refuses the socket otherwise);
    none for the SDKs, which offer none (requiring one refused them with 400)."""
    return SUBPROTOCOL if SUBPROTOCOL in offered and is_realtime(ws.request.path if ws.request else "") else None


def subprotocol_key(headers: Headers) -> str | None:
    """The API key a browser passes as the ``openai-insecure-api-key.<key>`` subprotocol."""
    for header in headers.get_all("Sec-WebSocket-Protocol"):
        for offered in header.split(","):
            offered = offered.strip()
            if offered.startswith(KEY_PREFIX):
                return offered[len(KEY_PREFIX):]
    return None


# --------------------------------------------------------------------------
# Client events, parsed
# --------------------------------------------------------------------------


class RealtimeError(ProtocolError):
    """A client event this endpoint refuses: an ``error`` event, and the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None) -> None:
        super().__init__(ErrorCode.BAD_MESSAGE, message)
        self.realtime_code = code
        self.param = param
        self.event_id = event_id


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """The session as the client configured it (what ``session.updated`` echoes)."""

    model: str
    instructions: str
    output_modalities: tuple[str, ...] = ("audio",)
    # None: manual turns (commit + response.create). server_vad and
    # semantic_vad both run this server's VAD with its words-aware endpointing.
    turn_detection: dict[str, Any] | None = field(
        default_factory=lambda: {"type": "server_vad", "create_response": True, "interrupt_response": True}
    )
    voice: str = "piper"
    speed: float = 1.0
    transcription: dict[str, Any] | None = None
    noise_reduction: dict[str, Any] | None = None
    max_output_tokens: int | str = "inf"

    @property
    def audio_out(self) -> bool:
        return "audio" in self.output_modalities


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    event_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionUpdate(Request):
    config: SessionConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioAppend(Request):
    pcm: bytes  # PCM16 at 24 kHz


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioCommit(Request):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class AudioClear(Request):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemCreate(Request):
    item_id: str | None
    role: str  # user | assistant
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemTruncate(Request):
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemDelete(Request):
    item_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemRetrieve(Request):
    item_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseCreate(Request):
    output_modalities: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseCancel(Request):
    response_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ignored(Request):
    pass


RealtimeRequest = (
    SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreate | ItemTruncate | ItemDelete | ItemRetrieve
    | ResponseCreate | ResponseCancel | Ignored
)


def _bad(message: str, param: str | None = None, event_id: str | None = None, code: str = "invalid_value") -> RealtimeError:
    return RealtimeError(code, message, param, event_id)


def _modalities(value: Any, param: str, event_id: str | None) -> tuple[str, ...]:
    if value not in (["audio"], ["text"]):
        raise _bad('output_modalities must be ["audio"] or ["text"]', param, event_id)
    return tuple(value)


def _format(value: Any, param: str, event_id: str | None) -> None:
    if not isinstance(value, dict) or value.get("type") not in ("audio/pcm", "pcm16") or value.get("rate", RATE) != RATE:
        raise _bad(f'only {{"type": "audio/pcm", "rate": {RATE}}} is supported', param, event_id)


def parse_session(config: SessionConfig, session: Any, event_id: str | None) -> SessionConfig:
    """``session.update``: only the fields present change; tools, tracing and the like are ignored."""
    if not isinstance(session, dict):
        raise _bad("session must be an object", "session", event_id, "invalid_type")
    if session.get("type", "realtime") != "realtime":
        raise _bad("only realtime sessions are supported (not transcription)", "session.type", event_id)
    changes: dict[str, Any] = {}
    if "instructions" in session:
        if not isinstance(session["instructions"], str):
            raise _bad("instructions must be a string", "session.instructions", event_id, "invalid_type")
        changes["instructions"] = session["instructions"]
    if "output_modalities" in session:
        changes["output_modalities"] = _modalities(session["output_modalities"], "session.output_modalities", event_id)
    if "model" in session and isinstance(session["model"], str):
        changes["model"] = session["model"]
    if "max_output_tokens" in session:
        value = session["max_output_tokens"]
        if value != "inf" and (type(value) is not int or not 1 <= value <= MAX_TOKENS_LIMIT):
            raise _bad(f'max_output_tokens must be 1-{MAX_TOKENS_LIMIT} or "inf"', "session.max_output_tokens", event_id)
        changes["max_output_tokens"] = value
    audio = session.get("audio")
    if audio is not None and not isinstance(audio, dict):
        raise _bad("audio must be an object", "session.audio", event_id, "invalid_type")
    audio_in = (audio or {}).get("input") or {}
    audio_out = (audio or {}).get("output") or {}
    if not isinstance(audio_in, dict) or not isinstance(audio_out, dict):
        raise _bad("audio.input and audio.output must be objects", "session.audio", event_id, "invalid_type")
    for where, part in (("input", audio_in), ("output", audio_out)):
        if "format" in part:
            _format(part["format"], f"session.audio.{where}.format", event_id)
    if "turn_detection" in audio_in:
        detection = audio_in["turn_detection"]
        if detection is not None:
            if not isinstance(detection, dict) or detection.get("type") not in ("server_vad", "semantic_vad"):
                raise _bad("turn_detection must be server_vad, semantic_vad or null",
                           "session.audio.input.turn_detection.type", event_id)
            detection = {"create_response": True, "interrupt_response": True, **detection}
        changes["turn_detection"] = detection
    for key in ("transcription", "noise_reduction"):
        if key in audio_in and (audio_in[key] is None or isinstance(audio_in[key], dict)):
            changes[key] = audio_in[key]
    if isinstance(audio_out.get("voice"), str):
        changes["voice"] = audio_out["voice"]
    if isinstance(audio_out.get("speed"), int | float):
        changes["speed"] = float(audio_out["speed"])
    return replace(config, **changes)


def _item_text(item: Any, event_id: str | None) -> tuple[str | None, str, str]:
    """A message item's (id, role, text): text parts joined; images and audio parts ignored."""
    if not isinstance(item, dict):
        raise _bad("item must be an object", "item", event_id, "invalid_type")
    if item.get("type") != "message":
        raise _bad("only message items are supported (no function calls: tools are not)", "item.type", event_id)
    role = item.get("role")
    if role not in ("user", "assistant"):
        raise _bad("item.role must be user or assistant (system text goes in instructions)", "item.role", event_id)
    content = item.get("content")
    if not isinstance(content, list):
        raise _bad("item.content must be a list", "item.content", event_id, "invalid_type")
    texts = [part.get("text") for part in content
             if isinstance(part, dict) and part.get("type") in ("input_text", "text", "output_text")]
    if not all(isinstance(t, str) for t in texts):
        raise _bad("a text part's text must be a string", "item.content", event_id, "invalid_type")
    item_id = item.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not 0 < len(item_id) <= 64):
        raise _bad("item.id must be a string of up to 64 characters", "item.id", event_id)
    return item_id, role, " ".join(t.strip() for t in texts if t.strip())


def parse(text: str, config: SessionConfig) -> RealtimeRequest:
    """One client event as a typed request, or a :class:`RealtimeError`."""
    try:
        event = json.loads(text)
    except ValueError:
        raise _bad("the event is not valid JSON", code="invalid_json") from None
    if not isinstance(event, dict):
        raise _bad("an event must be a JSON object with a type", code="invalid_json")
    event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
    kind = event.get("type")
    if not isinstance(kind, str):
        raise _bad("the event has no type", "type", event_id, "missing_required_parameter")
    if kind in IGNORED_CLIENT_EVENTS:
        return Ignored(event_id=event_id)
    try:
        known = ClientEvent(kind)
    except ValueError:
        raise _bad(f"unsupported event type {kind[:60]!r}", "type", event_id) from None
    match known:
        case ClientEvent.SESSION_UPDATE:
            return SessionUpdate(config=parse_session(config, event.get("session"), event_id), event_id=event_id)
        case ClientEvent.AUDIO_APPEND:
            audio = event.get("audio")
            if not isinstance(audio, str):
                raise _bad("audio must be a base64 string", "audio", event_id, "missing_required_parameter")
            try:
                pcm = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError):
                raise _bad("audio is not valid base64", "audio", event_id) from None
            if len(pcm) % 2:
                raise _bad("audio must be PCM16: an even number of bytes", "audio", event_id)
            return AudioAppend(pcm=pcm, event_id=event_id)
        case ClientEvent.AUDIO_COMMIT:
            return AudioCommit(event_id=event_id)
        case ClientEvent.AUDIO_CLEAR:
            return AudioClear(event_id=event_id)
        case ClientEvent.ITEM_CREATE:
            item_id, role, item_text = _item_text(event.get("item"), event_id)
            return ItemCreate(item_id=item_id, role=role, text=item_text, event_id=event_id)
        case ClientEvent.ITEM_TRUNCATE:
            item_id, end = event.get("item_id"), event.get("audio_end_ms")
            if not isinstance(item_id, str) or type(end) is not int or end < 0:
                raise _bad("truncate needs item_id and audio_end_ms (an integer >= 0)", "audio_end_ms", event_id)
            return ItemTruncate(item_id=item_id, audio_end_ms=end, event_id=event_id)
        case ClientEvent.ITEM_DELETE:
            item_id = event.get("item_id")
            if not isinstance(item_id, str):
                raise _bad("delete needs item_id", "item_id", event_id, "missing_required_parameter")
            return ItemDelete(item_id=item_id, event_id=event_id)
        case ClientEvent.ITEM_RETRIEVE:
            item_id = event.get("item_id")
            if not isinstance(item_id, str):
                raise _bad("retrieve needs item_id", "item_id", event_id, "missing_required_parameter")
            return ItemRetrieve(item_id=item_id, event_id=event_id)
        case ClientEvent.RESPONSE_CREATE:
            response = event.get("response") or {}
            if not isinstance(response, dict):
                raise _bad("response must be an object", "response", event_id, "invalid_type")
            modalities = response.get("output_modalities")
            if modalities is not None:
                modalities = _modalities(modalities, "response.output_modalities", event_id)
            return ResponseCreate(output_modalities=modalities, event_id=event_id)
        case ClientEvent.RESPONSE_CANCEL:
            response_id = event.get("response_id")
            return ResponseCancel(response_id=response_id if isinstance(response_id, str) else None, event_id=event_id)
    raise AssertionError(known)


# --------------------------------------------------------------------------
# The per-connection state behind the server events
# --------------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


@dataclass(slots=True)
class _Heard:
    """A user item: a turn the VAD opened, or a buffer the client committed."""

    item_id: str
    turn_id: int
    stopped: bool = False  # speech_stopped, committed and item.added sent
    done: bool = False  # transcription.completed and item.done sent
    partial: str = ""  # the transcript sent as deltas so far


@dataclass(slots=True)
class _Reply:
    """One turn's reply: written by the model before, a response once the turn is the user's for sure."""

    turn_id: int
    tokens: list[str] = field(default_factory=list)
    text: str | None = None  # the model's whole reply (LLMDone)
    output_tokens: int = 0
    response_id: str | None = None  # response.created sent
    item_id: str = ""
    modalities: tuple[str, ...] = ("audio",)
    hold: bool = False  # the response began at the final transcript: deltas wait one event (see events())
    sent: int = 0  # tokens sent as deltas
    audio_samples: int = 0  # 24 kHz samples sent
    status: str | None = None  # set when response.done is sent
    reason: str | None = None  # a cancel's reason: turn_detected / client_cancelled
    heard: tuple[str, float] | None = None  # (heard text, its ms) when it was stopped mid-play

    @property
    def active(self) -> bool:
        return self.response_id is not None and self.status is None

    @property
    def written(self) -> str:
        return self.text if self.text is not None else "".join(self.tokens).strip()


class RealtimeProtocol:
    """OpenAI's Realtime events on one connection: parses the client's, builds every server event.

    Implements the server's :class:`~assistant.server.protocol.WireProtocol`
    where the connection uses it (the greeting, errors, endings, reply
    audio); :meth:`events` replaces ``on_event``, since one pipeline event
    may be several of OpenAI's.
    """

    def __init__(self, origin: float, pipeline_rate: int, model: str, instructions: str) -> None:
        self.origin = origin
        self.pipeline_rate = pipeline_rate
        self.config = SessionConfig(model=model, instructions=instructions)
        self.session_id = _id("sess")
        self.conversation_id = _id("conv")
        self._events = itertools.count(1)
        self._heard: dict[int, _Heard] = {}
        self._replies: dict[int, _Reply] = {}
        self.items: dict[str, tuple[int, str]] = {}  # item id -> (turn, role)
        self._bodies: dict[str, Message] = {}  # item id -> the item as last sent (for retrieve)
        self._last_item: str | None = None
        self._audio_turn: int | None = None
        self._cancelled: deque[str] = deque(maxlen=RECENT_CANCELLED)

    # ---- the WireProtocol side ------------------------------------------

    def encode(self, message: Message) -> str:
        return encode(message)

    def _msg(self, kind: ServerEvent, **fields: Any) -> Message:
        return {"type": kind, "event_id": f"event_{self.session_id[5:13]}{next(self._events):06d}", **fields}

    def parse(self, text: str) -> RealtimeRequest:
        return parse(text, self.config)

    def check_audio(self, data: bytes, input_closed: bool) -> None:
        """Appended audio (already decoded): PCM16."""
        if len(data) % 2:
            raise _bad("audio must be PCM16: an even number of bytes", "audio")

    def session(self) -> Message:
        """The effective session, as session.created/updated carry it."""
        c = self.config
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": self.session_id,
            "model": c.model,
            "output_modalities": list(c.output_modalities),
            "instructions": c.instructions,
            "audio": {
                "input": {"format": FORMAT, "transcription": c.transcription, "noise_reduction": c.noise_reduction,
                          "turn_detection": c.turn_detection},
                "output": {"format": FORMAT, "voice": c.voice, "speed": c.speed},
            },
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": c.max_output_tokens,
            "tracing": None,
            "prompt": None,
            "expires_at": 0,
        }

    def ready(self, session_id: str, start: SessionStart, frame_ms: int, budgets_ms: dict[str, float]) -> Message:
        return self._msg(ServerEvent.SESSION_CREATED, session=self.session())

    def updated(self, config: SessionConfig) -> Message:
        self.config = config
        return self._msg(ServerEvent.SESSION_UPDATED, session=self.session())

    def error(
        self, code: ErrorCode | str, message: str, *, fatal: bool = False, at: float | None = None,
        event: Event | None = None, param: str | None = None, event_id: str | None = None,
    ) -> Message:
        kind = "server_error" if code in (ErrorCode.INTERNAL, ErrorCode.STAGE_FAILED) else "invalid_request_error"
        return self._msg(ServerEvent.ERROR, error={"type": kind, "code": str(code), "message": message,
                                                   "param": param, "event_id": event_id})

    def refused(self, exc: RealtimeError) -> Message:
        return self.error(exc.realtime_code, exc.message, param=exc.param, event_id=exc.event_id)

    def audio_start(self, turn_id: int, sample_rate: int, at: float) -> None:
        self._audio_turn = turn_id

    def audio(self, pcm16: bytes) -> str | None:
        """A paced reply frame as ``response.output_audio.delta``; dropped once its response is done
        (a budget's apology after a cancel) or when the response is text only."""
        reply = self._replies.get(self._audio_turn) if self._audio_turn is not None else None
        if reply is None or not reply.active or "audio" not in reply.modalities:
            return None
        reply.audio_samples += len(pcm16) // 2
        return encode(self._msg(ServerEvent.AUDIO_DELTA, **self._where(reply),
                                delta=base64.b64encode(pcm16).decode("ascii")))

    def audio_end(self, turn_id: int, samples: int, at: float) -> None:
        return None

    def turn_metrics(self, turn_id: int, data: dict[str, Any]) -> None:
        return None

    def ending(self, reason: str) -> Ending:
        return ENDINGS[reason]

    def refusal(self, error: ProtocolError) -> Ending:
        return fatal(error)

    def final(self, ending: Ending, at: float) -> Message | None:
        """Only a fatal error precedes the close: this protocol has no session.ended."""
        if ending.error is not None:
            code, message = ending.error
            return self.error(code, message, fatal=True)
        return None

    @property
    def open_turns(self) -> list[int]:
        return sorted({h.turn_id for h in self._heard.values() if not h.done}
                      | {r.turn_id for r in self._replies.values() if r.active})

    # ---- items ----------------------------------------------------------

    def _keep(self, item: Message) -> Message:
        """An item as it is sent: what ``conversation.item.retrieve`` starts from."""
        self._bodies[item["id"]] = item
        return item

    def _add_item(self, item_id: str, turn_id: int, role: str) -> str | None:
        previous, self._last_item = self._last_item, item_id
        self.items[item_id] = (turn_id, role)
        return previous

    def item_id(self, wanted: str | None) -> str:
        return wanted if wanted and wanted not in self.items else _id("item")

    @staticmethod
    def _user_item(item_id: str, status: str, transcript: str | None) -> Message:
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": status,
                "content": [{"type": "input_audio", "transcript": transcript}]}

    def text_item(self, item_id: str, turn_id: int, role: str, text: str) -> list[Message]:
        """A message the client created: added and done at once."""
        previous = self._add_item(item_id, turn_id, role)
        part = {"type": "input_text", "text": text} if role == "user" else {"type": "output_text", "text": text}
        item = self._keep({"id": item_id, "object": "realtime.item", "type": "message", "role": role,
                           "status": "completed", "content": [part]})
        return [self._msg(ServerEvent.ITEM_ADDED, previous_item_id=previous, item=item),
                self._msg(ServerEvent.ITEM_DONE, previous_item_id=previous, item=item)]

    def committed(self, turn_id: int, audio_end_ms: float | None = None, item_id: str | None = None) -> list[Message]:
        """The user's audio is an item now (the VAD ended the turn, or the client committed)."""
        heard = self._heard.get(turn_id)
        if heard is None:
            heard = self._heard[turn_id] = _Heard(item_id or _id("item"), turn_id)
        if heard.stopped:
            return []
        heard.stopped = True
        out = []
        if audio_end_ms is not None:
            out.append(self._msg(ServerEvent.SPEECH_STOPPED, audio_end_ms=int(audio_end_ms), item_id=heard.item_id))
        previous = self._add_item(heard.item_id, turn_id, "user")
        out.append(self._msg(ServerEvent.COMMITTED, previous_item_id=previous, item_id=heard.item_id))
        out.append(self._msg(ServerEvent.ITEM_ADDED, previous_item_id=previous,
                             item=self._keep(self._user_item(heard.item_id, "in_progress", None))))
        return out

    def transcribed(self, turn_id: int, text: str, seconds: float = 0.0) -> list[Message]:
        heard = self._heard.get(turn_id)
        if heard is None or heard.done:
            return []
        out = self.committed(turn_id)
        heard.done = True
        out.append(self._msg(ServerEvent.TRANSCRIPTION_COMPLETED, item_id=heard.item_id, content_index=0,
                             transcript=text, usage={"type": "duration", "seconds": round(seconds, 3)}))
        out.append(self._msg(ServerEvent.ITEM_DONE, item=self._keep(self._user_item(heard.item_id, "completed", text))))
        return out

    def forget(self, item_id: str) -> Message:
        turn_id, role = self.items.pop(item_id)
        self._bodies.pop(item_id, None)
        if self._last_item == item_id:
            self._last_item = None
        return self._msg(ServerEvent.ITEM_DELETED, item_id=item_id)

    def retrieved(self, item_id: str, history: str | None) -> Message:
        """``conversation.item.retrieved``: the item as last sent, its text what the history holds now
        (``history``: that side of the turn in the history, None when it has none). A reply still
        playing has the words sent so far; a settled one the history's (cut by a barge-in or a
        truncate, or nothing when nothing of it was heard); a user item not (yet) in the history, its
        transcript as sent. No audio data: it is not kept."""
        item = copy.deepcopy(self._bodies[item_id])
        part = item["content"][0]
        key = "text" if part["type"] in ("input_text", "output_text") else "transcript"
        reply = self.reply_of(item_id)
        if reply is not None and reply.active:
            part[key] = "".join(reply.tokens[: reply.sent]).strip()
        elif history is not None:
            part[key] = history
        elif item["role"] == "assistant":
            part[key] = ""  # nothing of it was heard, or the client deleted it from the history
        return self._msg(ServerEvent.ITEM_RETRIEVED, item=item)

    def truncated(self, item_id: str, audio_end_ms: int) -> Message:
        return self._msg(ServerEvent.ITEM_TRUNCATED, item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)

    # ---- responses --------------------------------------------------------

    def reply_of(self, item_id: str) -> _Reply | None:
        turn_id, role = self.items.get(item_id, (None, ""))
        return self._replies.get(turn_id) if turn_id is not None and role == "assistant" else None

    def active(self, response_id: str | None = None) -> _Reply | None:
        for reply in self._replies.values():
            if reply.active and response_id in (None, reply.response_id):
                return reply
        return None

    def was_cancelled(self, response_id: str | None) -> bool:
        """A cancel for a response that has just ended cancelled (clients send two): no error."""
        return bool(self._cancelled) and (response_id is None or response_id in self._cancelled)

    def _where(self, reply: _Reply) -> dict[str, Any]:
        return {"response_id": reply.response_id, "item_id": reply.item_id, "output_index": 0, "content_index": 0}

    def _response(self, reply: _Reply, status: str, details: dict[str, Any] | None, output: list[Message]) -> Message:
        c = self.config
        return {
            "object": "realtime.response", "id": reply.response_id, "status": status, "status_details": details,
            "output": output, "conversation_id": self.conversation_id, "output_modalities": list(reply.modalities),
            "max_output_tokens": c.max_output_tokens, "metadata": None,
            "audio": {"output": {"format": FORMAT, "voice": c.voice}},
            "usage": {"total_tokens": reply.output_tokens, "input_tokens": 0, "output_tokens": reply.output_tokens,
                      "input_token_details": {"text_tokens": 0, "audio_tokens": 0, "cached_tokens": 0},
                      "output_token_details": {"text_tokens": reply.output_tokens, "audio_tokens": 0}},
        }

    def _assistant_item(self, reply: _Reply, status: str) -> Message:
        text = reply.written if status != "in_progress" else ""
        part = ({"type": "output_audio", "transcript": text} if "audio" in reply.modalities
                else {"type": "output_text", "text": text})
        return {"id": reply.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": [part]}

    def _part(self, reply: _Reply, text: str) -> Message:
        return {"type": "audio", "transcript": text} if "audio" in reply.modalities else {"type": "text", "text": text}

    def start_response(self, turn_id: int, modalities: tuple[str, ...] | None = None, hold: bool = False) -> list[Message]:
        """response.created and the empty assistant item and part, before the first delta."""
        reply = self._replies.setdefault(turn_id, _Reply(turn_id))
        reply.response_id, reply.item_id = _id("resp"), _id("item")
        reply.modalities = modalities or self.config.output_modalities
        reply.hold = hold
        previous = self._add_item(reply.item_id, turn_id, "assistant")
        item = self._keep(self._assistant_item(reply, "in_progress"))
        return [
            self._msg(ServerEvent.RESPONSE_CREATED, response=self._response(reply, "in_progress", None, [])),
            self._msg(ServerEvent.OUTPUT_ITEM_ADDED, response_id=reply.response_id, output_index=0, item=item),
            self._msg(ServerEvent.ITEM_ADDED, previous_item_id=previous, item=item),
            self._msg(ServerEvent.PART_ADDED, **self._where(reply), part=self._part(reply, "")),
        ]

    def cancelling(self, reply: _Reply, reason: str) -> None:
        """The client stops it: response.done will say why."""
        reply.reason = reply.reason or reason

    def _deltas(self, reply: _Reply) -> list[Message]:
        kind = ServerEvent.AUDIO_TRANSCRIPT_DELTA if "audio" in reply.modalities else ServerEvent.TEXT_DELTA
        out = [self._msg(kind, **self._where(reply), delta=token) for token in reply.tokens[reply.sent:] if token]
        reply.sent = len(reply.tokens)
        return out

    def _finish(self, reply: _Reply, status: str) -> list[Message]:
        """Every closing event of a response, in OpenAI's order, ending with response.done."""
        if not reply.active:
            return []
        text = reply.written
        where = self._where(reply)
        out = self._deltas(reply)
        if "audio" in reply.modalities:
            out.append(self._msg(ServerEvent.AUDIO_DONE, **where))
            out.append(self._msg(ServerEvent.AUDIO_TRANSCRIPT_DONE, **where, transcript=text))
        else:
            out.append(self._msg(ServerEvent.TEXT_DONE, **where, text=text))
        out.append(self._msg(ServerEvent.PART_DONE, **where, part=self._part(reply, text)))
        item_status = "completed" if status == "completed" else "incomplete"
        item = self._keep(self._assistant_item(reply, item_status))
        out.append(self._msg(ServerEvent.OUTPUT_ITEM_DONE, response_id=reply.response_id, output_index=0, item=item))
        out.append(self._msg(ServerEvent.ITEM_DONE, item=item))
        details: dict[str, Any] = {"type": status}
        if status == "cancelled":
            details["reason"] = reply.reason or "client_cancelled"
            assert reply.response_id is not None
            self._cancelled.append(reply.response_id)
        elif status == "failed":
            details["error"] = {"type": "server_error", "code": "stage_failed"}
        out.append(self._msg(ServerEvent.RESPONSE_DONE, response=self._response(reply, status, details, [item])))
        reply.status = status
        if len(self._replies) > 64:
            for old in sorted(self._replies)[:-32]:
                if not self._replies[old].active:
                    del self._replies[old]
        return out

    def heard_at(self, reply: _Reply, audio_end_ms: int) -> str:
        """The reply's words up to ``audio_end_ms`` of its audio: the words in proportion to the audio
        (speech runs at an even pace), within what a barge-in already found heard."""
        if reply.heard is not None:
            text, ms = reply.heard
        else:
            text, ms = reply.written, reply.audio_samples * 1000 / RATE
        words = text.split()
        if ms <= 0 or audio_end_ms >= ms:
            return text if ms > 0 else ""
        return " ".join(words[: int(len(words) * audio_end_ms / ms)])

    # ---- the session's events --------------------------------------------

    def _ms(self, position: int) -> int:
        """A position on the input timeline (16 kHz samples) as ms of the client's audio."""
        return int(position * 1000 / 16000)

    def events(self, event: Event) -> list[Message]:
        """What a pipeline event becomes on this wire (often nothing, sometimes several events)."""
        turn_id = event.turn_id
        if turn_id is None:
            return []
        out: list[Message] = []
        reply = self._replies.get(turn_id)
        if reply is not None and reply.hold and not isinstance(event, frames.ReplyCancelled):
            # The response began at the final transcript; an early reply's
            # tokens written for a different pause's words are thrown away by
            # the ReplyCancelled that follows that very event, if at all.
            reply.hold = False
            out += self._deltas(reply)
        match event:
            case frames.SpeechStarted():
                heard = self._heard[turn_id] = _Heard(_id("item"), turn_id)
                start = event.preroll[0].position if event.preroll else event.onset_position
                out.append(self._msg(ServerEvent.SPEECH_STARTED, audio_start_ms=self._ms(start), item_id=heard.item_id))
            case frames.TranscriptPartial() if turn_id in self._heard and not self._heard[turn_id].stopped:
                heard = self._heard[turn_id]
                text = event.stable
                if text.startswith(heard.partial) and len(text) > len(heard.partial):
                    out.append(self._msg(ServerEvent.TRANSCRIPTION_DELTA, item_id=heard.item_id, content_index=0,
                                         delta=text[len(heard.partial):]))
                    heard.partial = text
            case frames.SpeechStopped() if turn_id in self._heard:
                out += self.committed(turn_id, self._ms(event.last_voiced_position))
            case frames.TranscriptFinal() if not event.speculative and turn_id in self._heard:
                out += self.transcribed(turn_id, event.text)
                if reply is None or reply.response_id is None:
                    out += self.start_response(turn_id, hold=True)
            case frames.TranscriptEmpty() if turn_id in self._heard:
                out += self.transcribed(turn_id, "")
            case frames.LLMToken():
                reply = self._replies.setdefault(turn_id, _Reply(turn_id))
                reply.tokens.append(event.text)
                if reply.active and not reply.hold:
                    out += self._deltas(reply)
            case frames.LLMDone():
                reply = self._replies.setdefault(turn_id, _Reply(turn_id))
                reply.text, reply.output_tokens = event.text, event.tokens
            case frames.ReplyCancelled() if reply is not None:
                reply.tokens, reply.text, reply.sent, reply.hold, reply.output_tokens = [], None, 0, False, 0
            case frames.ReplyInterrupted() if reply is not None:
                reply.heard = (event.heard_text, event.played_samples * 1000 / (event.sample_rate or self.pipeline_rate))
                reply.reason = reply.reason or ("turn_detected" if event.by_turn is not None else "client_cancelled")
            case frames.StageError():
                out.append(self.error(ErrorCode.STAGE_FAILED, f"{event.stage}: {event.message}"))
                if reply is not None:
                    reply.reason = reply.reason or "failed"
            case frames.TurnCompleted() if reply is not None:
                out += self._finish(reply, "failed" if reply.reason == "failed" else "completed")
            case frames.TurnCancelled():
                if reply is not None:
                    out += self._finish(reply, "failed" if reply.reason == "failed" else "cancelled")
                heard = self._heard.get(turn_id)
                if heard is not None and not heard.done:
                    out += self.transcribed(turn_id, "")
        return out


# --------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------


class RealtimeConnection(_Connection):
    """A ``/v1/realtime`` connection: the server's connection (limits, lifecycle,
    pacing) with OpenAI's events instead of protocol v1's.

    There is no session.start: the session opens at once with ``session.created``.
    Under server VAD, appended audio streams into the pipeline as ``/ws``
    audio does; with ``turn_detection: null`` it collects in a buffer that
    ``input_audio_buffer.commit`` transcribes into a user item.
    """

    def __init__(self, server: Server, ws: ServerConnection) -> None:
        super().__init__(server, ws)
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        model = (query.get("model") or ["local-model"])[0][:80]
        self.rt = RealtimeProtocol(now(), self.config.audio.output_rate, model, self.config.llm.system_prompt)
        self.wire = self.rt  # type: ignore[assignment]
        self._buffer: list[np.ndarray] = []  # manual turns: the uncommitted audio at 16 kHz
        self._buffer_resampler = Resampler(RATE, self.config.audio.input_rate)
        self._transcribing: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    async def _read_start(self) -> SessionStart | None:
        agent = self.ws.request.headers.get("User-Agent", "") if self.ws.request else ""
        return SessionStart(RATE, RATE, f"realtime {agent}".strip()[:80])

    def _on_audio(self, data: bytes) -> None:
        """A binary frame: not part of this protocol (audio comes in input_audio_buffer.append)."""
        raise RealtimeError("invalid_value", "binary frames are not part of this protocol; "
                            "send input_audio_buffer.append")

    def _forget_task(self, task: asyncio.Task[Any]) -> None:
        """A finished job leaves the connection's task list (a session can run for hours)."""
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)

    def _job(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._jobs.add(task)
        self._tasks.append(task)
        task.add_done_callback(self._jobs.discard)
        task.add_done_callback(self._forget_task)

    # ---- events out -------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        for message in self.rt.events(event):
            self._send(message)

    def _on_turn_closed(self, record: Any) -> None:
        """No turn.metrics on this wire (the report still has them)."""

    def _send_all(self, messages: list[Message]) -> None:
        for message in messages:
            self._send(message)

    # ---- requests in ------------------------------------------------------

    def _on_text(self, text: str) -> None:
        try:
            self._act(self.rt.parse(text))
        except RealtimeError as exc:
            self._send(self.rt.refused(exc))

    def _act(self, request: RealtimeRequest) -> None:
        session = self.session
        rt = self.rt
        match request:
            case SessionUpdate(config=config):
                session.conversation.system_prompt = config.instructions or self.config.llm.system_prompt
                if config.turn_detection is None and rt.config.turn_detection is not None:
                    self._buffer.clear()
                self._send(rt.updated(config))
            case AudioAppend(pcm=pcm):
                if rt.config.turn_detection is not None:
                    _Connection._on_audio(self, pcm)  # the VAD hears it, as /ws audio
                    return
                if self._audio_limit is None:  # the same input-rate check as /ws audio
                    server = self.config.server
                    self._audio_limit = audio_bucket(server.max_input_rate, server.max_message_bytes, RATE)
                if not self._audio_limit.take(len(pcm) / 2 / RATE, now()):
                    from .protocol import input_too_fast

                    raise input_too_fast()
                self._buffer.append(self._buffer_resampler.process(np.frombuffer(pcm, dtype="<i2").astype(np.int16)))
            case AudioCommit(event_id=event_id):
                if rt.config.turn_detection is not None:
                    return  # the server ends turns itself
                self._buffer.append(self._buffer_resampler.flush())
                audio = np.concatenate(self._buffer) if self._buffer else np.zeros(0, np.int16)
                self._buffer.clear()
                if len(audio) < self.config.audio.input_rate // 10:
                    raise _bad("the input audio buffer holds less than 100 ms of audio", None, event_id,
                               "input_audio_buffer_commit_empty")
                turn = session.ctx.turns.new()
                self._send_all(rt.committed(turn.id))
                self._transcribing = asyncio.create_task(self._transcribe(turn.id, audio))
                self._tasks.append(self._transcribing)
                self._transcribing.add_done_callback(self._forget_task)
            case AudioClear():
                self._buffer.clear()
                self._buffer_resampler.reset()
                self._send(rt._msg(ServerEvent.CLEARED))
            case ItemCreate(item_id=wanted, role=role, text=text, event_id=event_id):
                if not text:
                    raise _bad("the item has no text (images and audio parts are not supported)", "item.content",
                               event_id)
                turn = session.ctx.turns.new()
                if role == "user":
                    session.controller.add_message(turn.id, user=text)
                else:
                    session.controller.add_message(turn.id, reply=text)
                self._send_all(rt.text_item(rt.item_id(wanted), turn.id, role, text))
            case ItemTruncate(item_id=item_id, audio_end_ms=end, event_id=event_id):
                reply = rt.reply_of(item_id)
                if reply is None:
                    raise _bad(f"no assistant item {item_id[:64]!r} to truncate", "item_id", event_id,
                               "item_truncate_invalid_item_id")
                if reply.active and self.output is not None and session.playback.has_started(reply.turn_id):
                    # Still playing: cut where the client says it is, as a barge-in would.
                    self.output.report_position(reply.turn_id, end * RATE // 1000)
                    rt.cancelling(reply, "client_cancelled")
                    session.controller.stop_reply(reply.turn_id, "truncated by the client")
                else:
                    session.controller.truncate(reply.turn_id, rt.heard_at(reply, end))
                self._send(rt.truncated(item_id, end))
            case ItemDelete(item_id=item_id, event_id=event_id):
                if item_id not in rt.items:
                    raise _bad(f"no item {item_id[:64]!r}", "item_id", event_id, "item_delete_invalid_item_id")
                turn_id, role = rt.items[item_id]
                reply = rt.reply_of(item_id)
                if reply is not None and reply.active:
                    rt.cancelling(reply, "client_cancelled")
                    session.controller.stop_reply(turn_id, "deleted by the client")
                session.controller.remove_message(turn_id, role)
                self._send(rt.forget(item_id))
            case ItemRetrieve(item_id=item_id, event_id=event_id):
                if item_id not in rt.items:
                    raise _bad(f"no item {item_id[:64]!r}", "item_id", event_id, "item_retrieve_invalid_item_id")
                turn_id, role = rt.items[item_id]
                kept = [t["content"] for t in session.conversation.turns if t["turn_id"] == turn_id and t["role"] == role]
                self._send(rt.retrieved(item_id, kept[-1] if kept else None))
            case ResponseCreate(output_modalities=modalities, event_id=event_id):
                if rt.active() is not None:
                    raise _bad("a response is already in progress", None, event_id,
                               "conversation_already_has_active_response")
                turn = session.ctx.turns.new()
                self._send_all(rt.start_response(turn.id, modalities))
                self._job(self._respond(turn.id))
            case ResponseCancel(response_id=response_id, event_id=event_id):
                reply = rt.active(response_id)
                if reply is None:
                    if rt.was_cancelled(response_id):
                        return  # the second of a client's cancel/truncate pair
                    raise _bad("there is no active response to cancel", None, event_id, "response_cancel_not_active")
                rt.cancelling(reply, "client_cancelled")
                session.controller.stop_reply(reply.turn_id, "cancelled by the client")
            case Ignored():
                pass

    async def _transcribe(self, turn_id: int, audio: np.ndarray) -> None:
        """A committed buffer becomes a user item with its words (in the history at once)."""
        try:
            text = (await self.session.asr.transcribe(audio)).strip()
        except Exception as exc:  # the model failed on this buffer: the session goes on
            log.error("session %s: transcription failed: %s", self.id, exc)
            self._send(self.rt.error(ErrorCode.STAGE_FAILED, "the transcription failed"))
            text = ""
        if text:
            self.session.controller.add_message(turn_id, user=text)
        self._send_all(self.rt.transcribed(turn_id, text, len(audio) / self.config.audio.input_rate))

    async def _respond(self, turn_id: int) -> None:
        """response.create: after the last commit's words are in the history, the model answers it."""
        pending = self._transcribing
        if pending is not None and not pending.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        if not self.session.ctx.turns.is_cancelled(turn_id):
            self.session.controller.respond(turn_id)
