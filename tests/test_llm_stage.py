"""The LLM stage with a stand-in engine: a reply that loops is stopped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from pipeline.frames import END, LLMDone, LLMToken, ReplyRequest
from pipeline.llm import LLMStage, runaway
from pipeline.runtime import Channel

from fakes import context


def test_runaway_sees_loops_not_language() -> None:
    assert runaway("The answer is 1" + ",000" * 12)
    assert runaway("ha " * 16)
    assert runaway("." * 48)
    assert not runaway("," + "000" * 3)  # too short to tell
    assert not runaway("The boiling point of water is one hundred degrees Celsius at sea level.")
    assert not runaway("It is 1,000,000 kilometres away, give or take a few.")
    assert not runaway("Paris is the capital of France. Paris is lovely in spring.")


class LoopingModel:
    """Writes a number that never ends (the small model's failure seen in the soak)."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def stream(
        self, messages: list[dict[str, str]], request_id: str, session_id: str = ""
    ) -> AsyncIterator[tuple[str, str | None]]:
        for token in ["The", " answer", " is", " 1", *[",000"] * 200]:
            await asyncio.sleep(0)
            yield token, None
        yield "", "length"

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class History:
    def messages(self, upto: int | None = None) -> list[dict[str, str]]:
        return [{"role": "system", "content": "sys"}, {"role": "user", "content": "How far is the sun?"}]


def test_a_looping_reply_is_stopped_and_its_request_aborted() -> None:
    async def main() -> list[Any]:
        ctx, _ = context()
        model = LoopingModel()
        stage = LLMStage(ctx, model, History(), "s")
        sink: Channel[Any] = Channel("sink", 10_000)
        stage.outbox = sink
        turn = ctx.turns.new()
        await stage.inbox.put(ReplyRequest(turn_id=turn.id, text="How far is the sun?"))
        await stage.inbox.put(END)
        await stage.run()
        out = [await sink.get() for _ in range(len(sink))]
        assert model.aborted, "the looping request was not aborted"
        return out

    out = asyncio.run(main())
    tokens = [o for o in out if isinstance(o, LLMToken)]
    (done,) = [o for o in out if isinstance(o, LLMDone)]
    assert done.finish_reason == "repetition"
    assert 12 <= len(tokens) < 30, len(tokens)  # stopped once the loop showed, not at max_tokens
    assert done.text.startswith("The answer is 1,000")


class DownModel:
    """An engine that fails after ``words`` tokens (0: before any)."""

    def __init__(self, words: int) -> None:
        self.words = words
        self.aborted: list[str] = []

    async def stream(
        self, messages: list[dict[str, str]], request_id: str, session_id: str = ""
    ) -> AsyncIterator[tuple[str, str | None]]:
        from pipeline.llm import EngineUnavailable

        for token in ["Paris", " is", " lovely"][: self.words]:
            yield token, None
        raise EngineUnavailable("the language model server does not answer")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def test_a_failed_engine_ends_the_reply_with_the_error_phrase_and_aborts() -> None:
    """The loop every reply goes through (the LLM stage's, Wyoming's): the failure is told
    before the phrase is said, the phrase follows what was written, the request is aborted."""
    from pipeline.llm import ReplyStream

    async def one(words: int) -> tuple[list[str], list[str], ReplyStream, DownModel]:
        model = DownModel(words)
        told: list[str] = []
        deltas: list[str] = []
        async with ReplyStream(model, [], "r1", error_reply="Sorry.", on_failure=told.append) as reply:
            async for delta in reply:
                deltas.append(delta if reply.failure is None else f"after {told}: {delta}")
        return deltas, told, reply, model

    deltas, told, reply, model = asyncio.run(one(0))
    assert deltas == ["after ['the language model server does not answer']: Sorry."]
    assert reply.failure == told[0] and reply.finish_reason == "error" and reply.text == "Sorry."
    assert model.aborted == ["r1"]
    deltas, _, reply, model = asyncio.run(one(2))
    assert deltas[:2] == ["Paris", " is"] and deltas[2].endswith(":  Sorry.")  # a space before the phrase
    assert reply.text == "Paris is Sorry." and model.aborted == ["r1"]


class FiniteModel(DownModel):
    async def stream(
        self, messages: list[dict[str, str]], request_id: str, session_id: str = ""
    ) -> AsyncIterator[tuple[str, str | None]]:
        for token in ["Paris", " is", " lovely."]:
            yield token, None
        yield "", "stop"


def test_a_finished_reply_is_not_aborted_and_a_consumer_that_leaves_is() -> None:
    from pipeline.llm import ReplyStream

    async def main() -> tuple[list[str], list[str], ReplyStream]:
        finished = FiniteModel(0)
        async with ReplyStream(finished, [], "done") as reply:
            async for _ in reply:
                pass
        left = FiniteModel(0)
        try:
            async with ReplyStream(left, [], "gone") as gone:
                async for delta in gone:
                    if delta == " is":
                        raise ConnectionError("the client left")
        except ConnectionError:
            pass
        return finished.aborted, left.aborted, reply

    finished, left, reply = asyncio.run(main())
    assert finished == [] and reply.finish_reason == "stop" and reply.text == "Paris is lovely."
    assert left == ["gone"]


def test_the_local_engine_parses_calls_a_trained_model_chooses_and_passes_prose_on() -> None:
    """``llm.tool_parser: hermes``: the template gets the tools; ``<tool_call>`` blocks become
    call pieces, prose streams as text at once (no engine: a scripted one)."""
    from types import SimpleNamespace

    from assistant.engine.local import VLLMModel
    from pipeline.llm import CallPiece
    from pipeline.tools import ToolChoice, ToolSpec

    class Engine:
        def __init__(self, pieces: list[str]) -> None:
            self.pieces = pieces

        async def generate(self, prompt: str, params: Any, request_id: str) -> Any:
            for i, piece in enumerate(self.pieces):
                finished = i == len(self.pieces) - 1
                yield SimpleNamespace(finished=finished, outputs=[SimpleNamespace(
                    text=piece, finish_reason="stop" if finished else None)])

    class Tokenizer:
        def __init__(self) -> None:
            self.tools: Any = None

        def apply_chat_template(self, messages: Any, tools: Any = None, **kwargs: Any) -> str:
            self.tools = tools
            return "prompt"

    weather = ToolSpec("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})

    async def run(pieces: list[str]) -> tuple[list[Any], Tokenizer]:
        tokenizer = Tokenizer()
        model = VLLMModel(Engine(pieces), tokenizer, 50, 0.0, 1.0, tool_parser="hermes")
        items = [item async for item in model.stream([{"role": "user", "content": "hi"}], "r", "s", [weather],
                                                    ToolChoice("auto"))]
        return items, tokenizer

    items, tokenizer = asyncio.run(run(["<tool", "_call>\n{\"name\": \"get_weather\", ",
                                        "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"]))
    assert tokenizer.tools == [weather.openai()["function"]]
    calls = [i for i in items if isinstance(i, CallPiece)]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert items[-1] == ("", "tool_calls")
    items, _ = asyncio.run(run(["It is", " sunny."]))
    assert items == [("It is", None), (" sunny.", "stop")]
    items, _ = asyncio.run(run(["<tool_call>not json</tool_call>"]))  # not a call: said as it was written
    assert items == [("<tool_call>not json</tool_call>", None), ("", "stop")]
    items, _ = asyncio.run(run(['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}']))  # no tags
    assert [(i.name, json.loads(i.arguments)) for i in items if isinstance(i, CallPiece)] == [
        ("get_weather", {"city": "Oslo"})]
    items, _ = asyncio.run(run(['{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}']))
    assert [json.loads(i.arguments) for i in items if isinstance(i, CallPiece)] == [{"city": "Rome"}]
    items, _ = asyncio.run(run(['{"name": "launch_rockets"}']))  # not one of the tools
    assert not [i for i in items if isinstance(i, CallPiece)]
