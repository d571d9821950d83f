"""The LLM stage with a stand-in engine: a reply that loops is stopped."""

from __future__ import annotations

import asyncio
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
