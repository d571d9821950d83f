"""Protocol v1 without a server or models: every message built, every client message parsed.

:mod:`assistant.server.v1.codec` is the only place that knows the wire;
these tests hold it to docs/protocol.md (names, fields and their order,
error codes, close codes) and to the browser client's names.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import numpy as np
import pytest
from websockets.frames import CloseCode

from assistant.server import face
from assistant.server.v1 import codec as v1
from assistant.server.v1.face import V1Face
from assistant.server.output import WebSocketOutput
from helpers import ROOT
from pipeline import frames
from pipeline.tools import ToolCall

ORIGIN = 100.0
# Protocol v1's part of the file: the OpenAI Realtime section after it has its own names.
DOCS = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8").split("\n# OpenAI Realtime API")[0]


def wire(started: bool = True, output_rate: int = 48000) -> v1.ProtocolV1:
    protocol = v1.ProtocolV1(ORIGIN, pipeline_rate=22050)
    if started:
        protocol.ready("s1", face.SessionStart(48000, output_rate, "test"), 20, {"turn": 20000})
    return protocol


def wire_json(message: dict[str, Any]) -> dict[str, Any]:
    """What a client reads: the encoded frame, decoded."""
    return json.loads(face.encode(message))


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


def test_message_types_are_the_documented_ones() -> None:
    documented = set(re.findall(r'"type": "([a-z_.]+)"', DOCS)) | set(re.findall(r"^\| `([a-z_.]+)` \|", DOCS, re.M))
    documented -= set(face.ErrorCode)  # the error table's first column
    assert documented == {t.value for t in v1.MessageType}


def test_the_browser_client_handles_only_known_types() -> None:
    app = (ROOT / "assistant" / "server" / "web" / "app.js").read_text(encoding="utf-8")
    handled = set(re.findall(r'case "([a-z_.]+)"', app))
    assert handled and handled <= {t.value for t in v1.MessageType}


def test_error_codes_and_close_codes_are_the_documented_ones() -> None:
    table = dict(re.findall(r"^\| `([a-z_]+)` \| .*\| (\d{4}|no)\b", DOCS, re.M))
    assert set(table) == {c.value for c in face.ErrorCode}
    for code in face.ErrorCode:
        close = face.FATAL_CLOSE.get(code)
        assert (table[code] == "no") == (close is None), code
        if close is not None:
            assert isinstance(close, CloseCode) and int(close) == int(table[code]), code


def test_wire_names_are_plain_strings_once_encoded() -> None:
    text = face.encode({"type": v1.MessageType.ERROR, "code": face.ErrorCode.BAD_AUDIO})
    assert text == '{"type":"error","code":"bad_audio"}'
    assert face.decode(text) == {"type": "error", "code": "bad_audio"}
    with pytest.raises(ValueError):
        face.decode("[1]")


def test_v1_implements_the_interface() -> None:
    members = {name for name in dir(face.Face) if not name.startswith("_")} | set(face.Face.__annotations__)
    assert members <= set(dir(V1Face(ORIGIN, 22050)))


# --------------------------------------------------------------------------
# Client -> server
# --------------------------------------------------------------------------


def test_session_start_round_trip() -> None:
    message = v1.session_start(48000, 24000, "unit test")
    assert wire_json(message) == {"type": "session.start", "protocol": 1, "input_rate": 48000, "output_rate": 24000,
                                  "client": "unit test"}
    start = wire(False).parse_start(face.encode(message), 16000, 22050)
    assert start == face.SessionStart(48000, 24000, "unit test")


def test_session_start_defaults_and_client_cut() -> None:
    start = wire(False).parse_start(json.dumps({"type": "session.start", "protocol": 1, "client": "x" * 200}),
                                    16000, 22050)
    assert start == face.SessionStart(16000, 22050, "x" * 80)


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        (b"\x00\x00", "(got audio)"),
        ("hello", "got text that is not JSON"),
        ('{"type": "input.end"}', "(got 'input.end')"),
        ("[1, 2]", "(got 'list')"),
        ('{"type": "session.start", "protocol": 2}', "unsupported protocol 2; this server speaks 1"),
        ('{"type": "session.start", "protocol": 1, "input_rate": 1000}', "input_rate: expected an integer from 8000"),
        ('{"type": "session.start", "protocol": 1, "output_rate": true}', "output_rate: expected an integer"),
        ('{"type": "session.start", "protocol": 1, "output_rate": 16000.0}', "output_rate: expected an integer"),
        ('{"type": "session.start", "protocol": 1, "client": 7}', "client: expected a string, got 7"),
        ('{"type": "session.start", "protocol": true}', "unsupported protocol True; this server speaks 1"),
        ('{"type": "session.start", "protocol": 1.0}', "unsupported protocol 1.0; this server speaks 1"),
        ('{"type": "session.start", "protocol": "1"}', "unsupported protocol '1'; this server speaks 1"),
        ("[" * 100_000 + "]" * 100_000, "(text frame of 200000 characters is over the limit of 65536)"),
        ("[" * 30_000 + "]" * 30_000, "(text frame nested deeper than 32 levels)"),
        ('{"type": "session.start", "protocol": 1, "client": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32"),
        ('{"type": "session.start", "protocol": 1, "client": "' + "x" * 70_000 + '"}', "text frame of 70"),
    ],
)
def test_bad_session_start_is_fatal(frame: str | bytes, says: str) -> None:
    with pytest.raises(face.ProtocolError) as caught:
        wire(False).parse_start(frame, 16000, 22050)
    assert caught.value.code == "protocol" and caught.value.fatal and says in caught.value.message
    ending = wire(False).refusal(caught.value)
    assert ending.close_code == CloseCode.POLICY_VIOLATION and ending.close_reason == caught.value.message


def test_requests() -> None:
    protocol = wire()
    position = protocol.parse('{"type": "playback.position", "turn_id": 2, "samples": 35280}')
    assert position == v1.PlaybackPosition(2, 35280)
    assert protocol.parse('{"type": "input.end"}') == v1.InputEnd()
    assert protocol.parse('{"type":"session.end","extra":1}') == v1.SessionEnd()
    heard = protocol.parse('{"type": "playback.heard", "turn_id": 2, "voice_to_voice_ms": 1032.5}')
    assert heard == v1.PlaybackHeard(2, 1032.5)
    assert protocol.parse('{"type": "playback.heard", "turn_id": 0, "voice_to_voice_ms": 900}') == v1.PlaybackHeard(0, 900.0)


BAD_POSITION = "playback.position: turn_id and samples must be integers >= 0"
BAD_HEARD = (
    "playback.heard: turn_id must be an integer >= 0 and voice_to_voice_ms a number from 0 to 600000"
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "text frame is not JSON"),
        ("3", 'expected a JSON object with a "type"'),
        ('{"turn_id": 1}', 'message has no "type"'),
        ('{"type": 5}', 'message has no "type"'),
        ('{"type": "hello"}', "unknown message type 'hello'"),
        (json.dumps({"type": "h" * 100}), f"unknown message type {'h' * 40!r}"),
        ('{"type": "session.start", "protocol": 1}', "the session has already started"),
        ('{"type": "playback.position", "turn_id": 1, "samples": -1}', BAD_POSITION),
        ('{"type": "playback.position", "turn_id": true, "samples": 1}', BAD_POSITION),
        ('{"type": "playback.position", "turn_id": 1}', BAD_POSITION),
        ('{"type": "playback.position", "turn_id": 1, "samples": 2.0}', BAD_POSITION),
        ('{"type": "playback.heard", "turn_id": 1, "voice_to_voice_ms": -5}', BAD_HEARD),
        ('{"type": "playback.heard", "turn_id": 1, "voice_to_voice_ms": 1e9}', BAD_HEARD),
        ('{"type": "playback.heard", "turn_id": 1, "voice_to_voice_ms": true}', BAD_HEARD),
        ('{"type": "playback.heard", "turn_id": 1, "voice_to_voice_ms": "900"}', BAD_HEARD),
        ('{"type": "playback.heard", "turn_id": "1", "voice_to_voice_ms": 900}', BAD_HEARD),
        ('{"type": "playback.heard", "turn_id": 1}', BAD_HEARD),
        ("[" * 100_000 + "]" * 100_000, "text frame of 200000 characters is over the limit of 65536"),
        ("[" * 30_000 + "]" * 30_000, "text frame nested deeper than 32 levels"),
        ('{"a": ' * 33 + "1" + "}" * 33, "text frame nested deeper than 32 levels"),
        ('{"type": "input.end", "pad": "' + "x" * 70_000 + '"}', "text frame of 70032 characters is over the limit of 65536"),
        ('"' + "[" * 5000 + '"', 'expected a JSON object with a "type"'),  # brackets in a string do not count
        ('{"type": "input.end"', "text frame is not JSON"),
        ('{"type": "input.end"}}', "text frame is not JSON"),
        ('{"type": NaN}', "text frame is not JSON"),
        ('{"type": "\\ud800"}', "unknown message type '\\ud800'"),
    ],
)
def test_bad_requests_are_not_fatal(text: str, message: str) -> None:
    with pytest.raises(face.ProtocolError) as caught:
        wire().parse(text)
    assert (caught.value.code, caught.value.message, caught.value.fatal) == ("bad_message", message, False)


def test_nesting_within_the_limit_and_brackets_in_strings_are_fine() -> None:
    nested = '{"type": "input.end", "x": ' + "[" * 30 + "]" * 30 + "}"
    assert wire().parse(nested) == v1.InputEnd()
    quoted = json.dumps({"type": "input.end", "s": "[{" * 1000 + '\\"]'})
    assert wire().parse(quoted) == v1.InputEnd()
    assert face.json_depth('{"a": [1, {"b": "]]]]"}]}') == 3
    assert face.json_depth('"\\\\" [') == 1


def test_audio_checks() -> None:
    protocol = wire()
    protocol.check_audio(b"\x00\x01" * 160, input_closed=False)
    protocol.check_audio(b"", input_closed=False)
    for data, closed, message in [
        (b"\x00" * 3, False, "binary frame of odd length (3 bytes): expected PCM16"),
        (b"\x00" * 4, True, "audio after input.end is ignored"),
    ]:
        with pytest.raises(face.ProtocolError) as caught:
            protocol.check_audio(data, input_closed=closed)
        assert (caught.value.code, caught.value.message, caught.value.fatal) == ("bad_audio", message, False)
    assert protocol.audio(b"\x01\x02") == b"\x01\x02"


# --------------------------------------------------------------------------
# Server -> client
# --------------------------------------------------------------------------


def test_session_ready() -> None:
    protocol = v1.ProtocolV1(frames.now(), pipeline_rate=22050)
    ready = wire_json(protocol.ready("s3", face.SessionStart(48000, 24000, "b"), 20, {"asr_final": 350}))
    at_ms = ready.pop("at_ms")
    assert list(ready.items()) == [("type", "session.ready"), ("protocol", 1), ("session_id", "s3"),
                                   ("input_rate", 48000), ("output_rate", 24000), ("frame_ms", 20),
                                   ("budgets_ms", {"asr_final": 350})]
    assert 0 <= at_ms < 1000


AT = ORIGIN + 1.5  # every event below happened 1500 ms into the session

EVENTS: list[tuple[Any, dict[str, Any]]] = [
    (frames.SpeechStarted(turn_id=2, at=AT, onset_at=AT - 0.2, onset_position=0, barge_in=True),
     {"type": "speech.started", "turn_id": 2, "barge_in": True, "at_ms": 1500.0}),
    (frames.SpeechStopped(turn_id=2, at=AT, last_voiced_at=ORIGIN + 1.2, last_voiced_position=0),
     {"type": "speech.stopped", "turn_id": 2, "speech_end_ms": 1200.0, "at_ms": 1500.0}),
    (frames.TranscriptPartial(turn_id=2, at=AT, stable="What is", unstable="the capital"),
     {"type": "transcript.partial", "turn_id": 2, "text": "What is the capital", "at_ms": 1500.0}),
    (frames.TranscriptFinal(turn_id=2, at=AT, text="What is the capital of France?"),
     {"type": "transcript.final", "turn_id": 2, "text": "What is the capital of France?", "at_ms": 1500.0}),
    (frames.LLMToken(turn_id=2, at=AT, text=" Paris", index=3),
     {"type": "response.text.delta", "turn_id": 2, "text": " Paris", "at_ms": 1500.0}),
    (frames.LLMDone(turn_id=2, at=AT, text="Paris.", tokens=2, finish_reason="stop"),
     {"type": "response.text.done", "turn_id": 2, "text": "Paris.", "at_ms": 1500.0}),
    (frames.ReplyCancelled(turn_id=2, at=AT, reason="the user went on speaking"),
     {"type": "response.cancelled", "turn_id": 2, "reason": "the user went on speaking", "at_ms": 1500.0}),
    (frames.ReplyInterrupted(turn_id=2, at=AT, heard_text="The capital", played_samples=22050, sample_rate=22050,
                      onset_at=AT - 0.3, stopped_at=AT - 0.04, by_turn=3),
     {"type": "response.interrupted", "turn_id": 2, "heard_text": "The capital", "played_samples": 48000,
      "stop_ms": 260.0, "by_turn": 3, "at_ms": 1500.0}),
    (frames.ToolCalled(turn_id=2, at=AT, calls=(ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
     {"type": "tool.call", "turn_id": 2, "calls": [{"call_id": "c1", "name": "get_weather",
                                                   "arguments": '{"city": "Paris"}'}], "at_ms": 1500.0}),
    (frames.ToolResult(turn_id=2, at=AT, call_id="c1", name="get_weather", output="Sunny", elapsed_ms=42.0),
     {"type": "tool.result", "turn_id": 2, "call_id": "c1", "name": "get_weather", "output": "Sunny", "error": None,
      "elapsed_ms": 42.0, "at_ms": 1500.0}),
    (frames.BudgetExceeded(turn_id=2, at=AT, stage="llm_first_token", budget_ms=800, elapsed_ms=800.4,
                           policy="acknowledge"),
     {"type": "budget.exceeded", "turn_id": 2, "stage": "llm_first_token", "budget_ms": 800, "elapsed_ms": 800.4,
      "policy": "acknowledge", "at_ms": 1500.0}),
    (frames.StageError(turn_id=2, at=AT, stage="tts", message="boom"),
     {"type": "error", "code": "stage_failed", "turn_id": 2, "message": "tts: boom", "fatal": False, "at_ms": 1500.0}),
    (frames.StageError(turn_id=None, at=AT, stage="asr", message="down"),
     {"type": "error", "code": "stage_failed", "turn_id": None, "message": "asr: down", "fatal": False,
      "at_ms": 1500.0}),
]


@pytest.mark.parametrize(("event", "expected"), EVENTS, ids=[type(e).__name__ for e, _ in EVENTS])
def test_events_on_the_wire(event: Any, expected: dict[str, Any]) -> None:
    message = wire_json(wire().message_of(event))  # type: ignore[arg-type]
    assert list(message.items()) == list(expected.items())  # the fields, and their order


def test_every_mapped_event_is_built() -> None:
    assert {type(event) for event, _ in EVENTS} == set(v1.EVENT_TYPES)


@pytest.mark.parametrize(
    "event",
    [
        frames.TranscriptFinal(turn_id=1, text="early", speculative=True),
        frames.SpeechPaused(turn_id=1, last_voiced_at=0.0),
        frames.TextChunk(turn_id=1, text="Hi.", index=0),
        frames.ReplyAudioStarted(turn_id=1, position=0, sample_rate=22050),
        frames.TurnCompleted(turn_id=1),
        frames.TurnCancelled(turn_id=1, reason="x"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_events_that_stay_off_the_wire(event: Any) -> None:
    assert wire().message_of(event) is None


def test_played_samples_keep_the_pipeline_rate_for_a_client_at_that_rate() -> None:
    event = frames.ReplyInterrupted(turn_id=1, heard_text="", played_samples=11025, sample_rate=0, onset_at=0.0,
                             stopped_at=0.0)
    assert wire(output_rate=22050).message_of(event)["played_samples"] == 11025  # type: ignore[index]


METRICS = {"status": "completed", "cancel_reason": None, "transcript": "Hi", "reply": "Hello.",
           "voice_to_voice_ms": 950.2, "latency_ms": {"voice_to_voice": 950.2}, "budgets": {}}


def test_turn_state_comes_from_the_events() -> None:
    protocol = wire()
    for turn_id in (3, 1, 2):
        protocol.message_of(frames.SpeechStarted(turn_id=turn_id, onset_at=0.0, onset_position=0))
    protocol.message_of(frames.SpeechStarted(turn_id=None, onset_at=0.0, onset_position=0))
    assert protocol.open_turns == [1, 2, 3]
    protocol.message_of(frames.ReplyInterrupted(turn_id=1, heard_text="Hel", played_samples=10, sample_rate=22050,
                                       onset_at=0.0, stopped_at=0.0, by_turn=2))
    metrics = wire_json(protocol.turn_metrics(1, {**METRICS, "interrupted": False, "heard_text": "Hel"}))
    assert metrics["interrupted"] is True and metrics["heard_text"] == "Hel"
    assert protocol.open_turns == [2, 3]
    metrics = wire_json(protocol.turn_metrics(2, METRICS))
    at_ms = metrics.pop("at_ms")
    assert list(metrics.items()) == [
        ("type", "turn.metrics"), ("turn_id", 2), ("status", "completed"), ("cancel_reason", None),
        ("interrupted", False), ("heard_text", None), ("transcript", "Hi"), ("reply", "Hello."),
        ("voice_to_voice_ms", 950.2), ("speech_end_input_ms", None), ("latency_ms", {"voice_to_voice": 950.2}),
        ("budgets", {}),
    ]
    assert isinstance(at_ms, float)
    assert protocol.open_turns == [3]


def test_audio_markers() -> None:
    protocol = wire()
    assert list(wire_json(protocol.audio_start(2, 48000, AT)).items()) == [
        ("type", "response.audio.start"), ("turn_id", 2), ("sample_rate", 48000), ("at_ms", 1500.0)]
    assert list(wire_json(protocol.audio_end(2, 96000, AT)).items()) == [
        ("type", "response.audio.end"), ("turn_id", 2), ("samples", 96000), ("at_ms", 1500.0)]


def test_one_error_builder() -> None:
    protocol = wire()
    assert list(wire_json(protocol.error(face.ErrorCode.BAD_MESSAGE, "nope", fatal=False, at=AT)).items()) == [
        ("type", "error"), ("code", "bad_message"), ("message", "nope"), ("fatal", False), ("at_ms", 1500.0)]
    with pytest.raises(AssertionError):
        protocol.error(face.ErrorCode.BAD_MESSAGE, "when?", fatal=False)


# --------------------------------------------------------------------------
# Endings and close codes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "close", "final"),
    [
        ("input_ended", CloseCode.NORMAL_CLOSURE, {"type": "session.ended", "reason": "input_ended"}),
        ("session_end", CloseCode.NORMAL_CLOSURE, {"type": "session.ended", "reason": "session_end"}),
        ("idle_timeout", CloseCode.NORMAL_CLOSURE, {"type": "session.ended", "reason": "idle_timeout"}),
        ("shutdown", CloseCode.GOING_AWAY, {"type": "session.ended", "reason": "shutdown"}),
        ("input_rate", CloseCode.POLICY_VIOLATION,
         {"type": "error", "code": "input_rate", "message": "audio is arriving faster than the server allows",
          "fatal": True}),
        ("internal", CloseCode.INTERNAL_ERROR,
         {"type": "error", "code": "internal", "message": "internal server error; the session is closed",
          "fatal": True}),
    ],
)
def test_endings(reason: str, close: CloseCode, final: dict[str, Any]) -> None:
    protocol = wire()
    ending = protocol.ending(reason)
    assert ending.close_code == close and ending.closes
    assert ending.close_reason == final.get("reason", final.get("message"))
    assert ending.cancel_turns == (reason != "input_ended")
    assert wire_json(protocol.final(ending, AT)) == {**final, "at_ms": 1500.0}  # type: ignore[arg-type]


def test_disconnected_sends_nothing_and_does_not_close() -> None:
    protocol = wire()
    ending = protocol.ending("disconnected")
    assert ending.close_code == CloseCode.ABNORMAL_CLOSURE and not ending.closes
    assert protocol.final(ending, AT) is None


def test_shutdown_before_the_session_started() -> None:
    protocol = wire(started=False)
    ending = protocol.ending("shutdown")
    assert ending is face.SHUTDOWN_BEFORE_START
    assert (ending.close_code, ending.close_reason, protocol.final(ending, AT)) == (
        CloseCode.GOING_AWAY, "server shutting down", None)


def test_refusals() -> None:
    protocol = wire(started=False)
    for error, code, close in [
        (face.start_timeout(10.0), "protocol", CloseCode.POLICY_VIOLATION),
        (face.too_many_sessions(8), "too_many_sessions", CloseCode.TRY_AGAIN_LATER),
        (face.input_too_fast(), "input_rate", CloseCode.POLICY_VIOLATION),
    ]:
        ending = protocol.refusal(error)
        assert error.fatal and (error.code, ending.close_code) == (code, close)
        assert wire_json(protocol.final(ending, AT)) == {  # type: ignore[arg-type]
            "type": "error", "code": code, "message": error.message, "fatal": True, "at_ms": 1500.0}
    assert face.start_timeout(10.0).message == "no session.start within 10 s"
    assert face.too_many_sessions(8).message == "the server is at its limit of 8 sessions; try again later"
    assert face.ENDINGS["input_rate"].error == (face.input_too_fast().code, face.input_too_fast().message)


def test_a_long_close_reason_is_cut_on_a_character() -> None:
    ending = face.fatal(face.ProtocolError(face.ErrorCode.PROTOCOL, "é" * 100, fatal=True))
    assert len(ending.close_reason.encode()) <= face.CLOSE_REASON_BYTES and ending.close_reason == "é" * 60
    assert ending.error == (face.ErrorCode.PROTOCOL, "é" * 100)  # the event keeps all of it


# --------------------------------------------------------------------------
# The paced output speaks through the protocol
# --------------------------------------------------------------------------


class _FakeSocket:
    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    async def send(self, message: str | bytes) -> None:
        self.sent.append(message)


def test_output_wraps_reply_audio_in_markers() -> None:
    async def scenario() -> list[str | bytes]:
        socket = _FakeSocket()
        protocol = wire(output_rate=22050)
        output = WebSocketOutput(socket, protocol, 22050, 22050, 0.0, protocol.origin)  # type: ignore[arg-type]
        sender = asyncio.create_task(output.run())
        output.write(4, np.ones(2205, np.int16))  # 100 ms
        await asyncio.wait_for(output.drain(4), 5)
        await output.finish(sender, protocol.final(protocol.ending("session_end"), frames.now()), 1.0)
        return socket.sent

    sent = asyncio.run(scenario())
    kinds = [json.loads(m)["type"] if isinstance(m, str) else "audio" for m in sent]
    assert kinds == ["response.audio.start"] + ["audio"] * 5 + ["response.audio.end", "session.ended"]  # 20 ms frames
    start, end = json.loads(sent[0]), json.loads(sent[-2])
    assert (start["turn_id"], start["sample_rate"], end["turn_id"]) == (4, 22050, 4)
    assert end["samples"] == sum(len(m) for m in sent if isinstance(m, bytes)) // 2 == 2205
    assert sent[-1] == face.encode(json.loads(sent[-1]))  # compact JSON, like every other event


def test_turn_metrics_say_where_the_speech_ended_in_the_clients_audio() -> None:
    metrics = wire_json(wire().turn_metrics(4, {**METRICS, "speech_end_input_ms": 2460.0}))
    assert metrics["speech_end_input_ms"] == 2460.0
    assert wire_json(wire().turn_metrics(5, METRICS))["speech_end_input_ms"] is None


# --------------------------------------------------------------------------
# The face: what a client's messages do, over a stand-in session (tests/fakes.py)
# --------------------------------------------------------------------------


def test_the_face_acts_through_the_sessions_verbs_and_its_link() -> None:
    from fakes import FakeLink, FakeSession

    v1_face = V1Face(ORIGIN, 22050)
    session, link = FakeSession(), FakeLink()
    v1_face.bind(session, link)  # type: ignore[arg-type]
    assert v1_face.wants_start
    audio = np.arange(320, dtype="<i2").tobytes()
    assert v1_face.receive(audio) == [] and v1_face.receive(b"") == []
    assert link.fed == [audio]  # the connection checks the input rate, then feeds the session
    v1_face.receive('{"type": "playback.position", "turn_id": 3, "samples": 4800}')
    v1_face.receive('{"type": "playback.heard", "turn_id": 3, "voice_to_voice_ms": 812.5}')
    assert ("played", 3, 4800) in session.calls and link.figures == [(3, 812.5)]
    with pytest.raises(face.ProtocolError) as odd:
        v1_face.receive(b"\x00\x00\x00")
    assert odd.value.code == "bad_audio" and not odd.value.fatal
    v1_face.receive('{"type": "input.end"}')
    assert ("end_input",) in session.calls
    with pytest.raises(face.ProtocolError) as late:
        v1_face.receive(audio)
    assert late.value.code == "bad_audio" and "after input.end" in late.value.message
    assert link.fed == [audio]
    v1_face.receive('{"type": "session.end"}')
    assert link.ended == ["session_end"]
    assert v1_face.on_event(frames.TurnCompleted(turn_id=3)) == []  # stays inside
    (started,) = v1_face.on_event(frames.SpeechStarted(turn_id=4, onset_at=ORIGIN + 1, onset_position=0))
    assert started["type"] == "speech.started" and v1_face.open_turns == [4]
    (metrics,) = v1_face.turn_closed(4, METRICS)
    assert metrics["type"] == "turn.metrics" and v1_face.open_turns == []
