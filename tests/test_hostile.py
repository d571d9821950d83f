"""Hostile clients on the Realtime and Wyoming wires, against the real servers on loopback.

Each test is a finding that broke before the shared guards (issue 22): it
failed then and passes now. The Realtime face decodes through the guard
/ws uses (size, then nesting, before the decoder); Wyoming reads its
headers through :mod:`assistant.server.wyoming.wire` (lengths checked
before a byte is read, the header's shape answered with ``error``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from typing import Any

import psutil
import pytest
from helpers import TEST_OVERRIDES, no_tracebacks
from websockets.asyncio.client import connect
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe
from wyoming.ping import Ping

from assistant.config import load_config
from assistant.server.listener import Server
from assistant.server.wyoming import wyoming_server

pytestmark = pytest.mark.slow


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


# --------------------------------------------------------------------------
# /v1/realtime
# --------------------------------------------------------------------------


def test_realtime_deep_nesting_and_huge_instructions_are_errors_and_the_session_goes_on(
    models: Any, run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: 30,000 nested lists in ``item.content`` (60 KB) ended the session with
    ``internal`` and close 1011; 250k characters of instructions were accepted and
    every response then failed at the model's context limit."""
    caplog.set_level(logging.INFO)
    config = load_config(overrides=[*TEST_OVERRIDES, "server.max_message_bytes=1048576"])
    limit = config.llm.max_model_len * 2
    deep = nested(30000)
    attacks = [
        '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": %s}}' % deep,
        deep,  # a whole nested event
        json.dumps({"type": "session.update", "session": {"instructions": "Be brief. " * 25000}}),
        json.dumps({"type": "session.update", "session": {"instructions": "x" * (limit + 1)}}),
    ]

    async def body(server: Server) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=x"
        async with connect(url, subprotocols=["realtime"], max_size=None) as ws:  # type: ignore[list-item]
            created = json.loads(await ws.recv())
            errors = []
            for attack in attacks:
                await ws.send(attack)
                errors.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "Answer briefly."}}))
            updated = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert created["type"] == "session.created"
            return errors, updated, ws.close_code

    errors, updated, close_code = serve(run, models, config, body)
    assert [e["type"] for e in errors] == ["error"] * 4, errors
    codes = [e["error"]["code"] for e in errors]
    assert codes == ["invalid_json", "invalid_json", "string_above_max_length", "string_above_max_length"], codes
    assert "nested deeper" in errors[0]["error"]["message"]
    assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Answer briefly."
    assert close_code is None  # still open: no 1011
    no_tracebacks(caplog)


def serve(run: Any, models: Any, config: Any, body: Any) -> Any:
    async def main() -> Any:
        async with Server(models, config, host="127.0.0.1", port=0, token="") as server:
            return await body(server)

    return run(main())


# --------------------------------------------------------------------------
# Wyoming
# --------------------------------------------------------------------------


def wyoming(run: Any, models: Any, body: Any, *overrides: str) -> Any:
    config = load_config(overrides=[*TEST_OVERRIDES, *overrides])

    async def main() -> Any:
        server = await wyoming_server(models, config, "tcp://127.0.0.1:0")
        try:
            return await body(server.port, server)
        finally:
            await server.stop()

    return run(main())


async def read_line_event(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """One event as the server wrote it (header, then its data), or None at EOF."""
    line = await asyncio.wait_for(reader.readline(), 10)
    if not line:
        return None
    header = json.loads(line)
    if header.get("data_length"):
        header.setdefault("data", {}).update(json.loads(await reader.readexactly(header["data_length"])))
    if header.get("payload_length"):
        await reader.readexactly(header["payload_length"])
    return header


def test_wyoming_a_claimed_2_gb_payload_is_refused_before_it_is_read(
    models: Any, run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a header claiming 2 GB, then 64 MB of bytes, grew the server's RSS
    by the 64 MB it was sent and kept them."""
    caplog.set_level(logging.INFO)
    process = psutil.Process()

    async def body(port: int, server: Any) -> tuple[dict[str, Any] | None, int, bool]:
        before = process.memory_info().rss
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        header = {"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1},
                  "payload_length": 2 * 1024 ** 3}
        writer.write(json.dumps(header).encode() + b"\n")
        answer = asyncio.ensure_future(read_line_event(reader))
        block = bytes(1024 * 1024)
        try:
            for _ in range(64):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass  # the server closed the connection: what it should do
        refusal = await answer
        try:
            closed = await asyncio.wait_for(reader.read(), 10) == b""
        except ConnectionError:
            closed = True
        writer.close()
        await asyncio.sleep(0.2)
        return refusal, process.memory_info().rss - before, closed

    refusal, grown, closed = wyoming(run, models, body)
    assert refusal is not None and refusal["type"] == "error" and refusal["data"]["code"] == "too-large", refusal
    assert closed
    assert grown < 32 * 1024 * 1024, f"RSS grew by {grown / 2 ** 20:.0f} MB"
    no_tracebacks(caplog)


def test_wyoming_mistyped_headers_get_errors_and_the_connection_goes_on(
    models: Any, run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: these header shapes dropped the connection with a traceback."""
    caplog.set_level(logging.INFO)
    bad = [
        b'{"type": 5}\n',
        b'{"type": "ping", "data": [1, 2]}\n',
        b'["ping"]\n',
        b'{"type": "ping", "data_length": 4}\n[1] ',
        b"not json at all\n",
        nested(5000).encode() + b"\n",
        b'{"type": "describe", "version": {"a": [[[["x"]]]]}, "data": null}\n',
    ]

    async def body(port: int, server: Any) -> tuple[list[dict[str, Any] | None], dict[str, Any] | None]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for line in bad:
            writer.write(line)
            await writer.drain()
            answers.append(await read_line_event(reader))
        async with AsyncTcpClient("127.0.0.1", port) as client:  # another client, and this one still works
            await client.write_event(Describe().event())
            assert (await client.read_event()) is not None
        writer.write((json.dumps(Ping(text="still here").event().to_dict()) + "\n").encode())
        await writer.drain()
        pong = await read_line_event(reader)
        writer.close()
        return answers, pong

    answers, pong = wyoming(run, models, body)
    assert all(a is not None and a["type"] == "error" and a["data"]["code"] == "bad-event" for a in answers), answers
    assert all("Traceback" not in a["data"]["text"] for a in answers if a is not None)
    assert pong is not None and pong["type"] == "pong"
    no_tracebacks(caplog)


def test_wyoming_a_reset_connection_is_one_log_line(models: Any, run: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Before: each connection reset by its client logged a full ``ConnectionResetError`` traceback."""
    caplog.set_level(logging.INFO)

    async def body(port: int, server: Any) -> int:
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b'{"type": "audio-chunk", "payload_length": 1000}\n' + bytes(10))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            sock.close()
        await asyncio.sleep(0.5)
        return len(server.handlers)

    open_after = wyoming(run, models, body)
    assert open_after == 0
    no_tracebacks(caplog)


def test_wyoming_allow_list_and_connection_bound(models: Any, run: Any) -> None:
    async def refused(port: int) -> dict[str, Any] | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await read_line_event(reader)
        closed = await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert closed
        return answer

    async def not_allowed(port: int, server: Any) -> dict[str, Any] | None:
        return await refused(port)

    answer = wyoming(run, models, not_allowed, "wyoming.allowed_clients=[192.168.77.0/24]")
    assert answer is not None and answer["data"]["code"] == "not-allowed"

    async def full(port: int, server: Any) -> tuple[dict[str, Any] | None, bool]:
        async with AsyncTcpClient("127.0.0.1", port) as one, AsyncTcpClient("127.0.0.1", port) as two:
            for client in (one, two):
                await client.write_event(Describe().event())
                assert (await client.read_event()) is not None
            third = await refused(port)
        await asyncio.sleep(0.2)
        async with AsyncTcpClient("127.0.0.1", port) as again:  # a slot is free once the others leave
            await again.write_event(Describe().event())
            return third, (await again.read_event()) is not None

    third, again = wyoming(run, models, full, "wyoming.max_connections=2", "wyoming.allowed_clients=[127.0.0.1]")
    assert third is not None and third["data"]["code"] == "too-many-connections"
    assert again


def test_wyoming_idle_and_flooding_connections_are_closed_with_an_error(models: Any, run: Any) -> None:
    """The limits /ws has (server.idle_timeout_s, server.max_messages_per_s) hold on Wyoming too."""

    async def idle(port: int, server: Any) -> tuple[dict[str, Any] | None, bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await read_line_event(reader)  # sent nothing: the idle timeout answers
        closed = await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        return answer, closed

    answer, closed = wyoming(run, models, idle, "server.idle_timeout_s=1")
    assert answer is not None and answer["data"]["code"] == "idle-timeout" and closed

    async def flood(port: int, server: Any) -> list[str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ping = (json.dumps(Ping(text="x").event().to_dict()) + "\n").encode()
        try:
            writer.write(ping * 200)
            await writer.drain()
        except ConnectionError:
            pass
        kinds = []
        try:
            while (event := await read_line_event(reader)) is not None:
                kinds.append(event["data"].get("code") if event["type"] == "error" else event["type"])
        except ConnectionError:
            pass
        writer.close()
        return kinds

    kinds = wyoming(run, models, flood, "server.max_messages_per_s=10", "server.message_burst=20")
    assert kinds[-1] == "message-rate" and 10 <= kinds.count("pong") < 200, kinds
