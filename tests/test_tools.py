"""Function calls as a step of the turn, on the plumbing alone (fakes for the
models and the tool): the call, its result back to the model, the spoken
answer; a tool that fails, hangs or returns garbage becomes the apology; an
acknowledgement while a slow call runs; a barge-in cancels a call in flight;
the history keeps calls and results. The real models and a real MCP server
run in test_tools_real.py and test_realtime.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from pipeline.builder import ChunkerSettings, Components, HistorySettings, PipelineSettings, build_pipeline
from pipeline.frames import (
    END,
    Event,
    LLMDone,
    ReplyAudioStarted,
    ReplyInterrupted,
    SpeechStarted,
    SpeechStopped,
    ToolCallDelta,
    ToolCalled,
    ToolResult,
    TranscriptFinal,
    TurnCancelled,
    TurnCompleted,
    now,
)
from pipeline.playback import TimelineOutput
from pipeline.report import TurnReport
from pipeline.runtime import Budget, run_stages
from pipeline.tools import ToolChoice, ToolSpec, call_schema, preselect
from pipeline.turns import TurnSettings
from pipeline.turns.history import NO_RESULT, Conversation

from fakes import FakeToolbox, FakeToolLLM, FakeTranscriber, FakeVoice

APOLOGY = "Sorry, no weather now."


class ToolRig:
    """A pipeline from the LLM stage on, with fakes, its tool stage and a report."""

    def __init__(self, toolbox: FakeToolbox | None, budgets: tuple[Budget, ...] = (), **turns: Any) -> None:
        self.llm = FakeToolLLM()
        self.toolbox = toolbox
        self.output = TimelineOutput(16000, 16000)
        settings = PipelineSettings(
            chunker=ChunkerSettings(first_min_words=2), output_rate=16000, history=HistorySettings("sys", 500),
            turns=TurnSettings(early_reply=False, tool_apology=APOLOGY, **turns), budgets=budgets,
        )
        components = Components(transcriber=FakeTranscriber(), llm=self.llm, synthesizer=FakeVoice(),
                                toolbox=toolbox, phrase=lambda text: np.full(8000, 500, np.int16))
        self.pipeline = build_pipeline(components, settings, self.output, "t")
        self.bus = self.pipeline.bus
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.report = TurnReport(self.bus, now(), 16000, self.pipeline.watchdog)
        self.runners: list[asyncio.Task[None]] = []

    def start(self) -> None:
        p = self.pipeline
        self.runners = [asyncio.create_task(run_stages(p.stages[2:])), asyncio.create_task(p.tools.run())]

    def ask(self, text: str) -> int:
        turn = self.pipeline.ctx.turns.new().id
        t = now()
        self.bus.publish(SpeechStarted(turn_id=turn, onset_at=t - 1, onset_position=0))
        self.bus.publish(SpeechStopped(turn_id=turn, last_voiced_at=t, last_voiced_position=16000))
        self.bus.publish(TranscriptFinal(turn_id=turn, text=text))
        return turn

    async def closed(self, turn: int, timeout: float = 5.0) -> Event:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for e in self.events:
                if isinstance(e, TurnCompleted | TurnCancelled) and e.turn_id == turn:
                    return e
            await asyncio.sleep(0.01)
        raise AssertionError(f"turn {turn} never closed: {[type(e).__name__ for e in self.events]}")

    async def stop(self) -> None:
        await self.pipeline.llm.inbox.put(END)
        await asyncio.wait_for(asyncio.gather(*self.runners[:1]), 5)
        self.pipeline.tools.inbox.put_nowait(END)
        await asyncio.wait_for(asyncio.gather(*self.runners[1:]), 5)

    def of(self, kind: type, turn: int) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and e.turn_id == turn]


def test_a_question_with_a_tools_keyword_calls_it_and_the_answer_uses_the_result() -> None:
    async def main() -> None:
        rig = ToolRig(FakeToolbox())
        rig.start()
        turn = rig.ask("What's the weather like in Paris?")
        assert isinstance(await rig.closed(turn), TurnCompleted)
        await rig.stop()
        # The call was forced by the keyword, streamed, run, and answered from.
        assert rig.llm.choices[0] == ToolChoice("named", "get_weather")
        assert "".join(d.delta for d in rig.of(ToolCallDelta, turn)) == '{"city": "Paris"}'
        (called,) = rig.of(ToolCalled, turn)
        assert [(c.name, json.loads(c.arguments)) for c in called.calls] == [("get_weather", {"city": "Paris"})]
        assert rig.toolbox is not None and rig.toolbox.calls == [{"city": "Paris"}]
        (result,) = rig.of(ToolResult, turn)
        assert result.error is None and "18 degrees" in result.output
        assert rig.llm.choices[1] is None  # a forced call is not forced twice: no tools the second time
        (done,) = rig.of(LLMDone, turn)
        assert "18 degrees" in done.text  # the fake reads the result back
        # The history: the question, the call, its result, the answer.
        messages = rig.pipeline.conversation.messages()[1:]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
        assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert messages[2]["tool_call_id"] == messages[1]["tool_calls"][0]["id"]
        # The report has the call as its own span.
        record = rig.report.to_json()[0]
        assert {"tool_start", "tool_done"} <= set(record["milestones_ms"])
        assert record["latency_ms"]["tool_call"] >= 0

    asyncio.run(main())


def test_a_question_without_a_keyword_is_answered_without_a_call() -> None:
    async def main() -> None:
        rig = ToolRig(FakeToolbox())
        rig.start()
        turn = rig.ask("Tell me a joke.")
        assert isinstance(await rig.closed(turn), TurnCompleted)
        await rig.stop()
        assert rig.llm.choices[0].mode == "auto" and not rig.of(ToolCalled, turn)
        assert rig.toolbox is not None and rig.toolbox.calls == []

    asyncio.run(main())


def _failed_call(behaviour: str, timeout_s: float = 5.0) -> tuple[ToolRig, int]:
    async def main() -> tuple[ToolRig, int]:
        rig = ToolRig(FakeToolbox(behaviour, timeout_s))
        rig.start()
        turn = rig.ask("Will it rain in Oslo?")
        assert isinstance(await rig.closed(turn), TurnCompleted)
        await rig.stop()
        return rig, turn

    return asyncio.run(main())


def test_a_tool_that_fails_or_returns_garbage_becomes_the_spoken_apology() -> None:
    for behaviour, why in (("fail", "503"), ("garbage", "not text")):
        rig, turn = _failed_call(behaviour)
        (result,) = rig.of(ToolResult, turn)
        assert result.error is not None and why in result.error
        (done,) = rig.of(LLMDone, turn)
        assert done.text == APOLOGY and rig.of(ReplyAudioStarted, turn)
        assert len(rig.llm.prompts) == 1  # the model is not asked to improvise from a failure
        tool = [m for m in rig.pipeline.conversation.messages() if m["role"] == "tool"]
        assert tool and tool[0]["content"].startswith("error:")  # the next turn knows


def test_a_tool_that_hangs_gets_its_time_then_the_apology() -> None:
    rig, turn = _failed_call("hang", timeout_s=0.3)
    (result,) = rig.of(ToolResult, turn)
    assert result.error == "no answer within 0.3 s" and result.elapsed_ms >= 300
    assert rig.toolbox is not None and rig.toolbox.cancelled == 1  # not left running
    assert rig.of(LLMDone, turn)[0].text == APOLOGY


def test_a_slow_call_is_acknowledged_and_a_barge_in_cancels_it() -> None:
    async def main() -> None:
        rig = ToolRig(FakeToolbox("hang"), budgets=(Budget("tool_call", 50, "acknowledge"),))
        rig.start()
        turn = rig.ask("What's the weather in Rome?")
        for _ in range(200):  # the acknowledgement plays while the call runs
            if rig.of(ReplyAudioStarted, turn):
                break
            await asyncio.sleep(0.01)
        assert rig.of(ReplyAudioStarted, turn) and not rig.of(ToolResult, turn)
        interrupting = rig.pipeline.ctx.turns.new().id
        rig.bus.publish(SpeechStarted(turn_id=interrupting, onset_at=now(), onset_position=0, barge_in=True))
        assert isinstance(await rig.closed(turn), TurnCancelled)
        assert rig.of(ReplyInterrupted, turn)
        await asyncio.sleep(0.05)
        assert rig.toolbox is not None and rig.toolbox.cancelled == 1 and not rig.of(ToolResult, turn)
        rig.pipeline.ctx.turns.cancel(interrupting, "done")
        await rig.stop()
        # The call stays in the history with a result that says what happened.
        tool = [m for m in rig.pipeline.conversation.messages() if m["role"] == "tool"]
        assert [m["content"] for m in tool] == [NO_RESULT]

    asyncio.run(main())


def test_a_call_to_a_clients_tool_ends_the_reply_and_its_output_comes_back_through_the_history() -> None:
    async def main() -> None:
        rig = ToolRig(None)
        weather = FakeToolbox().specs[0]
        rig.pipeline.controller.set_tools((weather,), ToolChoice("named", "get_weather"))
        rig.start()
        turn = rig.ask("What's the weather in Lima?")
        assert isinstance(await rig.closed(turn), TurnCompleted)
        (called,) = rig.of(ToolCalled, turn)
        assert not rig.of(ToolResult, turn) and rig.of(LLMDone, turn)[0].text == ""
        controller = rig.pipeline.controller
        answer = rig.pipeline.ctx.turns.new().id
        controller.add_result(answer, called.calls[0].call_id, "Cloudy, 15 degrees.")
        reply = rig.pipeline.ctx.turns.new().id
        controller.respond(reply)
        assert isinstance(await rig.closed(reply), TurnCompleted)
        await rig.stop()
        # The session's forced choice is not forced again right after its result.
        assert rig.llm.choices[-1] is None
        assert "Cloudy" in rig.of(LLMDone, reply)[0].text
        roles = [m["role"] for m in rig.pipeline.conversation.messages()[1:]]
        assert roles == ["user", "assistant", "tool", "assistant"]

    asyncio.run(main())


def test_tool_choice_forms_schemas_and_keyword_preselection() -> None:
    weather = ToolSpec("get_weather", parameters={"type": "object", "properties": {"city": {"type": "string"}}},
                       keywords=("weather", "rain"))
    clock = ToolSpec("get_time", keywords=("time",))
    assert ToolChoice.of("required").forced and not ToolChoice.of("auto").forced
    assert ToolChoice.of({"type": "function", "name": "get_time"}) == ToolChoice("named", "get_time")
    assert ToolChoice.of({"type": "function", "function": {"name": "x"}}) == ToolChoice("named", "x")
    for bad in ("sometimes", {"type": "function"}, 3):
        try:
            ToolChoice.of(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    assert call_schema([weather], ToolChoice("named", "get_weather")) == dict(weather.parameters)
    required = call_schema([weather, clock], ToolChoice("required"))
    assert required is not None and len(required["anyOf"]) == 2
    assert preselect([weather, clock], "Is it raining in Paris?") == ToolChoice("named", "get_weather")
    assert preselect([weather, clock], "What time is it? And the weather?") is None  # two tools: the model decides
    assert preselect([weather, clock], "Hello there") is None


def test_the_history_trims_a_call_with_its_question_and_answers_late_results() -> None:
    from pipeline.tools import ToolCall

    conversation = Conversation("sys", 12, lambda text: len(text.split()))
    conversation.open(1, "weather in Paris")
    conversation.called(1, (ToolCall("c1", "get_weather", '{"city": "Paris"}'),))
    conversation.draft(1, "")
    conversation.commit(1)  # a client's call: settled before its result
    assert conversation.result("c1", "Sunny")
    assert not conversation.result("unknown", "x")
    conversation.open(2, "and tomorrow in Paris as well please")
    messages = conversation.messages(upto=2)
    assert messages[1]["role"] == "user"  # never a call or a result without its question


def test_a_call_the_client_runs_gets_no_acknowledgement() -> None:
    """A response that is a client's forced call has no audio of its own: no "One moment." either."""

    async def main() -> None:
        rig = ToolRig(None, budgets=(Budget("llm_first_token", 1, "acknowledge"),))
        rig.pipeline.controller.set_tools((FakeToolbox().specs[0],), ToolChoice("named", "get_weather"))
        rig.start()
        turn = rig.ask("What's the weather in Lima?")
        assert isinstance(await rig.closed(turn), TurnCompleted)
        await rig.stop()
        assert rig.of(ToolCalled, turn) and not rig.of(ReplyAudioStarted, turn)

    asyncio.run(main())
