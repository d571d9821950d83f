"""The OpenAI Realtime face without a server or models: every client event parsed, every
server event built from pipeline events, and what each request does to a stand-in session.

Every server event built here is validated against the ``openai`` SDK's own
``RealtimeServerEvent`` models, as the real clients in tests/test_realtime.py do.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import pytest
from pydantic import TypeAdapter

from assistant.server import face
from assistant.server.realtime.codec import (
    RATE,
    AudioAppend,
    AudioCommit,
    Ignored,
    ItemCreate,
    RealtimeError,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    parse,
    subprotocol_key,
)
from assistant.server.realtime.face import RealtimeFace
from fakes import FakeLink, FakeSession
from pipeline import frames
from pipeline.tools import ToolCall, ToolChoice

ORIGIN = 50.0


def valid(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages as a client decodes them, each one valid for the SDK's models."""
    from openai.types.realtime import RealtimeServerEvent

    adapter = TypeAdapter(RealtimeServerEvent)
    decoded = [json.loads(face.encode(m)) for m in messages]
    for event in decoded:
        adapter.validate_python(event)
    return decoded


def kinds(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages]


def config() -> SessionConfig:
    return SessionConfig(model="local-model", instructions="Be brief.")


# --------------------------------------------------------------------------
# Client events, parsed
# --------------------------------------------------------------------------


def test_requests_parse_into_typed_values() -> None:
    pcm = np.arange(8, dtype="<i2").tobytes()
    append = parse(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode(),
                               "event_id": "e1"}), config())
    assert append == AudioAppend(pcm=pcm, event_id="e1")
    update = parse(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "instructions": "Speak French.", "output_modalities": ["text"],
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None}}}}), config())
    assert isinstance(update, SessionUpdate)
    assert (update.config.instructions, update.config.output_modalities, update.config.turn_detection) == (
        "Speak French.", ("text",), None)
    assert update.config.model == "local-model"  # what was not sent stays
    item = parse(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": " Hello "},
                                                       {"type": "input_image", "image_url": "x"}]}}), config())
    assert item == ItemCreate(item_id=None, role="user", text="Hello")
    assert parse('{"type": "input_audio_buffer.commit"}', config()) == AudioCommit()
    assert parse('{"type": "response.create", "response": {"output_modalities": ["audio"]}}', config()) == (
        ResponseCreate(output_modalities=("audio",)))
    assert parse('{"type": "output_audio_buffer.clear"}', config()) == Ignored()


@pytest.mark.parametrize(
    ("text", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ('{"no": "type"}', "missing_required_parameter", "type"),
        ('{"type": "bogus.event"}', "invalid_value", "type"),
        ('{"type": "input_audio_buffer.append", "audio": "***"}', "invalid_value", "audio"),
        ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "invalid_value", "audio"),  # 3 bytes: not PCM16
        ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}',
         "invalid_value", "session.audio.input.format"),
        ('{"type": "session.update", "session": {"max_output_tokens": 0}}', "invalid_value",
         "session.max_output_tokens"),
        ('{"type": "conversation.item.create", "item": {"type": "image"}}', "invalid_value", "item.type"),
        ('{"type": "conversation.item.create", "item": {"type": "function_call"}}', "invalid_type", "item.call_id"),
        ('{"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c"}}',
         "invalid_type", "item.output"),
        ('{"type": "conversation.item.create", "item": {"type": "function_call", "call_id": "c", "name": "a b"}}',
         "invalid_value", "item.name"),
        ('{"type": "session.update", "session": {"tools": [{"type": "mcp"}]}}', "invalid_value", "session.tools[0].type"),
        ('{"type": "session.update", "session": {"tools": [{"name": "x", "parameters": {"type": "string"}}]}}',
         "invalid_type", "session.tools[0]"),
        ('{"type": "session.update", "session": {"tool_choice": {"type": "function", "name": "nope"}}}',
         "invalid_value", "session.tool_choice"),
        ('{"type": "response.create", "response": {"tool_choice": "sometimes"}}', "invalid_value",
         "response.tool_choice"),
        ('{"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": -1}', "invalid_value",
         "audio_end_ms"),
    ],
)
def test_bad_requests_name_their_code_and_parameter(text: str, code: str, param: str | None) -> None:
    with pytest.raises(RealtimeError) as caught:
        parse(text, config())
    assert (caught.value.realtime_code, caught.value.param) == (code, param)
    assert not caught.value.fatal


def test_the_browser_passes_its_key_as_a_subprotocol() -> None:
    from websockets.datastructures import Headers

    headers = Headers([("Sec-WebSocket-Protocol", "realtime, openai-insecure-api-key.sk-123")])
    assert subprotocol_key(headers) == "sk-123"
    assert subprotocol_key(Headers()) is None


# --------------------------------------------------------------------------
# The face over a stand-in session (tests/fakes.py): what each request asks of it
# --------------------------------------------------------------------------


def bound() -> tuple[RealtimeFace, FakeSession, FakeLink]:
    rt = RealtimeFace(ORIGIN, 22050, "local-model", "Be brief.", agent="test")
    session, link = FakeSession(), FakeLink()
    rt.bind(session, link)  # type: ignore[arg-type]
    return rt, session, link


def send(rt: RealtimeFace, **event: Any) -> list[dict[str, Any]]:
    return valid(rt.receive(json.dumps(event)))


def test_the_face_implements_the_interface_and_opens_at_once() -> None:
    members = {name for name in dir(face.Face) if not name.startswith("_")} | set(face.Face.__annotations__)
    rt, _, _ = bound()
    assert members <= set(dir(rt))
    assert not rt.wants_start
    assert rt.parse_start(None, 16000, 22050) == face.SessionStart(RATE, RATE, "realtime test")
    created = valid([rt.ready("s1", rt.parse_start(None, 16000, 22050), 20, {})])[0]
    assert created["type"] == "session.created" and created["session"]["instructions"] == "Be brief."


def test_a_spoken_turn_becomes_openais_events_in_order() -> None:
    rt, _, _ = bound()
    out: list[dict[str, Any]] = []
    events = [
        frames.SpeechStarted(turn_id=1, onset_at=1.0, onset_position=16000),
        frames.TranscriptPartial(turn_id=1, stable="What is", unstable="the"),
        frames.SpeechStopped(turn_id=1, last_voiced_at=2.0, last_voiced_position=40000),
        frames.TranscriptFinal(turn_id=1, text="What is the capital of France?"),
        frames.LLMToken(turn_id=1, text="Paris", index=0),
        frames.LLMToken(turn_id=1, text=" is.", index=1),
        frames.LLMDone(turn_id=1, text="Paris is.", tokens=2, finish_reason="stop"),
    ]
    for event in events:
        out += valid(rt.on_event(event))
    rt.audio_start(1, RATE, 3.0)
    out += valid([json.loads(rt.audio(np.zeros(480, "<i2").tobytes()) or "{}")])
    out += valid(rt.on_event(frames.TurnCompleted(turn_id=1)))
    assert kinds(out) == [
        "input_audio_buffer.speech_started",
        "conversation.item.input_audio_transcription.delta",
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "conversation.item.added",
        "conversation.item.input_audio_transcription.completed", "conversation.item.done",
        "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.output_audio_transcript.delta", "response.output_audio_transcript.delta",
        "response.output_audio.delta",
        "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
        "response.output_item.done", "conversation.item.done", "response.done",
    ]
    assert out[0]["audio_start_ms"] == 1000 and out[2]["audio_end_ms"] == 2500
    assert out[5]["transcript"] == "What is the capital of France?"
    done = out[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] == 2
    assert out[-5]["transcript"] == "Paris is." and rt.open_turns == []
    assert rt.turn_closed(1, {}) == []  # no turn.metrics on this wire


def test_manual_turns_go_through_the_sessions_verbs() -> None:
    rt, session, link = bound()
    send(rt, type="session.update", session={"audio": {"input": {"turn_detection": None}}})
    assert ("hold_input", True) in session.calls
    send(rt, type="session.update", session={"instructions": "Be kind.", "audio": {"input": {"turn_detection": None}}})
    assert session.calls.count(("hold_input", True)) == 1  # still manual: the held audio stays
    assert ("set_instructions", "Be kind.") in session.calls
    pcm = np.ones(2400, "<i2").tobytes()
    assert send(rt, type="input_audio_buffer.append", audio=base64.b64encode(pcm).decode()) == []
    assert link.fed == [pcm]  # to the connection: the input-rate limit, then the session
    session.held_ms = 50
    (error,) = send(rt, type="input_audio_buffer.commit")
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    session.held_ms = 1000
    committed = send(rt, type="input_audio_buffer.commit")
    assert kinds(committed) == ["input_audio_buffer.committed", "conversation.item.added"]
    spoken = session.turns  # the turn the commit opened
    words = valid(rt.on_event(frames.BufferTranscribed(turn_id=spoken, text="Hello there.", audio_s=1.0)))
    assert kinds(words) == ["conversation.item.input_audio_transcription.completed", "conversation.item.done"]
    assert words[0]["transcript"] == "Hello there." and words[0]["item_id"] == committed[0]["item_id"]
    created = send(rt, type="response.create")
    answer = session.turns
    assert kinds(created)[0] == "response.created" and ("respond", answer) in session.calls
    (busy,) = send(rt, type="response.create")
    assert busy["error"]["code"] == "conversation_already_has_active_response"
    send(rt, type="response.cancel")
    assert ("stop_reply", answer) in session.calls
    done = valid(rt.on_event(frames.TurnCancelled(turn_id=answer, reason="cancelled by the client")))
    assert done[-1]["response"]["status"] == "cancelled"
    assert done[-1]["response"]["status_details"]["reason"] == "client_cancelled"
    assert send(rt, type="response.cancel") == []  # the second of a cancel pair: no error
    (nothing,) = send(rt, type="response.cancel", response_id="resp_never")
    assert nothing["error"]["code"] == "response_cancel_not_active"


def test_items_created_truncated_retrieved_and_deleted() -> None:
    rt, session, _ = bound()
    added = send(rt, type="conversation.item.create", item={
        "type": "message", "role": "assistant", "id": "mine", "content": [{"type": "output_text", "text": "Hi."}]})
    assert kinds(added) == ["conversation.item.added", "conversation.item.done"] and added[0]["item"]["id"] == "mine"
    assert ("add_message", "assistant", "Hi.") in session.calls
    (got,) = send(rt, type="conversation.item.retrieve", item_id="mine")
    assert got["item"]["content"][0]["text"] == "Hi."
    # A reply that played: truncating it cuts the history (not playing any more: no barge-in).
    rt.on_event(frames.TranscriptFinal(turn_id=9, text="Tell me."))
    created = rt.start_response(9)
    item_id = created[1]["item"]["id"]
    for i, word in enumerate(["One", " two", " three", " four."]):
        rt.on_event(frames.LLMToken(turn_id=9, text=word, index=i))
    rt.audio_start(9, RATE, 1.0)
    rt.audio(np.zeros(RATE, "<i2").tobytes())  # one second of its audio sent
    rt.on_event(frames.TurnCompleted(turn_id=9))
    (truncated,) = send(rt, type="conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=500)
    assert truncated["type"] == "conversation.item.truncated"
    assert ("truncate", 9, "One two") in session.calls  # half the audio: half the words
    # Still playing: the client's position is reported and the reply stopped, as a barge-in.
    rt.on_event(frames.TranscriptFinal(turn_id=10, text="Again."))
    item2 = rt.start_response(10)[1]["item"]["id"]
    session.playing_turns.add(10)
    send(rt, type="conversation.item.truncate", item_id=item2, content_index=0, audio_end_ms=250)
    assert ("played", 10, 6000) in session.calls and ("stop_reply", 10) in session.calls
    (deleted,) = send(rt, type="conversation.item.delete", item_id="mine")
    assert deleted["type"] == "conversation.item.deleted" and ("remove_message", 1, "assistant") in session.calls
    (missing,) = send(rt, type="conversation.item.retrieve", item_id="mine")
    assert missing["error"]["code"] == "item_retrieve_invalid_item_id"


def test_binary_frames_are_not_this_protocol() -> None:
    rt, _, link = bound()
    with pytest.raises(RealtimeError) as caught:
        rt.receive(b"\x00\x00")
    assert not caught.value.fatal and "input_audio_buffer.append" in caught.value.message
    assert link.fed == []


def test_function_calls_are_openais_items_and_events_and_their_outputs_come_back() -> None:
    rt, session, _ = bound()
    weather = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    update = {"type": "session.update",
              "session": {"tools": [weather], "tool_choice": {"type": "function", "name": "get_weather"}}}
    (updated,) = valid(rt.receive(json.dumps(update)))
    assert updated["session"]["tools"] == [weather]
    assert updated["session"]["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert ("set_tools", ("get_weather",), ToolChoice("named", "get_weather")) in session.calls
    out: list[dict[str, Any]] = []
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    for event in [
        frames.SpeechStarted(turn_id=1, onset_at=1.0, onset_position=0),
        frames.SpeechStopped(turn_id=1, last_voiced_at=2.0, last_voiced_position=16000),
        frames.TranscriptFinal(turn_id=1, text="What's the weather in Paris?"),
        frames.ToolCallDelta(turn_id=1, call_id="call_1", name="get_weather", delta='{"city": '),
        frames.ToolCallDelta(turn_id=1, call_id="call_1", name="get_weather", delta='"Paris"}'),
        frames.ToolCalled(turn_id=1, calls=(call,)),
        frames.LLMDone(turn_id=1, text="", tokens=0, finish_reason="stop"),
        frames.TurnCompleted(turn_id=1),
    ]:
        out += valid(rt.on_event(event))
    response = kinds(out)[kinds(out).index("response.created"):]
    assert response == [
        "response.created", "response.output_item.added", "conversation.item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "conversation.item.done",
        "response.done",
    ]  # a forced call: no message item, no audio
    done = out[-1]["response"]
    assert done["status"] == "completed" and [o["type"] for o in done["output"]] == ["function_call"]
    item = done["output"][0]
    assert (item["call_id"], item["name"], json.loads(item["arguments"])) == ("call_1", "get_weather", {"city": "Paris"})
    assert out[-4]["arguments"] == '{"city": "Paris"}' and out[-4]["call_id"] == "call_1"
    # The client runs it and sends the output, then asks for the answer.
    output = {"type": "conversation.item.create",
              "item": {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 18 degrees."}}
    added = valid(rt.receive(json.dumps(output)))
    assert kinds(added) == ["conversation.item.added", "conversation.item.done"]
    assert added[1]["item"]["output"] == "Sunny, 18 degrees." and ("add_result", "call_1", "Sunny, 18 degrees.") in session.calls
    started = valid(rt.receive('{"type": "response.create"}'))
    assert "response.content_part.added" in kinds(started)  # the answer: a message this time
    # A function_call item the client makes itself goes into the history too.
    made = {"type": "conversation.item.create",
            "item": {"type": "function_call", "call_id": "c9", "name": "get_weather", "arguments": "{}"}}
    assert kinds(valid(rt.receive(json.dumps(made)))) == ["conversation.item.added", "conversation.item.done"]
    assert ("add_call", "c9", "get_weather") in session.calls


def test_calls_to_tools_this_process_runs_stay_off_the_realtime_wire() -> None:
    rt, _, _ = bound()
    out: list[dict[str, Any]] = []
    for event in [
        frames.SpeechStarted(turn_id=1, onset_at=1.0, onset_position=0),
        frames.SpeechStopped(turn_id=1, last_voiced_at=2.0, last_voiced_position=16000),
        frames.TranscriptFinal(turn_id=1, text="Is the museum open on Monday?"),
        frames.ToolCallDelta(turn_id=1, call_id="c1", name="opening_hours", delta='{"day": "Monday"}'),
        frames.ToolCalled(turn_id=1, calls=(ToolCall("c1", "opening_hours", '{"day": "Monday"}'),)),
        frames.ToolResult(turn_id=1, call_id="c1", name="opening_hours", output="closed"),
        frames.LLMToken(turn_id=1, text="It is closed.", index=0),
        frames.LLMDone(turn_id=1, text="It is closed.", tokens=1, finish_reason="stop"),
        frames.TurnCompleted(turn_id=1),
    ]:
        out += valid(rt.on_event(event))
    assert not any("function_call" in kind for kind in kinds(out))
    assert [o["type"] for o in out[-1]["response"]["output"]] == ["message"]
