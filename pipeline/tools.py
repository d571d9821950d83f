"""Function calls: the tools a reply may call, the calls, and the stage that runs them.

A reply request carries the tools the model may call and how it must
choose (:class:`ToolChoice`, OpenAI's ``tool_choice``: ``auto``, ``none``,
``required`` or one tool by name). The LLM stage streams a call's arguments
as :class:`~pipeline.frames.ToolCallDelta` and ends that step of the turn
with :class:`~pipeline.frames.ToolCalled`; the turn controller decides what
follows (:mod:`pipeline.turns.controller`): a tool this process runs goes
to :class:`ToolStage`, whose :class:`~pipeline.frames.ToolResult` goes back
to the model for the spoken answer; a tool the client runs (the Realtime
API's function calls) ends the response, and the client's output comes
back through the session.

What a tool *is* (an HTTP endpoint, a command, an MCP server's tool) is the
application's business (``assistant/tools/``): here it is a
:class:`Toolbox`. A tool that fails, hangs past its time or returns
something unusable yields a result with ``error`` set, never an exception
that would end the turn.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .frames import NO_TOOLS, ToolCall, ToolChoice, ToolRequest, ToolResult, ToolSpec
from .runtime import PipelineContext, Stage

__all__ = ["NO_TOOLS", "ToolCall", "ToolChoice", "ToolSpec", "ToolStage", "Toolbox", "call_schema", "new_call_id",
           "offered", "plain_messages", "preselect", "tools_note"]

log = logging.getLogger("pipeline.tools")

RESULT_CHARS = 2000
"""A result is cut to this many characters before it goes into the prompt."""


def new_call_id() -> str:
    return f"call_{secrets.token_hex(8)}"


def offered(tools: Sequence[ToolSpec], choice: ToolChoice) -> list[ToolSpec]:
    """The tools a request shows the model: none for ``none``, the one for ``named``."""
    if choice.mode == "none":
        return []
    if choice.mode == "named":
        return [t for t in tools if t.name == choice.name]
    return list(tools)


def call_schema(tools: Sequence[ToolSpec], choice: ToolChoice) -> dict[str, Any] | None:
    """The JSON schema a forced call is generated under (structured outputs):
    the named tool's arguments, or for ``required`` one of ``{"name", "arguments"}``."""
    if choice.mode == "named":
        tool = next((t for t in tools if t.name == choice.name), None)
        return dict(tool.parameters) if tool is not None else None
    if choice.mode == "required" and tools:
        return {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name},
                                                            "arguments": dict(t.parameters)},
                           "required": ["name", "arguments"]} for t in tools]}
    return None


def preselect(tools: Sequence[ToolSpec], words: str) -> ToolChoice | None:
    """The one tool whose keywords the user's words hold, as a named choice
    (None: no tool's, or more than one's). A keyword matches a word it
    begins ("rain" in "raining"), several words a phrase."""
    said = re.findall(r"[a-z0-9']+", words.lower())
    text = f" {' '.join(said)}"

    def holds(keyword: str) -> bool:
        key = " ".join(re.findall(r"[a-z0-9']+", keyword.lower()))
        return bool(key) and f" {key}" in text

    hits = [t for t in tools if any(holds(k) for k in t.keywords)]
    return ToolChoice("named", hits[0].name) if len(hits) == 1 else None


class Toolbox(Protocol):
    """Tools this process runs itself (the application's: HTTP, commands, MCP)."""

    @property
    def specs(self) -> Sequence[ToolSpec]: ...

    def timeout_s(self, name: str) -> float: ...

    async def call(self, name: str, arguments: dict[str, Any]) -> str:
        """The tool's result as text; raise on failure (the stage turns it into an error)."""
        ...


class ToolStage(Stage):
    """Runs the calls the turn controller hands it, each within its time.

    It sits beside the chain, not in it: the controller sends it a
    :class:`~pipeline.frames.ToolRequest` and reads the
    :class:`~pipeline.frames.ToolResult` it publishes. Its work is the
    reply's (``scope = "reply"``): a barge-in or a dropped early reply
    cancels a call in flight.
    """

    name = "tools"
    scope = "reply"

    def __init__(self, ctx: PipelineContext, toolbox: Toolbox | None) -> None:
        super().__init__(ctx)
        self.toolbox = toolbox

    async def handle(self, item: Any) -> None:
        if not isinstance(item, ToolRequest):
            return
        call = item.call
        started = time.perf_counter()
        output, error = await self._run(call)
        if error is not None:
            log.warning("turn %s: tool %s failed: %s", item.turn_id, call.name, error)
        self.publish(ToolResult(turn_id=item.turn_id, call_id=call.call_id, name=call.name, output=output,
                                error=error, elapsed_ms=round((time.perf_counter() - started) * 1000, 1)))

    async def _run(self, call: Any) -> tuple[str, str | None]:
        toolbox = self.toolbox
        if toolbox is None or not any(t.name == call.name for t in toolbox.specs):
            return "", f"there is no tool {call.name!r}"
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            return "", f"the arguments are not JSON: {call.arguments[:120]!r}"
        if not isinstance(arguments, dict):
            return "", "the arguments are not a JSON object"
        timeout = toolbox.timeout_s(call.name)
        try:
            output = await asyncio.wait_for(toolbox.call(call.name, arguments), timeout)
        except TimeoutError:
            return "", f"no answer within {timeout:g} s"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the tool's failure, not the session's
            return "", f"{type(exc).__name__}: {str(exc)[:200]}"
        if not isinstance(output, str):
            return "", f"the tool returned {type(output).__name__}, not text"
        output = output.strip()
        if not output or "\x00" in output:
            return "", "the tool returned nothing usable"
        return output[:RESULT_CHARS], None


def tools_note(tools: Sequence[ToolSpec]) -> str:
    """The tools, described for a model whose chat template has no place for them."""
    lines = [f"- {t.name}({', '.join(t.parameters.get('properties', {}))}): {t.description}".rstrip(": ")
             for t in tools]
    return "You can look things up with these tools:\n" + "\n".join(lines) + (
        "\nWhen you call one, write its arguments as JSON, taken from the user's words.")


def plain_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[ToolSpec] = ()) -> list[dict[str, Any]]:
    """The chat for a template without tools (``llm.tool_parser: none``): the
    tools described in the system prompt, each call's result as a system
    line after the question, the calls themselves left out (a small model
    copies them into its answer)."""
    names = {c["id"]: c["function"] for m in messages for c in m.get("tool_calls") or ()}
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], message.get("content")
        if role == "tool":
            call = names.get(message.get("tool_call_id", ""), {"name": "a tool", "arguments": ""})
            out.append({"role": "system", "content": f"{call['name']}({call['arguments']}) returned: {content}\n"
                                                     "Answer the user from this result."})
        elif message.get("tool_calls"):
            if content:
                out.append({"role": role, "content": content})
        else:
            out.append({"role": role, "content": content or ""})
    if tools and out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{tools_note(tools)}"}
    return out
