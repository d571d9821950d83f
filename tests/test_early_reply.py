"""A reply started at a pause: held until the turn ends, dropped if the user goes on.

Fakes stand in for the models (this is the plumbing's test; the real-model
path is in test_end_to_end.py).
"""

from __future__ import annotations

import asyncio

import numpy as np

from pipeline.builder import (
    ASRSettings,
    ChunkerSettings,
    Components,
    HistorySettings,
    PipelineSettings,
    build_pipeline,
)
from pipeline.frames import (
    END,
    AudioFrame,
    ReplyAudioStarted,
    ReplyCancelled,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    SpeechStopped,
    TranscriptFinal,
    now,
)
from pipeline.playback import TimelineOutput
from pipeline.runtime import run_stages
from pipeline.turns import TurnSettings

from fakes import FakeLLM, FakeTranscriber, FakeVoice, context


def test_resumed_speech_drops_the_early_reply_and_answers_the_whole_turn() -> None:
    async def main() -> None:
        ctx, events = context()
        bus = ctx.bus
        llm = FakeLLM()
        output = TimelineOutput(16000, 16000)
        settings = PipelineSettings(
            asr=ASRSettings(partial_interval_ms=10_000),
            chunker=ChunkerSettings(first_min_words=2),
            output_rate=16000,
            history=HistorySettings("sys", 500),
            turns=TurnSettings(early_reply=True),
        )
        components = Components(transcriber=FakeTranscriber(), llm=llm, synthesizer=FakeVoice())
        pipeline = build_pipeline(components, settings, output, "t", bus=bus)
        conversation = pipeline.conversation
        ctx = pipeline.ctx
        # Speech events come in straight at ASR (no VAD here), as the VAD
        # would send them; the controller hears them on the bus.
        stages = pipeline.stages[1:]
        runner = asyncio.create_task(run_stages(stages))
        asr = pipeline.asr

        async def put(item: object) -> None:
            if not isinstance(item, AudioFrame):
                bus.publish(item)  # what the VAD's send() does
            await asr.inbox.put(item)

        turn = ctx.turns.new()
        position = 0

        async def speak(seconds: float) -> float:
            nonlocal position
            stamp = now()
            for _ in range(int(seconds * 50)):
                stamp = now()
                await put(AudioFrame(np.ones(320, np.int16), 16000, stamp, position, turn.id))
                position += 320
            return stamp

        await put(SpeechStarted(turn_id=turn.id, onset_at=now(), onset_position=0))
        last = await speak(1.0)
        await put(SpeechPaused(turn_id=turn.id, last_voiced_at=last))
        await asyncio.sleep(0.1)  # the pause decode ends, the early reply starts
        assert any(isinstance(e, TranscriptFinal) and e.speculative for e in events)
        assert not any(isinstance(e, ReplyAudioStarted) for e in events)  # held: the user may go on
        await put(SpeechResumed(turn_id=turn.id))
        last = await speak(1.0)
        await put(SpeechPaused(turn_id=turn.id, last_voiced_at=last))
        await asyncio.sleep(0.05)
        stopped_at = now()
        stop = SpeechStopped(turn_id=turn.id, last_voiced_at=last, last_voiced_position=position)
        await put(stop)  # the controller opens the playback gate
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
