"""Fuzzing every wire against the real servers on loopback (Hypothesis): /ws, /v1/realtime, Wyoming.

/ws: random JSON shapes, random text, random binary lengths, in random
order, session.start or not, then the connection ends one of three ways.
/v1/realtime: the client events with random fields, deep nesting, bad
base64 and raw text. Wyoming: header lines of every event type with random
data, lengths that are mistyped, too large, or that lie about the bytes
that follow, and raw garbage. After every case the server must answer
(/healthz, or Describe) and hold no session or connection; at the end its
RSS must not have grown past a bound, and a fresh client must still get a
spoken answer. Bounded in the suite (derandomized, so a CI run is
repeatable); ``pytest tests/test_fuzz_protocol.py --fuzz-minutes N`` runs
each wire's fuzzer for about N minutes with fresh random cases.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import psutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from assistant.config import Config, load_config
from assistant.client import RemoteSession
from assistant.server.v1.codec import MessageType
from assistant.server.listener import Server
from helpers import ASSETS, load_pcm

pytestmark = pytest.mark.slow

CLIENT_TYPES = [MessageType.SESSION_START, MessageType.PLAYBACK_POSITION, MessageType.INPUT_END, MessageType.SESSION_END]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
typed_messages = st.builds(
    lambda kind, fields: json.dumps({"type": kind, **fields}),
    st.sampled_from([*CLIENT_TYPES, "hello", ""]) | st.text(max_size=10),
    st.dictionaries(st.sampled_from(["protocol", "input_rate", "output_rate", "client", "turn_id", "samples", "x"]),
                    json_values, max_size=4),
)
deep = st.integers(min_value=1, max_value=40_000).map(lambda n: "[" * n + "]" * n)
frames = st.one_of(
    typed_messages,
    json_values.map(json.dumps),
    st.text(max_size=200),
    deep,
    st.binary(max_size=4000),
    st.integers(min_value=0, max_value=200_000).map(lambda n: b"\x00" * n),
)
cases = st.tuples(
    st.booleans(),  # a valid session.start first
    st.lists(frames, max_size=8),
    st.sampled_from(["close", "abort", "session_end"]),
)


async def play(server: Server, start: bool, sent: list[str | bytes], ending: str) -> None:
    async with connect(server.ws_url, max_size=None) as ws:
        try:
            if start:
                await ws.send(json.dumps({"type": "session.start", "protocol": 1}))
            for frame in sent:
                await ws.send(frame)
                await asyncio.sleep(0)
            if ending == "abort":
                ws.transport.abort()
                return
            if ending == "session_end":
                await ws.send(json.dumps({"type": "session.end"}))
                async with asyncio.timeout(10):
                    async for _ in ws:
                        pass
        except ConnectionClosed:
            pass


async def settled(server: Server, timeout: float = 10) -> dict[str, Any]:
    """/healthz once the last connection has wound down (or ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        health = json.loads(data.partition(b"\r\n\r\n")[2])
        if health["sessions"] == 0 or loop.time() > deadline:
            return health


def test_random_client_messages_never_hurt_the_server(models: Any, run: Any) -> None:
    config: Config = load_config(None, ["server.idle_timeout_s=3", "server.max_sessions=2"])
    server = Server(models, config, host="127.0.0.1", port=0, token="")
    run(server.start())
    try:

        @settings(max_examples=60, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(cases)
        def case(args: tuple[bool, list[str | bytes], str]) -> None:
            start, sent, ending = args
            run(asyncio.wait_for(play(server, start, sent, ending), 30))
            health = run(settled(server))
            assert health["status"] == "ok" and health["sessions"] == 0, (args, health)

        case()

        async def full_turn() -> RemoteSession:
            session = await RemoteSession.open(server.ws_url, client="after-fuzz")
            await session.stream(load_pcm(ASSETS / "questions" / "capital_of_france.wav"))
            await session.end_input()
            await session.wait_closed(90)
            return session

        session = run(full_turn())
    finally:
        run(server.shutdown())
    turns = [m for m in session.metrics.values() if m["transcript"]]
    assert session.ended_reason == "input_ended" and session.close_code == 1000
    assert [m["status"] for m in turns] == ["completed"] and turns[0]["reply"]


# --------------------------------------------------------------------------
# The bounded suite run, or --fuzz-minutes
# --------------------------------------------------------------------------


def fuzz(strategy: Any, check: Callable[[Any], None], budget: tuple[int, float | None]) -> int:
    """Run ``check`` on cases of ``strategy``: ``budget`` = (cases, None) derandomized,
    or (_, seconds) with fresh random cases until the time is up. Returns the cases run."""
    cases, seconds = budget
    ran = 0

    def counted(case: Any) -> None:
        nonlocal ran
        ran += 1
        check(case)

    common = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
    if seconds is None:
        settings(max_examples=cases, derandomize=True, **common)(given(strategy)(counted))()
        return ran
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        settings(max_examples=50, derandomize=False, **common)(given(strategy)(counted))()
    return ran


RSS_BOUND = 256 * 1024 * 1024  # what a fuzz run may add to the process (models and caches are loaded before)


# --------------------------------------------------------------------------
# /v1/realtime
# --------------------------------------------------------------------------

REALTIME_TYPES = ["session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                  "input_audio_buffer.clear", "conversation.item.create", "conversation.item.delete",
                  "conversation.item.retrieve", "conversation.item.truncate", "response.create", "response.cancel",
                  "output_audio_buffer.clear"]
realtime_fields = st.dictionaries(
    st.sampled_from(["session", "item", "audio", "item_id", "response", "event_id", "content_index",
                     "audio_end_ms", "x"]),
    json_values | st.sampled_from(["", "AAAA", "!!notbase64", base64.b64encode(bytes(3200)).decode()]),
    max_size=4,
)
realtime_events = st.one_of(
    st.builds(lambda kind, fields: json.dumps({**fields, "type": kind}),
              st.sampled_from(REALTIME_TYPES) | st.text(max_size=12), realtime_fields),
    st.builds(lambda inner: json.dumps({"type": "session.update", "session": inner}),
              st.dictionaries(st.sampled_from(["instructions", "tools", "tool_choice", "audio", "turn_detection",
                                               "output_modalities", "max_output_tokens", "type"]),
                              json_values, max_size=4)),
    json_values.map(json.dumps),
    st.text(max_size=200),
    deep,
    st.binary(max_size=2000),
)
realtime_cases = st.tuples(st.lists(realtime_events, max_size=8), st.sampled_from(["close", "abort"]))


async def play_realtime(server: Server, sent: list[str | bytes], ending: str) -> tuple[list[str], int | None]:
    """Send the case; returns the error codes the server answered and its close code (None: still open)."""
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=fuzz"
    codes: list[str] = []
    async with connect(url, subprotocols=["realtime"], max_size=None) as ws:  # type: ignore[list-item]
        try:
            for frame in sent:
                await ws.send(frame)
                await asyncio.sleep(0)
            if ending == "abort":
                ws.transport.abort()
                return codes, None
            try:
                async with asyncio.timeout(0.3):
                    async for text in ws:
                        event = json.loads(text)
                        if event.get("type") == "error":
                            codes.append(event["error"].get("code") or event["error"]["type"])
            except TimeoutError:
                pass
        except ConnectionClosed:
            pass
        return codes, ws.close_code


async def realtime_answer(server: Server) -> tuple[list[str], int]:
    """A text item and response.create from a fresh client: the event types, the audio bytes."""
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=after-fuzz"
    async with connect(url, subprotocols=["realtime"], max_size=None) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is two plus two?"}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        seen, audio = [], 0
        async with asyncio.timeout(120):
            async for text in ws:
                event = json.loads(text)
                seen.append(event["type"])
                if event["type"] == "response.output_audio.delta":
                    audio += len(base64.b64decode(event["delta"]))
                if event["type"] == "response.done":
                    return seen, audio
    return seen, audio


def test_random_realtime_events_never_hurt_the_server(models: Any, run: Any,
                                                      fuzz_budget: tuple[int, float | None]) -> None:
    config: Config = load_config(None, ["server.idle_timeout_s=3", "server.max_sessions=2",
                                        "server.max_message_bytes=1048576"])
    server = Server(models, config, host="127.0.0.1", port=0, token="")
    run(server.start())
    before = psutil.Process().memory_info().rss
    try:
        def check(args: tuple[list[str | bytes], str]) -> None:
            codes, close_code = run(asyncio.wait_for(play_realtime(server, *args), 30))
            assert "internal" not in codes and close_code != 1011, (args, codes, close_code)
            health = run(settled(server))
            assert health["status"] == "ok" and health["sessions"] == 0, (args, health)

        ran = fuzz(realtime_cases, check, (fuzz_budget[0], fuzz_budget[1]))
        grown = psutil.Process().memory_info().rss - before
        seen, audio = run(realtime_answer(server))
    finally:
        run(server.shutdown())
    print(f"realtime fuzzer: {ran} cases, RSS +{grown / 2 ** 20:.0f} MB")
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2 ** 20:.0f} MB over {ran} cases"
    assert "response.done" in seen and audio > 0, seen


# --------------------------------------------------------------------------
# Wyoming
# --------------------------------------------------------------------------

WYOMING_TYPES = ["describe", "ping", "transcribe", "audio-start", "audio-chunk", "audio-stop", "synthesize",
                 "synthesize-start", "synthesize-chunk", "synthesize-stop", "transcript", "detect", "x"]
lengths = st.none() | st.integers(min_value=0, max_value=64) | st.sampled_from(
    [2 ** 31, -1, "12", 1.5, True, [3]])
wyoming_data = st.dictionaries(
    st.sampled_from(["rate", "width", "channels", "text", "language", "name", "voice", "context", "timestamp"]),
    json_values | st.sampled_from([16000, 2, 1, 0, "hi", {"name": "x"}]), max_size=4)


def wyoming_header(kind: Any, data: Any, data_length: Any, payload_length: Any, extra: int) -> bytes:
    """A header line as a client might write it, then bytes: exactly as many as
    its lengths say, or ``extra`` more or fewer (a lying client)."""
    header: dict[str, Any] = {"type": kind, "data": data}
    body = b""
    for key, value in (("data_length", data_length), ("payload_length", payload_length)):
        if value is not None:
            header[key] = value
            if type(value) is int and 0 < value <= 64:
                body += (json.dumps({"text": "x" * max(0, value - 12)}).encode()[:value].ljust(value, b" ")
                         if key == "data_length" else bytes(value))
    cut = max(0, len(body) + extra)
    return json.dumps(header).encode() + b"\n" + (body + bytes(max(0, extra)))[:cut]


wyoming_frames = st.one_of(
    st.builds(wyoming_header, st.sampled_from(WYOMING_TYPES) | st.integers() | st.none(),
              wyoming_data | json_values, lengths, lengths, st.sampled_from([0, 0, 0, -3, 5])),
    st.binary(max_size=300).map(lambda b: b + b"\n"),
    st.text(max_size=100).map(lambda t: t.encode() + b"\n"),
    deep.map(lambda d: d.encode() + b"\n"),
)
wyoming_cases = st.tuples(st.lists(wyoming_frames, max_size=6), st.sampled_from(["close", "abort", "wait"]))


async def play_wyoming(port: int, sent: list[bytes], ending: str) -> bytes:
    """Send the case; returns what the server answered while the client waited (ending "wait")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answered = b""
    try:
        for frame in sent:
            writer.write(frame)
            await writer.drain()
            await asyncio.sleep(0)
        if ending == "abort":
            writer.transport.abort()
            return answered
        if ending == "wait":  # read what the server answers for a moment
            try:
                async with asyncio.timeout(0.5):
                    while chunk := await reader.read(65536):
                        answered += chunk
            except TimeoutError:
                pass
    except ConnectionError:
        pass
    finally:
        writer.close()
    return answered


async def wyoming_settled(server: Any, timeout: float = 30) -> int:
    """The connections still open once the last one has wound down (or ``timeout``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while server.handlers and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return len(server.handlers)


async def wyoming_answer(port: int) -> tuple[bool, int]:
    """A fresh client: Describe answered, and a synthesize's audio."""
    from wyoming.client import AsyncTcpClient
    from wyoming.info import Describe
    from wyoming.tts import Synthesize

    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        info = await client.read_event()
        await client.write_event(Synthesize(text="The server is still fine.").event())
        audio = 0
        async with asyncio.timeout(60):
            while True:
                event = await client.read_event()
                assert event is not None
                if event.type == "audio-chunk" and event.payload:
                    audio += len(event.payload)
                if event.type == "audio-stop":
                    return info is not None and info.type == "info", audio


def test_random_wyoming_bytes_never_hurt_the_server(models: Any, run: Any,
                                                    fuzz_budget: tuple[int, float | None]) -> None:
    from assistant.server.wyoming import wyoming_server

    config: Config = load_config(None, ["llm.max_tokens=8"])
    server = run(wyoming_server(models, config, "tcp://127.0.0.1:0"))
    before = psutil.Process().memory_info().rss
    try:
        def check(args: tuple[list[bytes], str]) -> None:
            answered = run(asyncio.wait_for(play_wyoming(server.port, *args), 30))
            assert b"internal-error" not in answered and b"Traceback" not in answered, (args, answered[:300])
            left = run(wyoming_settled(server))
            assert left == 0, (args, left)

        ran = fuzz(wyoming_cases, check, fuzz_budget)
        grown = psutil.Process().memory_info().rss - before
        described, audio = run(wyoming_answer(server.port))
    finally:
        run(server.stop())
    print(f"wyoming fuzzer: {ran} cases, RSS +{grown / 2 ** 20:.0f} MB")
    assert grown < RSS_BOUND, f"RSS grew by {grown / 2 ** 20:.0f} MB over {ran} cases"
    assert described and audio > 0
