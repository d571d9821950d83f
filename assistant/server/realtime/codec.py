"""The OpenAI Realtime API (GA) on this server: its names, and every client event parsed.

Real clients (the ``openai`` SDK's ``client.realtime.connect``, the Agents
SDK's ``OpenAIRealtimeWebSocket``, Pipecat, LiveKit) can be pointed at this
server instead of OpenAI's; docs/protocol.md ("OpenAI Realtime API") lists
the subset and how it differs. This module is the client side of the wire:
the event names both ways (:class:`ClientEvent`, :class:`ServerEvent`), the
session as the client configures it (:class:`SessionConfig`), and
:func:`parse`, which turns one client event into a typed request or a
:class:`RealtimeError` (an ``error`` event; the session goes on). The
server events are built in :mod:`.state`; what the requests do is
:mod:`.face`.

Audio on this wire is PCM16 at 24 kHz, base64 in JSON both ways.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from websockets.datastructures import Headers

from pipeline.tools import ToolCall, ToolChoice, ToolSpec

from ..face import ErrorCode, ProtocolError, load_client_json

SUBPROTOCOL: Final = "realtime"
KEY_PREFIX: Final = "openai-insecure-api-key."
RATE: Final = 24000  # the only PCM rate the GA API has
FORMAT: Final = {"type": "audio/pcm", "rate": RATE}
MAX_TOKENS_LIMIT: Final = 4096


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
    FUNCTION_ARGUMENTS_DELTA = "response.function_call_arguments.delta"
    FUNCTION_ARGUMENTS_DONE = "response.function_call_arguments.done"
    RESPONSE_DONE = "response.done"
    ERROR = "error"


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
    tools: tuple[ToolSpec, ...] = ()  # the client's function tools (it runs their calls)
    tool_choice: ToolChoice = field(default_factory=ToolChoice)

    @property
    def audio_out(self) -> bool:
        return "audio" in self.output_modalities


MAX_TOOLS: Final = 64
MAX_EVENT_CHARS: Final = 16 * 1024 * 1024  # the listener's server.max_message_bytes bounds a frame first
INSTRUCTIONS_CHARS_PER_TOKEN: Final = 2
"""Instructions may take up to half the model's context at ~4 characters a token
(``max_model_len * 2`` characters): longer ones would leave no room for the
history and the answer, and every response would fail at the context limit."""
DEFAULT_MAX_INSTRUCTIONS: Final = 2048 * INSTRUCTIONS_CHARS_PER_TOKEN  # the bundled model's context


def tool_json(tool: ToolSpec) -> dict[str, Any]:
    """A function tool as the session echoes it."""
    return {"type": "function", "name": tool.name, "description": tool.description,
            "parameters": dict(tool.parameters)}


def choice_json(choice: ToolChoice) -> Any:
    """``tool_choice`` as the GA API writes it."""
    return {"type": "function", "name": choice.name} if choice.mode == "named" else choice.mode


def _tools(value: Any, param: str, event_id: str | None) -> tuple[ToolSpec, ...]:
    """``tools``: function tools (name, description, a JSON schema of type object)."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise _bad(f"tools must be a list of up to {MAX_TOOLS} function tools", param, event_id, "invalid_type")
    tools: list[ToolSpec] = []
    for i, tool in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad("only function tools are supported (no MCP tools here: the client runs the calls)",
                       f"{where}.type", event_id)
        name, description = tool.get("name"), tool.get("description") or ""
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _bad("a tool's name must be 1-64 letters, digits, _ or -", f"{where}.name", event_id)
        if any(t.name == name for t in tools):
            raise _bad(f"the tool {name!r} is declared twice", f"{where}.name", event_id)
        parameters = tool.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(description, str) or not isinstance(parameters, dict) \
                or parameters.get("type", "object") != "object":
            raise _bad("a tool needs a string description and parameters that are a JSON schema of type object",
                       where, event_id, "invalid_type")
        tools.append(ToolSpec(name, description, parameters))
    return tuple(tools)


def _choice(value: Any, tools: tuple[ToolSpec, ...], param: str, event_id: str | None) -> ToolChoice:
    try:
        choice = ToolChoice.of(value)
    except ValueError as exc:
        raise _bad(str(exc), param, event_id) from None
    if choice.mode == "named" and not any(t.name == choice.name for t in tools):
        raise _bad(f"tool_choice names {choice.name!r}, which is not one of the tools", param, event_id)
    return choice


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
class CallOutputCreate(Request):
    """A ``function_call_output`` item: the result of a call the client ran."""

    item_id: str | None
    call_id: str
    output: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallCreate(Request):
    """A ``function_call`` item the client puts into the conversation itself."""

    item_id: str | None
    call: ToolCall


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
    tools: tuple[ToolSpec, ...] | None = None  # this response's own (None: the session's)
    tool_choice: ToolChoice | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseCancel(Request):
    response_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ignored(Request):
    pass


RealtimeRequest = (
    SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreate | CallOutputCreate | CallCreate
    | ItemTruncate | ItemDelete | ItemRetrieve | ResponseCreate | ResponseCancel | Ignored
)


_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_CALL_TEXT: Final = 64 * 1024  # a call's arguments or output


def _bad(message: str, param: str | None = None, event_id: str | None = None, code: str = "invalid_value") -> RealtimeError:
    return RealtimeError(code, message, param, event_id)


def _modalities(value: Any, param: str, event_id: str | None) -> tuple[str, ...]:
    if value not in (["audio"], ["text"]):
        raise _bad('output_modalities must be ["audio"] or ["text"]', param, event_id)
    return tuple(value)


def _format(value: Any, param: str, event_id: str | None) -> None:
    if not isinstance(value, dict) or value.get("type") not in ("audio/pcm", "pcm16") or value.get("rate", RATE) != RATE:
        raise _bad(f'only {{"type": "audio/pcm", "rate": {RATE}}} is supported', param, event_id)


def parse_session(config: SessionConfig, session: Any, event_id: str | None,
                  max_instructions: int = DEFAULT_MAX_INSTRUCTIONS) -> SessionConfig:
    """``session.update``: only the fields present change; tracing and the like are ignored."""
    if not isinstance(session, dict):
        raise _bad("session must be an object", "session", event_id, "invalid_type")
    if session.get("type", "realtime") != "realtime":
        raise _bad("only realtime sessions are supported (not transcription)", "session.type", event_id)
    changes: dict[str, Any] = {}
    if "instructions" in session:
        if not isinstance(session["instructions"], str):
            raise _bad("instructions must be a string", "session.instructions", event_id, "invalid_type")
        if len(session["instructions"]) > max_instructions:
            raise _bad(f"instructions of {len(session['instructions'])} characters are over this model's limit of "
                       f"{max_instructions}", "session.instructions", event_id, "string_above_max_length")
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
    if "tools" in session:
        changes["tools"] = _tools(session["tools"], "session.tools", event_id)
    if "tool_choice" in session:
        changes["tool_choice"] = _choice(session["tool_choice"], changes.get("tools", config.tools),
                                         "session.tool_choice", event_id)
    elif "tools" in session and config.tool_choice.mode == "named" \
            and not any(t.name == config.tool_choice.name for t in changes["tools"]):
        changes["tool_choice"] = ToolChoice()  # the named tool is gone
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


def _item_id(item: dict[str, Any], event_id: str | None) -> str | None:
    item_id = item.get("id")
    if item_id is not None and (not isinstance(item_id, str) or not 0 < len(item_id) <= 64):
        raise _bad("item.id must be a string of up to 64 characters", "item.id", event_id)
    return item_id


def _call_text(item: dict[str, Any], key: str, event_id: str | None, required: bool = True) -> str:
    value = item.get(key, None if required else "")
    if not isinstance(value, str) or len(value) > MAX_CALL_TEXT or (required and key == "call_id" and not value):
        raise _bad(f"item.{key} must be a string (up to {MAX_CALL_TEXT} characters)", f"item.{key}", event_id,
                   "invalid_type")
    return value


def _function_item(item: dict[str, Any], event_id: str | None) -> CallOutputCreate | CallCreate:
    """A ``function_call_output`` (a call's result) or ``function_call`` item."""
    item_id, call_id = _item_id(item, event_id), _call_text(item, "call_id", event_id)
    if item["type"] == "function_call_output":
        return CallOutputCreate(item_id=item_id, call_id=call_id, output=_call_text(item, "output", event_id),
                                event_id=event_id)
    name, arguments = _call_text(item, "name", event_id), _call_text(item, "arguments", event_id, required=False)
    if not _TOOL_NAME.match(name):
        raise _bad("item.name must be 1-64 letters, digits, _ or -", "item.name", event_id)
    return CallCreate(item_id=item_id, call=ToolCall(call_id, name, arguments or "{}"), event_id=event_id)


def _item_text(item: Any, event_id: str | None) -> tuple[str | None, str, str]:
    """A message item's (id, role, text): text parts joined; images and audio parts ignored."""
    if not isinstance(item, dict):
        raise _bad("item must be an object", "item", event_id, "invalid_type")
    if item.get("type") != "message":
        raise _bad("only message, function_call and function_call_output items are supported", "item.type",
                   event_id)
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
    return _item_id(item, event_id), role, " ".join(t.strip() for t in texts if t.strip())


def parse(text: str, config: SessionConfig, max_instructions: int = DEFAULT_MAX_INSTRUCTIONS) -> RealtimeRequest:
    """One client event as a typed request, or a :class:`RealtimeError`.

    Decoded by the guard every face shares (size, then nesting, before the
    decoder sees it): 30,000 nested lists in 60 KB took the session down."""
    try:
        event = load_client_json(text, MAX_EVENT_CHARS, "the event")
    except ValueError as exc:
        raise _bad(str(exc), code="invalid_json") from None
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
            return SessionUpdate(config=parse_session(config, event.get("session"), event_id, max_instructions),
                                 event_id=event_id)
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
            item = event.get("item")
            if isinstance(item, dict) and item.get("type") in ("function_call_output", "function_call"):
                return _function_item(item, event_id)
            item_id, role, item_text = _item_text(item, event_id)
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
            tools = _tools(response["tools"], "response.tools", event_id) if "tools" in response else None
            choice = (_choice(response["tool_choice"], tools if tools is not None else config.tools,
                              "response.tool_choice", event_id) if "tool_choice" in response else None)
            return ResponseCreate(output_modalities=modalities, tools=tools, tool_choice=choice, event_id=event_id)
        case ClientEvent.RESPONSE_CANCEL:
            response_id = event.get("response_id")
            return ResponseCancel(response_id=response_id if isinstance(response_id, str) else None, event_id=event_id)
    raise AssertionError(known)


