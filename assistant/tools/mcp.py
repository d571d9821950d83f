"""An MCP server's tools, over stdio (a command) or streamable HTTP (a URL).

The official ``mcp`` SDK's :class:`mcp.Client` does the protocol. Its
connection must be opened and closed in one task (anyio's cancel scopes),
so :class:`MCPTools` keeps it in a task of its own for the life of the
process; calls come from any session's tool stage. A call's failure on the
server (``is_error``) is a failure here (the spoken apology), with the
server's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from typing import Any, Final

from pipeline.tools import ToolSpec

from ..config import MCPServerConfig
from .declared import ToolFailed

log = logging.getLogger("assistant.tools")

CONNECT_TIMEOUT_S: Final = 30.0


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside anyio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class MCPTool:
    """One tool of an MCP server."""

    def __init__(self, server: MCPTools, spec: ToolSpec) -> None:
        self.server = server
        self.spec = spec

    async def call(self, arguments: dict[str, Any]) -> str:
        return await self.server.call(self.spec.name, arguments)


class MCPTools:
    """One configured MCP server: connected by :meth:`start`, closed by :meth:`close`."""

    def __init__(self, config: MCPServerConfig) -> None:
        self.config = config
        self.timeout_s = config.timeout_s
        self.label = config.url or shlex.join(config.command or [])
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _target(self) -> Any:
        from mcp import StdioServerParameters

        if self.config.url is not None:
            return self.config.url
        command = self.config.command or []
        return StdioServerParameters(command=command[0], args=command[1:])

    async def start(self) -> list[MCPTool]:
        """Connect and list the tools (an error that says why if the server cannot be reached)."""
        from mcp import Client

        ready: asyncio.Future[list[MCPTool]] = asyncio.get_running_loop().create_future()

        async def hold() -> None:
            try:
                async with Client(self._target()) as client:
                    listed = await client.list_tools()
                    self._client = client
                    keywords = self.config.keywords
                    ready.set_result([
                        MCPTool(self, ToolSpec(t.name, t.description or "", t.input_schema or {"type": "object"},
                                               tuple(keywords.get(t.name, ()))))
                        for t in listed.tools
                    ])
                    await self._stop.wait()
            except Exception as exc:  # noqa: BLE001 - reported to start(), or logged once it ran
                leaf = _leaf(exc)
                if not ready.done():
                    ready.set_exception(ToolFailed(f"{type(leaf).__name__}: {leaf}"))
                else:
                    log.warning("MCP server %s went away: %s", self.label, leaf)
            finally:
                self._client = None

        self._task = asyncio.create_task(hold(), name=f"mcp:{self.label[:40]}")
        try:
            return await asyncio.wait_for(asyncio.shield(ready), CONNECT_TIMEOUT_S)
        except TimeoutError:
            await self.close()
            raise ToolFailed(f"no answer within {CONNECT_TIMEOUT_S:g} s") from None

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        client = self._client
        if client is None:
            raise ToolFailed(f"the MCP server {self.label} is not connected")
        result = await client.call_tool(name, arguments)
        text = "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text").strip()
        if result.is_error:
            raise ToolFailed(text[:200] or "the MCP server reported an error")
        return text

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 5)
            self._task = None
