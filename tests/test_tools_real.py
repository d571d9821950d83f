"""Tools with the real models: a spoken question answered from a real MCP
server's tool (examples/mcp_demo_server.py over stdio), the call chosen by
its keywords and written by the default model under the tool's schema."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import pytest

from assistant.config import load_config
from assistant.session import Session
from assistant.tools import Tools
from audio.framing import file_source
from helpers import ASSETS, ROOT, TEST_OVERRIDES, load_pcm
from pipeline.frames import Event, ToolCalled, ToolResult
from pipeline.playback import TimelineOutput

pytestmark = pytest.mark.slow

DEMO = [sys.executable, str(ROOT / "examples" / "mcp_demo_server.py")]
HOURS = {"opening_hours": ["open", "opening", "closed", "close"]}


def test_a_spoken_question_is_answered_from_an_mcp_servers_tool(models: Any, run: Any) -> None:
    config = load_config(overrides=[*TEST_OVERRIDES, f"tools.mcp={json.dumps([{'command': DEMO, 'keywords': HOURS}])}"])
    tools = Tools(config)
    run(tools.start())
    try:
        session = Session(dataclasses.replace(models, toolbox=tools), config,
                          TimelineOutput(config.audio.output_rate, 16000))
        events: list[Event] = []
        session.bus.subscribe(events.append)
        pcm = load_pcm(ASSETS / "tools" / "hours_monday.wav")
        run(session.run(file_source(pcm, 16000, config.audio.frame_ms, realtime=True, start=session.origin)))
    finally:
        run(tools.close())
    (turn,) = session.report.to_json()
    assert turn["status"] == "completed", turn
    (called,) = [e for e in events if isinstance(e, ToolCalled)]
    (call,) = called.calls
    assert call.name == "opening_hours" and isinstance(json.loads(call.arguments)["day"], str)
    (result,) = [e for e in events if isinstance(e, ToolResult)]
    assert result.error is None, result.error  # the MCP server answered
    # The answer was written with the result in its prompt, and spoken.
    messages = session.conversation.messages()
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "tool", "assistant"]
    assert messages[3]["content"] == result.output and messages[4]["content"]
    assert turn["reply"] and turn["reply_audio_seconds"] > 0.5
    assert {"tool_start", "tool_done"} <= set(turn["milestones_ms"]) and "tool_call" in turn["latency_ms"]
