"""The tools this process runs itself: declared in the config, or an MCP server's.

:class:`Tools` is the :class:`pipeline.tools.Toolbox` every session of the
process shares (loaded once, like the models): the config's HTTP and
command tools (:mod:`.declared`) and the tools of each configured MCP
server (:mod:`.mcp`, over stdio or streamable HTTP). An MCP server's tools
are known once it has answered (:meth:`Tools.start`); one that cannot be
reached is logged and left out, and the assistant goes on without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from pipeline.tools import ToolSpec

from ..config import Config
from .declared import CommandTool, HttpTool, ToolFailed

__all__ = ["Tools", "ToolFailed", "load_tools"]

log = logging.getLogger("assistant.tools")


class _Tool(Protocol):
    spec: ToolSpec

    async def call(self, arguments: dict[str, Any]) -> str: ...


class Tools:
    """Every tool of the process by name, each with its time limit."""

    def __init__(self, config: Config) -> None:
        from .mcp import MCPTools

        self.default_timeout_s = config.tools.timeout_s
        self._tools: dict[str, _Tool] = {}
        self._timeouts: dict[str, float] = {}
        for tool in config.tools.declared:
            self._add(HttpTool(tool) if tool.http is not None else CommandTool(tool), tool.timeout_s)
        self.servers = [MCPTools(server) for server in config.tools.mcp]

    def _add(self, tool: _Tool, timeout_s: float | None) -> None:
        name = tool.spec.name
        if name in self._tools:
            log.warning("tool %s is offered twice; the first one is kept", name)
            return
        self._tools[name] = tool
        self._timeouts[name] = timeout_s or self.default_timeout_s

    async def start(self) -> None:
        """Reach each MCP server and add its tools."""
        for server in self.servers:
            try:
                tools = await server.start()
            except Exception as exc:  # noqa: BLE001 - any failure of a server is that server's
                log.warning("MCP server %s is unavailable, its tools are left out: %s", server.label, exc)
                continue
            for tool in tools:
                self._add(tool, server.timeout_s)
            log.info("MCP server %s: %d tools (%s)", server.label, len(tools),
                     ", ".join(t.spec.name for t in tools) or "none")

    async def close(self) -> None:
        for server in self.servers:
            await server.close()

    # ---- pipeline.tools.Toolbox ------------------------------------------

    @property
    def specs(self) -> Sequence[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    def timeout_s(self, name: str) -> float:
        return self._timeouts.get(name, self.default_timeout_s)

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        return await self._tools[name].call(arguments)


def load_tools(config: Config) -> Tools | None:
    """The configured tools (None when there are none)."""
    if not config.tools.declared and not config.tools.mcp:
        return None
    return Tools(config)
