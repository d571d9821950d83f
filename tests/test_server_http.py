"""The server's plain HTTP side, on loopback, against clumsy and hostile requests.

The real :class:`~assistant.server.listener.Server` with no models: a page,
/healthz or a refused request never reaches a session, so nothing is loaded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from helpers import no_tracebacks

from assistant.config import load_config
from assistant.server.listener import Server


async def raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as it is, read until the server closes: status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]) if lines[0] else 0, headers, body


def request(method: str, path: str = "/", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode()


def serve_and(body: Any) -> Any:
    async def main() -> Any:
        async with Server(None, load_config(), host="127.0.0.1", port=0, token="") as server:
            return await body(server)

    return asyncio.run(main())


@pytest.fixture()
def quiet_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    return caplog


def test_a_very_long_path_is_414_with_one_short_log_line(quiet_log: pytest.LogCaptureFixture) -> None:
    path = "/" + "a" * 4000

    async def body(server: Server) -> list[tuple[int, dict[str, str], bytes]]:
        return [await raw(server.port, request("GET", path)), await raw(server.port, request("GET", "/" + "b" * 300)),
                await raw(server.port, request("GET", "/" + "/".join(["c" * 250] * 7)))]

    (status, _, _), (short_status, _, _), (deep_status, _, _) = serve_and(body)
    assert status == 414
    assert short_status == 404 and deep_status == 404  # too long for the file system: just not there
    no_tracebacks(quiet_log)
    assert all(len(r.getMessage()) < 200 for r in quiet_log.records), [r.getMessage()[:80] for r in quiet_log.records]
    assert not any("a" * 100 in r.getMessage() for r in quiet_log.records)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "TRACE", "OPTIONS", "PATCH", "BREW"])
def test_methods_other_than_get_and_head_are_405(method: str, quiet_log: pytest.LogCaptureFixture) -> None:
    async def body(server: Server) -> list[tuple[int, dict[str, str], bytes]]:
        return [await raw(server.port, request(method, path)) for path in ("/", "/healthz", "/ws")]

    for status, headers, content in serve_and(body):
        assert status == 405
        assert headers["allow"] in ("GET, HEAD", "GET")
        assert b"doctype" not in content
    no_tracebacks(quiet_log)


def test_head_has_the_get_headers_and_no_body(quiet_log: pytest.LogCaptureFixture) -> None:
    async def body(server: Server) -> tuple[Any, Any]:
        return await raw(server.port, request("HEAD", "/")), await raw(server.port, request("GET", "/"))

    (status, headers, content), (get_status, get_headers, get_content) = serve_and(body)
    assert status == get_status == 200
    assert content == b"" and get_content
    assert headers["content-length"] == get_headers["content-length"] == str(len(get_content))
    assert headers["content-type"] == get_headers["content-type"]
    no_tracebacks(quiet_log)


@pytest.mark.parametrize(
    "data",
    [
        request("GET") + request("GET"),  # two pipelined requests
        request("GET", extra="Content-Length: 5\r\n") + b"hello",  # a GET with a body
        request("GET", extra="Content-Length: 5\r\n"),  # a body announced, not (yet) sent
        request("GET") + b"hello",  # bytes after the head
        request("GET", "/ws", extra="Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n",
    ],
    ids=["pipelined", "body", "announced", "trailing", "chunked"],
)
def test_pipelined_requests_and_bodies_are_a_clean_400(data: bytes, quiet_log: pytest.LogCaptureFixture) -> None:
    async def body(server: Server) -> tuple[Any, Any]:
        answer = await raw(server.port, data)
        status, _, health = await raw(server.port, request("GET", "/healthz"))
        return answer, (status, health)

    (status, headers, content), (health_status, health) = serve_and(body)
    assert status == 400 and b"one request per connection" in content
    assert headers["connection"] == "close"
    assert health_status == 200 and b'"sessions": 0' in health
    no_tracebacks(quiet_log)


def test_a_second_request_on_a_kept_alive_connection_is_closed_cleanly(quiet_log: pytest.LogCaptureFixture) -> None:
    """The answer says ``Connection: close``; a client that sends its next request
    anyway sees the connection close at once (before: no answer ever came, and a
    ``write() after write_eof()`` traceback was logged each time)."""

    async def body(server: Server) -> list[tuple[bytes, bytes]]:
        seen = []
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request("GET", "/healthz", "Connection: keep-alive\r\n"))
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await asyncio.wait_for(reader.readexactly(length), 10)
            writer.write(request("GET", "/healthz"))
            await writer.drain()
            seen.append((head, await asyncio.wait_for(reader.read(), 5)))  # EOF, not a hang
            writer.close()
        return seen

    seen = serve_and(body)
    assert all(head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower() and rest == b""
               for head, rest in seen)
    no_tracebacks(quiet_log)


def test_readyz_is_the_load_balancers_check(quiet_log: pytest.LogCaptureFixture) -> None:
    """/healthz is 200 while the process runs; /readyz is 503 while it would refuse a session
    (here: no engine), 200 once it would take one, with the same JSON body."""
    import json

    async def body(server: Server) -> tuple[Any, Any, Any]:
        not_ready = await raw(server.port, request("GET", "/readyz"))
        health = await raw(server.port, request("GET", "/healthz"))
        server.models = type("Up", (), {"llm": type("LLM", (), {"health": staticmethod(lambda: {"state": "up"})})})()
        for _ in range(server.config.server.max_sessions):
            server._connections.add(object())  # type: ignore[arg-type]
        full = await raw(server.port, request("GET", "/readyz"))
        server._connections.clear()
        ready = await raw(server.port, request("GET", "/readyz"))
        return not_ready, health, (full, ready)

    not_ready, health, (full, ready) = serve_and(body)
    assert not_ready[0] == 503 and json.loads(not_ready[2])["ready"] is False
    assert health[0] == 200 and json.loads(health[2])["accepting"] is True
    assert full[0] == 503 and "limit of 8 sessions" in json.loads(full[2])["reason"]
    assert ready[0] == 200 and json.loads(ready[2])["load"] == 0.0
    no_tracebacks(quiet_log)
