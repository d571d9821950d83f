"""The pipeline plumbing: channels, turn cancellation, stage error isolation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.frames import END, LLMToken, StageError, TurnCancelled
from pipeline.runtime import Channel, PipelineContext, Stage, connect, run_stages


from fakes import context as make_ctx


def test_channel_is_fifo_bounded_and_drops_a_turn() -> None:
    async def main() -> None:
        ch: Channel[Any] = Channel("t", maxsize=2)
        await ch.put(LLMToken(turn_id=1, text="a", index=0))
        await ch.put(LLMToken(turn_id=2, text="b", index=0))
        blocked = asyncio.create_task(ch.put(LLMToken(turn_id=1, text="c", index=1)))
        await asyncio.sleep(0.01)
        assert not blocked.done()  # back-pressure
        assert ch.drop_turn(1) == 1
        await asyncio.wait_for(blocked, 1)
        first, second = await ch.get(), await ch.get()
        assert (first.text, second.text) == ("b", "c")
        ch.put_nowait(1)
        ch.put_nowait(2)
        ch.put_nowait(3)
        assert ch.overflows == 1 and [await ch.get(), await ch.get()] == [2, 3]

    asyncio.run(main())


class Slow(Stage):
    name = "slow"

    def __init__(self, ctx: PipelineContext) -> None:
        super().__init__(ctx)
        self.started = asyncio.Event()
        self.finished: list[int] = []

    async def handle(self, item: Any) -> None:
        if item.text == "boom":
            raise RuntimeError("boom")
        self.started.set()
        await asyncio.sleep(10 if item.text == "slow" else 0)
        self.finished.append(item.turn_id)
        await self.send(item)


def test_cancelling_a_turn_interrupts_its_work_and_drops_its_frames() -> None:
    async def main() -> None:
        ctx, events = make_ctx()
        stage = Slow(ctx)
        sink: Channel[Any] = Channel("sink", 100)
        connect(ctx, [stage])
        stage.outbox = sink
        one, two = ctx.turns.new(), ctx.turns.new()
        await stage.inbox.put(LLMToken(turn_id=one.id, text="slow", index=0))
        await stage.inbox.put(LLMToken(turn_id=one.id, text="queued", index=1))
        await stage.inbox.put(LLMToken(turn_id=two.id, text="fast", index=0))
        await stage.inbox.put(END)
        runner = asyncio.create_task(run_stages([stage]))
        await asyncio.wait_for(stage.started.wait(), 1)
        assert ctx.cancel_turn(one.id, "test")
        assert not ctx.cancel_turn(one.id, "again")  # once only
        await asyncio.wait_for(runner, 2)
        assert stage.finished == [two.id]
        assert [e.reason for e in events if isinstance(e, TurnCancelled)] == ["test"]
        out = [await sink.get() for _ in range(len(sink))]
        assert [getattr(o, "text", None) for o in out] == ["fast", None]  # then END
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("slow:") and not t.done()]

    asyncio.run(main())


def test_a_failing_turn_becomes_an_error_event_and_the_stage_goes_on() -> None:
    async def main() -> None:
        ctx, events = make_ctx()
        stage = Slow(ctx)
        connect(ctx, [stage])
        stage.outbox = Channel("sink", 10)
        bad, good = ctx.turns.new(), ctx.turns.new()
        await stage.inbox.put(LLMToken(turn_id=bad.id, text="boom", index=0))
        await stage.inbox.put(LLMToken(turn_id=good.id, text="ok", index=0))
        await stage.inbox.put(END)
        await asyncio.wait_for(stage.run(), 2)
        errors = [e for e in events if isinstance(e, StageError)]
        assert len(errors) == 1 and errors[0].stage == "slow" and errors[0].message == "boom"
        assert ctx.turns.is_cancelled(bad.id) and stage.finished == [good.id]

    asyncio.run(main())


def test_endpoint_rule_reads_the_words() -> None:
    from pipeline.turns import EndpointRule

    rule = EndpointRule(complete_ms=300, incomplete_ms=1000)
    assert rule.silence_ms("What is the capital of France?") == 300
    assert rule.silence_ms("Tell me a joke.") == 300
    assert rule.silence_ms("I want to go to") == 1000
    assert rule.silence_ms("I want to go to.") == 1000  # Whisper's full stop does not finish it
    assert rule.silence_ms("Well, and then,") == 1000
    assert rule.silence_ms("How many legs does a spider have?") == 300
    assert rule.silence_ms("What I really want is.") == 1000
    assert rule.silence_ms("Can you tell me about the?") == 1000
    assert rule.silence_ms("paris") is None  # no punctuation: the VAD's own silence
    assert rule.silence_ms("") is None


def test_the_deadline_executor_runs_the_job_due_soonest_first() -> None:
    import threading

    from pipeline.frames import now
    from pipeline.runtime import DeadlineExecutor, run_blocking

    executor = DeadlineExecutor("test")
    busy = threading.Event()
    order: list[str] = []
    blocker = executor.submit(busy.wait, 5)  # the worker is busy: the rest queue up
    t = now()
    later = executor.submit_by(t + 10, order.append, "partial, due in 10 s")
    soon = executor.submit_by(t + 5, order.append, "final of another session, due in 5 s")
    same = executor.submit_by(t + 5, order.append, "its twin, submitted after it")
    dropped = executor.submit_by(t + 1, order.append, "cancelled while waiting")
    dropped.cancel()
    failing = executor.submit_by(t + 20, lambda: 1 / 0)
    busy.set()
    for future in (blocker, later, soon, same):
        future.result(timeout=5)
    assert order == ["final of another session, due in 5 s", "its twin, submitted after it", "partial, due in 10 s"]
    assert executor.reordered >= 2
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)

    async def awaited() -> int:
        return await run_blocking(executor, lambda x: x * 2, 21, deadline=now())

    assert asyncio.run(awaited()) == 42
    executor.shutdown(wait=True, cancel_futures=True)
    with pytest.raises(RuntimeError):
        executor.submit(print)
