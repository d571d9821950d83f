"""The remote engine against a router with no live replica (vllm-router answers 503 in plain text).

No models: a small HTTP server on loopback answers as vllm-router does when
every replica is dead, and the engine must call itself down (so that
/healthz and /readyz say so and a load balancer can act) with the router's
own words, not "Error code: 503".
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from assistant.config import load_config
from assistant.engine.remote import RemoteModel, RemoteSettings
from pipeline.llm import EngineUnavailable


async def no_workers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    body = b"No workers are currently available"
    writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    writer.close()


def test_a_router_without_replicas_is_an_engine_that_is_down() -> None:
    async def main() -> tuple[str, dict[str, Any]]:
        server = await asyncio.start_server(no_workers, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = load_config(None, ["llm.engine=remote", f"llm.url=http://127.0.0.1:{port}/v1",
                                    "llm.model_name=m"])
        model = RemoteModel(RemoteSettings.from_config(config))
        model.state = "up"  # it answered before; now every replica is gone
        try:
            with pytest.raises(EngineUnavailable) as caught:
                async for _ in model.stream([{"role": "user", "content": "hi"}], "r1", "s1"):
                    pass
            return str(caught.value), model.health()
        finally:
            await model.aclose()
            server.close()

    message, health = asyncio.run(main())
    assert health["state"] == "down"
    assert "No workers are currently available" in health["error"] and "No workers" in message
