"""The semantic end-of-turn model as endpointing's second opinion.

The rule (pure), the turn controller combining the model's score with the
words (a stand-in VAD records what silence it is told to require), the ASR
stage scoring at a pause (a fake scorer), and the real Smart Turn model
loaded from the pipecat-ai wheel.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from pipeline.asr import ASRStage
from pipeline.frames import (
    END,
    AudioFrame,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    TranscriptPartial,
    TurnEndScored,
    now,
)
from pipeline.turns import Conversation, EndpointRule, Stages, TurnController, TurnSettings

from fakes import FakeTranscriber, context
from helpers import ASSETS, load_pcm

RULE = EndpointRule(complete_ms=300, incomplete_ms=1000, semantic_ms=180, semantic_threshold=0.5)


def test_the_model_only_shortens_a_wait_the_words_allow() -> None:
    question = "What is the capital of France?"
    assert RULE.silence_ms(question, 0.9) == 180  # both say complete
    assert RULE.silence_ms(question, 0.1) == 300  # it doubts a complete question: no longer wait
    assert RULE.silence_ms(question) == 300  # no score (yet)
    assert RULE.silence_ms("I need some help with", 0.99) == 1000  # the words' "unfinished" stands
    assert RULE.silence_ms("paris", 0.9) == 300  # words can't tell, the model can
    assert RULE.silence_ms("paris", 0.2) is None  # neither: the VAD's own hangover
    without = EndpointRule(complete_ms=300, incomplete_ms=1000)
    assert without.silence_ms(question, 0.99) == 300  # not enabled: the score is ignored


class RecordingVAD:
    def __init__(self) -> None:
        self.required: list[int | None] = []

    def require_silence(self, turn_id: int, silence_ms: int | None) -> None:
        self.required.append(silence_ms)

    def set_assistant_speaking(self, speaking: bool) -> None:
        pass


def controller() -> tuple[Any, RecordingVAD, int]:
    ctx, _ = context()
    vad = RecordingVAD()
    settings = TurnSettings(endpoint=RULE, early_reply=False, await_words_ms=780)
    TurnController(ctx, Conversation("sys", 500, lambda text: len(text.split())), settings, Stages(vad=vad))  # type: ignore[arg-type]
    turn = ctx.turns.new()
    ctx.bus.publish(SpeechStarted(turn_id=turn.id, onset_at=now(), onset_position=0))
    return ctx, vad, turn.id


def words(turn_id: int, text: str) -> TranscriptPartial:
    return TranscriptPartial(turn_id=turn_id, stable=text, unstable="", covers_pause=True)


def test_the_controller_combines_the_score_with_the_words_in_either_order() -> None:
    ctx, vad, turn = controller()
    ctx.bus.publish(SpeechPaused(turn_id=turn, last_voiced_at=now()))
    ctx.bus.publish(words(turn, "What is the capital of France?"))
    ctx.bus.publish(TurnEndScored(turn_id=turn, probability=0.93, audio_end_at=now()))
    assert vad.required == [780, 300, 180]  # waiting for the words, the words, then both

    ctx, vad, turn = controller()
    ctx.bus.publish(SpeechPaused(turn_id=turn, last_voiced_at=now()))
    ctx.bus.publish(TurnEndScored(turn_id=turn, probability=0.93, audio_end_at=now()))
    assert vad.required == [780]  # a score alone decides nothing
    ctx.bus.publish(words(turn, "What is the capital of France?"))
    assert vad.required == [780, 180]


def test_a_score_belongs_to_its_pause_only() -> None:
    ctx, vad, turn = controller()
    ctx.bus.publish(SpeechPaused(turn_id=turn, last_voiced_at=now()))
    ctx.bus.publish(TurnEndScored(turn_id=turn, probability=0.97, audio_end_at=now()))
    ctx.bus.publish(SpeechResumed(turn_id=turn))
    ctx.bus.publish(SpeechPaused(turn_id=turn, last_voiced_at=now()))
    ctx.bus.publish(words(turn, "What is the capital of France?"))
    assert vad.required[-1] == 300  # the earlier pause's opinion is gone
    ctx.bus.publish(SpeechResumed(turn_id=turn))
    ctx.bus.publish(TurnEndScored(turn_id=turn, probability=0.97, audio_end_at=now()))
    assert vad.required[-1] == 300  # not paused: a late score is ignored


def test_the_asr_stage_scores_the_audio_at_a_pause(run: Any) -> None:
    ctx, events = context()
    heard: list[int] = []

    def scorer(audio: np.ndarray) -> float:
        heard.append(len(audio))
        return 0.75

    asr = ASRStage(ctx, FakeTranscriber(), None, turn_scorer=scorer)
    turn = ctx.turns.new()

    async def main() -> None:
        runner = asyncio.create_task(asr.run())
        t0 = now()
        await asr.inbox.put(SpeechStarted(turn_id=turn.id, onset_at=t0, onset_position=0))
        for i in range(50):  # one second of audio
            frame = AudioFrame(pcm=np.full(320, 1000, np.int16), sample_rate=16000, captured_at=t0 + i * 0.02,
                               position=i * 320, turn_id=turn.id)
            await asr.inbox.put(frame)
        await asr.inbox.put(SpeechPaused(turn_id=turn.id, last_voiced_at=t0 + 0.98))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if any(isinstance(e, TurnEndScored) for e in events):
                break
        await asr.inbox.put(END)
        await runner

    run(main())
    scored = [e for e in events if isinstance(e, TurnEndScored)]
    assert len(scored) == 1 and scored[0].probability == 0.75 and scored[0].turn_id == turn.id
    assert heard == [16000]  # the whole utterance up to the pause


def test_the_real_model_scores_a_question() -> None:
    from assistant.models import smart_turn_files
    from pipeline.turns.semantic import SmartTurn

    model = SmartTurn(*smart_turn_files())
    pcm = load_pcm(ASSETS / "questions" / "capital_of_france.wav").astype(np.float32) / 32768
    first = model(pcm)
    assert 0.0 <= first <= 1.0 and model(pcm) == first  # a probability, the same for the same audio
    assert 0.0 <= model(pcm[:8000]) <= 1.0 and 0.0 <= model(np.zeros(200_000, np.float32)) <= 1.0
    assert model.calls == 4 and model.cpu_s > 0
