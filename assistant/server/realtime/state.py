"""The OpenAI Realtime API's per-connection state, and every server event built from it.

:class:`RealtimeProtocol`, one per connection, turns the session's pipeline
events (:mod:`pipeline.frames`) into OpenAI's server events, in the order
and with the fields strict clients validate, and keeps what those events
refer to: the user items (a turn the VAD opened, a buffer the client
committed), the assistant's responses, the items' ids. It sends no event
type of its own: Pipecat rejects unknown ones. Nothing here does I/O or
acts on a session (that is :mod:`.face`).
"""

from __future__ import annotations

import base64
import copy
import itertools
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline import frames
from pipeline.frames import Event

from ..face import Closing, ErrorCode, Message, SessionStart, encode
from .codec import (
    DEFAULT_MAX_INSTRUCTIONS,
    FORMAT,
    RATE,
    RealtimeError,
    RealtimeRequest,
    ServerEvent,
    SessionConfig,
    choice_json,
    parse,
    tool_json,
)

RECENT_CANCELLED: Final = 16  # cancelled responses remembered, so a repeated cancel is no error


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
class _Call:
    """A function call of a response: its item, as much of it as the client has been sent."""

    item_id: str
    call_id: str
    name: str
    output_index: int
    arguments: str = ""
    unsent: str = ""  # arguments written but not yet sent as deltas
    announced: bool = False  # output_item.added sent
    done: bool = False  # the model finished it (ToolCalled)
    closed: bool = False  # arguments.done and output_item.done sent


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
    message: bool = True  # the response has a message item (not one that only calls the client's tools)
    message_index: int = 0
    tools: frozenset[str] = frozenset()  # the client's tools in this response: their calls are shown
    calls: dict[str, _Call] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.response_id is not None and self.status is None

    @property
    def written(self) -> str:
        return self.text if self.text is not None else "".join(self.tokens).strip()


class RealtimeProtocol(Closing):
    """OpenAI's Realtime events on one connection: the items and responses, every server event.

    It provides the :class:`~assistant.server.face.Face` hooks that build
    messages (the greeting, errors, reply audio; its endings are the shared
    :class:`~assistant.server.face.Closing`: an error, no last event of its own); :meth:`events` is
    what a pipeline event becomes (often nothing, sometimes several events).
    """

    def __init__(self, origin: float, pipeline_rate: int, model: str, instructions: str,
                 max_instructions: int = DEFAULT_MAX_INSTRUCTIONS) -> None:
        self.origin = origin
        self.max_instructions = max_instructions
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

    # ---- the Face hooks that build messages ------------------------------

    def encode(self, message: Message) -> str:
        return encode(message)

    def _msg(self, kind: ServerEvent, **fields: Any) -> Message:
        return {"type": kind, "event_id": f"event_{self.session_id[5:13]}{next(self._events):06d}", **fields}

    def parse(self, text: str) -> RealtimeRequest:
        return parse(text, self.config, self.max_instructions)

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
            "tools": [tool_json(t) for t in c.tools],
            "tool_choice": choice_json(c.tool_choice),
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
        if reply is None or not reply.active or "audio" not in reply.modalities or not reply.message:
            return None
        reply.audio_samples += len(pcm16) // 2
        return encode(self._msg(ServerEvent.AUDIO_DELTA, **self._where(reply),
                                delta=base64.b64encode(pcm16).decode("ascii")))

    def audio_end(self, turn_id: int, samples: int, at: float) -> None:
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

    def call_output_item(self, item_id: str, turn_id: int, call_id: str, output: str) -> list[Message]:
        """A call's result the client created: added and done at once."""
        return self._done_item(item_id, turn_id, {"type": "function_call_output", "call_id": call_id,
                                                  "output": output})

    def call_item(self, item_id: str, turn_id: int, call_id: str, name: str, arguments: str) -> list[Message]:
        """A function call the client created itself."""
        return self._done_item(item_id, turn_id, {"type": "function_call", "call_id": call_id, "name": name,
                                                  "arguments": arguments})

    def _done_item(self, item_id: str, turn_id: int, fields: Message) -> list[Message]:
        previous = self._add_item(item_id, turn_id, "tool")
        item = self._keep({"id": item_id, "object": "realtime.item", "status": "completed", **fields})
        return [self._msg(ServerEvent.ITEM_ADDED, previous_item_id=previous, item=item),
                self._msg(ServerEvent.ITEM_DONE, previous_item_id=previous, item=item)]

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
        if item["type"] != "message":  # a call or its output: as sent
            return self._msg(ServerEvent.ITEM_RETRIEVED, item=item)
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
        return {"response_id": reply.response_id, "item_id": reply.item_id, "output_index": reply.message_index,
                "content_index": 0}

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

    def start_response(
        self, turn_id: int, modalities: tuple[str, ...] | None = None, hold: bool = False,
        tools: tuple[str, ...] | None = None, calls_only: bool = False,
    ) -> list[Message]:
        """response.created and, unless the response is to call the client's tools
        (``calls_only``: a forced tool_choice), the empty assistant item and part
        before the first delta. ``tools``: the client's tools in this response
        (None: the session's)."""
        reply = self._replies.setdefault(turn_id, _Reply(turn_id))
        reply.response_id, reply.item_id = _id("resp"), _id("item")
        reply.modalities = modalities or self.config.output_modalities
        reply.hold = hold
        reply.tools = frozenset(tools if tools is not None else (t.name for t in self.config.tools))
        reply.message = False
        out = [self._msg(ServerEvent.RESPONSE_CREATED, response=self._response(reply, "in_progress", None, []))]
        if not calls_only:
            out += self._open_message(reply)
        if not hold:
            out += self._flush_calls(reply)  # an early reply's calls, made before the response began
        return out

    def _open_message(self, reply: _Reply) -> list[Message]:
        """The assistant's message item and its part, once the response has words."""
        reply.message, reply.message_index = True, len(reply.calls)
        previous = self._add_item(reply.item_id, reply.turn_id, "assistant")
        item = self._keep(self._assistant_item(reply, "in_progress"))
        return [
            self._msg(ServerEvent.OUTPUT_ITEM_ADDED, response_id=reply.response_id, output_index=reply.message_index,
                      item=item),
            self._msg(ServerEvent.ITEM_ADDED, previous_item_id=previous, item=item),
            self._msg(ServerEvent.PART_ADDED, **self._where(reply), part=self._part(reply, "")),
        ]

    def _call_item(self, reply: _Reply, call: _Call, status: str) -> Message:
        return self._keep({"id": call.item_id, "object": "realtime.item", "type": "function_call", "status": status,
                           "name": call.name, "call_id": call.call_id,
                           "arguments": call.arguments if status != "in_progress" else ""})

    def _flush_calls(self, reply: _Reply) -> list[Message]:
        """Every call's events not yet sent: its item, its argument deltas, its end."""
        out: list[Message] = []
        for call in reply.calls.values():
            if call.name not in reply.tools:
                continue  # made before the response began, to a tool this process runs
            where = {"response_id": reply.response_id, "item_id": call.item_id, "output_index": call.output_index}
            if not call.announced:
                call.announced = True
                previous = self._add_item(call.item_id, reply.turn_id, "tool")
                item = self._call_item(reply, call, "in_progress")
                out += [self._msg(ServerEvent.OUTPUT_ITEM_ADDED, response_id=reply.response_id,
                                  output_index=call.output_index, item=item),
                        self._msg(ServerEvent.ITEM_ADDED, previous_item_id=previous, item=item)]
            if call.unsent:
                out.append(self._msg(ServerEvent.FUNCTION_ARGUMENTS_DELTA, **where, call_id=call.call_id,
                                     delta=call.unsent))
                call.unsent = ""
            if call.done and not call.closed:
                call.closed = True
                item = self._call_item(reply, call, "completed")
                out += [self._msg(ServerEvent.FUNCTION_ARGUMENTS_DONE, **where, call_id=call.call_id, name=call.name,
                                  arguments=call.arguments),
                        self._msg(ServerEvent.OUTPUT_ITEM_DONE, response_id=reply.response_id,
                                  output_index=call.output_index, item=item),
                        self._msg(ServerEvent.ITEM_DONE, item=item)]
        return out

    def _call_delta(self, reply: _Reply, call_id: str, name: str, delta: str) -> None:
        call = reply.calls.get(call_id)
        if call is None:
            index = len(reply.calls) + (1 if reply.message else 0)
            call = reply.calls[call_id] = _Call(_id("item"), call_id, name, index)
        call.arguments += delta
        call.unsent += delta

    def cancelling(self, reply: _Reply, reason: str) -> None:
        """The client stops it: response.done will say why."""
        reply.reason = reply.reason or reason

    def _deltas(self, reply: _Reply) -> list[Message]:
        out = self._flush_calls(reply)
        tokens = [token for token in reply.tokens[reply.sent:] if token]
        if tokens and not reply.message:
            out += self._open_message(reply)  # words after all (an apology, an engine's error phrase)
        kind = ServerEvent.AUDIO_TRANSCRIPT_DELTA if "audio" in reply.modalities else ServerEvent.TEXT_DELTA
        out += [self._msg(kind, **self._where(reply), delta=token) for token in tokens]
        reply.sent = len(reply.tokens)
        return out

    def _finish(self, reply: _Reply, status: str) -> list[Message]:
        """Every closing event of a response, in OpenAI's order, ending with response.done."""
        if not reply.active:
            return []
        text = reply.written
        out = self._deltas(reply)
        outputs: dict[int, Message] = {}
        for call in reply.calls.values():
            if not call.announced:
                continue
            if not call.closed:  # cut off while the model wrote it
                call.closed = True
                out.append(self._msg(ServerEvent.OUTPUT_ITEM_DONE, response_id=reply.response_id,
                                     output_index=call.output_index, item=self._call_item(reply, call, "incomplete")))
            outputs[call.output_index] = self._bodies[call.item_id]
        if reply.message:
            where = self._where(reply)
            if "audio" in reply.modalities:
                out.append(self._msg(ServerEvent.AUDIO_DONE, **where))
                out.append(self._msg(ServerEvent.AUDIO_TRANSCRIPT_DONE, **where, transcript=text))
            else:
                out.append(self._msg(ServerEvent.TEXT_DONE, **where, text=text))
            out.append(self._msg(ServerEvent.PART_DONE, **where, part=self._part(reply, text)))
            item_status = "completed" if status == "completed" else "incomplete"
            item = self._keep(self._assistant_item(reply, item_status))
            out.append(self._msg(ServerEvent.OUTPUT_ITEM_DONE, response_id=reply.response_id,
                                 output_index=reply.message_index, item=item))
            out.append(self._msg(ServerEvent.ITEM_DONE, item=item))
            outputs[reply.message_index] = item
        details: dict[str, Any] = {"type": status}
        if status == "cancelled":
            details["reason"] = reply.reason or "client_cancelled"
            assert reply.response_id is not None
            self._cancelled.append(reply.response_id)
        elif status == "failed":
            details["error"] = {"type": "server_error", "code": "stage_failed"}
        output = [outputs[index] for index in sorted(outputs)]
        out.append(self._msg(ServerEvent.RESPONSE_DONE, response=self._response(reply, status, details, output)))
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
                    c = self.config
                    out += self.start_response(turn_id, hold=True, calls_only=bool(c.tools) and c.tool_choice.forced)
            case frames.BufferTranscribed() if turn_id in self._heard:
                out += self.transcribed(turn_id, event.text, event.audio_s)
            case frames.TranscriptEmpty() if turn_id in self._heard:
                out += self.transcribed(turn_id, "")
            case frames.LLMToken():
                reply = self._replies.setdefault(turn_id, _Reply(turn_id))
                reply.tokens.append(event.text)
                if reply.active and not reply.hold:
                    out += self._deltas(reply)
            case frames.LLMDone():
                reply = self._replies.setdefault(turn_id, _Reply(turn_id))
                reply.text, reply.output_tokens = event.text, reply.output_tokens + event.tokens
            case frames.ToolCallDelta():
                reply = self._replies.setdefault(turn_id, _Reply(turn_id))
                if reply.response_id is None or event.name in reply.tools:  # not ours: this process runs those
                    self._call_delta(reply, event.call_id, event.name, event.delta)
                    if reply.active and not reply.hold:
                        out += self._flush_calls(reply)
            case frames.ToolCalled() if reply is not None:
                for made in event.calls:
                    call = reply.calls.get(made.call_id)
                    if call is not None:
                        call.arguments, call.unsent, call.done = made.arguments, "", True
                reply.output_tokens += sum(max(1, len(c.arguments) // 4) for c in event.calls)
                if reply.active and not reply.hold:
                    out += self._flush_calls(reply)
            case frames.ReplyCancelled() if reply is not None:
                reply.tokens, reply.text, reply.sent, reply.hold, reply.output_tokens = [], None, 0, False, 0
                reply.calls = {}
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


