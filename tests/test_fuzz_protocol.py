"""Fuzzing the wire protocol against the real server on loopback (Hypothesis).

Random JSON shapes, random text, random binary lengths, in random order,
session.start or not, then the connection ends one of three ways. After
every case the server must answer /healthz and hold no session; at the end
it must still serve a full turn. Bounded: 60 cases (derandomized, so a CI
run is repeatable), then one spoken turn.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

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
