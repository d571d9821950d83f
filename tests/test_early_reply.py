"""A reply started at a pause: held until the turn ends, dropped if the user goes on.

Fakes stand in for the models (this is the plumbing's test; the real-model
path is in test_end_to_end.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np

from pipeline.asr import ASRStage
from pipeline.chunker import ChunkerStage
from pipeline.frames import (
    END,
    AudioFrame,
    Event,
    ReplyAudioStarted,
    ReplyCancelled,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TranscriptFinal,
    now,
)
from pipeline.llm import Conversation, LLMStage
from pipeline.playback import PlaybackStage, TimelineOutput
from pipeline.runtime import EventBus, PipelineContext, TurnRegistry, connect, run_stages
from pipeline.tts import TTSStage


class FakeTranscriber:
    """Says how much audio it heard."""

    def __call__(self, audio: np.ndarray) -> str:
        return f"heard {round(len(audio) / 16000, 1)} seconds"


class FakeLLM:
    def __init__(self) -> None:
        self.live: set[str] = set()
        self.aborted: list[str] = []

    async def stream(self, messages: list[dict[str, str]], request_id: str) -> AsyncIterator[tuple[str, str | None]]:
        self.live.add(request_id)
        try:
            for word in ["You", " said", " it,", " and", " here", " is", " my", " answer."]:
                await asyncio.sleep(0.02)
                yield word, None
            yield "", "stop"
        finally:
            self.live.discard(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class FakeVoice:
    sample_rate = 16000

    def synthesize(self, text: str) -> Iterator[np.ndarray]:
        yield np.full(1600, 1000, np.int16)


def test_resumed_speech_drops_the_early_reply_and_answers_the_whole_turn() -> None:
    async def main() -> None:
        bus = EventBus()
        events: list[Event] = []
        bus.subscribe(events.append)
        ctx = PipelineContext(bus=bus, turns=TurnRegistry(bus))
        llm = FakeLLM()
        conversation = Conversation("sys", 500, llm.count_tokens)
        output = TimelineOutput(16000, 16000)
        bus.subscribe(output.observe)
        stages = [
            ASRStage(ctx, FakeTranscriber(), None, partial_interval_ms=10_000, final_at_pause=True),
            LLMStage(ctx, llm, conversation, "t"),
            ChunkerStage(ctx, first_min_words=2),
            TTSStage(ctx, FakeVoice(), None, 16000),
            PlaybackStage(ctx, output),
        ]
        connect(ctx, stages)
        runner = asyncio.create_task(run_stages(stages))
        asr = stages[0]
        turn = ctx.turns.new()
        position = 0

        async def speak(seconds: float) -> float:
            nonlocal position
            stamp = now()
            for _ in range(int(seconds * 50)):
                stamp = now()
                await asr.inbox.put(AudioFrame(np.ones(320, np.int16), 16000, stamp, position, turn.id))
                position += 320
            return stamp

        await asr.inbox.put(SpeechStarted(turn_id=turn.id, onset_at=now(), onset_position=0))
        last = await speak(1.0)
        await asr.inbox.put(SpeechPaused(turn_id=turn.id, last_voiced_at=last))
        await asyncio.sleep(0.1)  # the pause decode ends, the early reply starts
        assert any(isinstance(e, TranscriptFinal) and e.speculative for e in events)
        assert not any(isinstance(e, ReplyAudioStarted) for e in events)  # held: the user may go on
        await asr.inbox.put(SpeechResumed(turn_id=turn.id))
        last = await speak(1.0)
        await asr.inbox.put(SpeechPaused(turn_id=turn.id, last_voiced_at=last))
        await asyncio.sleep(0.05)
        stopped_at = now()
        stop = SpeechStopped(turn_id=turn.id, last_voiced_at=last, last_voiced_position=position)
        bus.publish(stop)  # as the VAD does: it opens the playback gate
        await asr.inbox.put(stop)
        await asr.inbox.put(END)
        await asyncio.wait_for(runner, 5)

        assert [e.reason for e in events if isinstance(e, ReplyCancelled)] == ["the user went on speaking"]
        assert llm.aborted and not llm.live
        # The conversation holds the whole turn once, and its answer.
        assert [(m["role"], m["content"]) for m in conversation.messages()[1:]] == [
            ("user", "heard 2.0 seconds"),
            ("assistant", "You said it, and here is my answer."),
        ]
        started = [e for e in events if isinstance(e, ReplyAudioStarted)]
        assert len(started) == 1 and started[0].at >= stopped_at - 0.01
        # Only the final reply's audio was played: two chunks of 1600 samples.
        assert np.count_nonzero(output.render()) == 2 * 1600

    asyncio.run(main())
