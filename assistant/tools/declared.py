"""Tools declared in the config: an HTTP endpoint, or a command run without a shell.

An HTTP tool gets the call's JSON arguments as the body of a POST (or as
the query of a GET) and its answer's body is the result. A command tool
gets them as JSON on stdin and its stdout is the result; it runs as the
argv given (no shell, so no argument can inject one), and a call cut off
by its time or by the user kills it. A status other than 2xx, a non-zero
exit or an answer too big to speak is a failure (pipeline/tools.py turns
it into the spoken apology).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Final

from pipeline.tools import ToolSpec

from ..config import ToolConfig

MAX_OUTPUT_BYTES: Final = 64 * 1024


class ToolFailed(RuntimeError):
    """A tool answered with a failure; the message says what it was."""


def spec_of(tool: ToolConfig) -> ToolSpec:
    return ToolSpec(tool.name, tool.description, tool.parameters, tuple(tool.keywords))


def _text(body: bytes) -> str:
    """An answer as text: JSON compacted, anything else decoded."""
    if len(body) > MAX_OUTPUT_BYTES:
        raise ToolFailed(f"the answer is {len(body)} bytes, more than {MAX_OUTPUT_BYTES}")
    text = body.decode("utf-8", errors="replace").strip()
    with contextlib.suppress(ValueError):
        return json.dumps(json.loads(text), ensure_ascii=False, separators=(", ", ": "))
    return text


class HttpTool:
    """A call is one HTTP request to the configured URL."""

    def __init__(self, tool: ToolConfig) -> None:
        assert tool.http is not None
        self.spec = spec_of(tool)
        self.http = tool.http

    async def call(self, arguments: dict[str, Any]) -> str:
        import httpx

        async with httpx.AsyncClient(follow_redirects=False) as client:
            if self.http.method == "GET":
                query = {k: v if isinstance(v, str) else json.dumps(v) for k, v in arguments.items()}
                response = await client.get(self.http.url, params=query, headers=self.http.headers)
            else:
                response = await client.post(self.http.url, json=arguments, headers=self.http.headers)
        if not 200 <= response.status_code < 300:
            raise ToolFailed(f"{self.http.url} answered {response.status_code}")
        return _text(response.content)


class CommandTool:
    """A call runs the command with the arguments as JSON on stdin."""

    def __init__(self, tool: ToolConfig) -> None:
        assert tool.command is not None
        self.spec = spec_of(tool)
        self.argv = list(tool.command)

    async def call(self, arguments: dict[str, Any]) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise ToolFailed(f"cannot run {self.argv[0]}: {exc.strerror or exc}") from None
        try:
            out, err = await proc.communicate(json.dumps(arguments).encode("utf-8"))
        finally:
            if proc.returncode is None:  # cut off (its time, a barge-in): it must not linger
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())
        if proc.returncode != 0:
            last = err.decode("utf-8", errors="replace").strip().splitlines()[-1:] or [""]
            raise ToolFailed(f"{self.argv[0]} exited with {proc.returncode}: {last[0][:200]}")
        return _text(out)
