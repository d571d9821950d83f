"""Budgets: the watchdog fires at the deadline, not after the fact."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from assistant.config import load_config
from assistant.session import Session
from audio.framing import file_source
from helpers import ASSETS, load_pcm, transcribe, words
from pipeline.frames import BudgetExceeded, Event, LLMToken, SpeechPaused, SpeechResumed, SpeechStopped, TranscriptFinal, TurnCompleted, now
from pipeline.playback import TimelineOutput
from pipeline.runtime import Budget, EventBus, Watchdog


def watch(budgets: list[Budget]) -> tuple[EventBus, Watchdog, list[tuple[BudgetExceeded, float]], list[Event]]:
    bus = EventBus()
    fired: list[tuple[BudgetExceeded, float]] = []
    events: list[Event] = []
    bus.subscribe(events.append)
    # Where the turn controller sits: it applies the policy as it hears the event.
    bus.route_to(lambda e: fired.append((e, now())) if isinstance(e, BudgetExceeded) else None)
    dog = Watchdog(bus, budgets)
    return bus, dog, fired, events


def test_a_late_stage_fires_on_time_and_a_punctual_one_never_does() -> None:
    async def main() -> None:
        bus, dog, fired, events = watch([Budget("asr_final", 100, "commit_partial"), Budget("llm_first_token", 300)])
        t0 = now()
        bus.publish(SpeechStopped(turn_id=1, at=t0, last_voiced_at=t0 - 0.5, last_voiced_position=0))
        await asyncio.sleep(0.25)
        assert len(fired) == 1
        event, when = fired[0]
        assert event.stage == "asr_final" and event.policy == "commit_partial"
        assert 0.1 <= when - t0 < 0.14  # at the deadline, within tens of ms
        assert 100 <= event.elapsed_ms < 140
        assert any(isinstance(e, BudgetExceeded) for e in events)
        # The final arrives late; the next stage's budget is met.
        bus.publish(TranscriptFinal(turn_id=1, text="hi"))
        await asyncio.sleep(0.1)
        bus.publish(LLMToken(turn_id=1, text="Hi", index=0))
        await asyncio.sleep(0.4)
        assert len(fired) == 1 and dog.exceeded["asr_final"] == 1 and dog.exceeded["llm_first_token"] == 0
        result = dog.results[1]
        assert result["asr_final"]["exceeded"] is True and result["llm_first_token"]["exceeded"] is False
        assert 90 <= result["llm_first_token"]["elapsed_ms"] < 150

    asyncio.run(main())


def test_a_resumed_pause_disarms_and_a_finished_turn_clears() -> None:
    async def main() -> None:
        bus, dog, fired, _ = watch([Budget("voice_to_voice", 100), Budget("turn", 150, "cancel")])
        t0 = now()
        bus.publish(SpeechPaused(turn_id=2, last_voiced_at=t0))
        await asyncio.sleep(0.05)
        bus.publish(SpeechResumed(turn_id=2))  # the user went on talking
        await asyncio.sleep(0.2)
        assert fired == []
        bus.publish(SpeechStopped(turn_id=2, at=now(), last_voiced_at=now(), last_voiced_position=0))
        bus.publish(TurnCompleted(turn_id=2))
        await asyncio.sleep(0.2)
        assert fired == []
        dog.close()

    asyncio.run(main())


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="no such budgeted stage"):
        Watchdog(EventBus(), [Budget("nap", 1)])


def converse(models: Any, run: Any, question: str, overrides: list[str]) -> tuple[Any, Session, TimelineOutput]:
    """One committed question through a session with some budgets overridden."""
    config = load_config(None, overrides)
    output = TimelineOutput(config.audio.output_rate, 16000)
    session = Session(models, config, output)
    pcm = load_pcm(ASSETS / "questions" / f"{question}.wav")
    run(session.run(file_source(pcm, 16000, 20, realtime=True, start=session.origin)))
    return config, session, output


@pytest.mark.slow
def test_late_first_token_plays_the_acknowledgement_before_the_answer(models: Any, run: Any) -> None:
    # (the reply must not start early at the pause, or its first token beats the final)
    config, session, output = converse(
        models, run, "boiling_point",
        ["budgets.llm_first_token_ms=1", "budgets.first_chunk_ms=0", "asr.final_at_pause=false"],
    )
    turn = session.report.to_json()[0]
    assert turn["status"] == "completed"
    exceeded = turn["budget_exceeded"]
    assert [e["stage"] for e in exceeded] == ["llm_first_token"] and exceeded[0]["elapsed_ms"] < 60
    rate = config.audio.output_rate
    audio = output.render()
    ack = models.phrase(config.budgets.acknowledgement, rate)
    start = int(np.flatnonzero(audio)[0] - np.flatnonzero(ack)[0])  # piper starts with silence
    # The acknowledgement is the first thing heard, whole, and the answer follows.
    assert np.array_equal(audio[start : start + len(ack)], ack)
    assert {"one", "moment"} <= set(words(transcribe(models, audio[start : start + len(ack)], rate)))
    rest = audio[start + len(ack) :]
    assert np.count_nonzero(rest) > rate // 2
    assert turn["reply"]


@pytest.mark.slow
def test_hard_cap_ends_the_turn_with_the_apology(models: Any, run: Any) -> None:
    config, session, output = converse(
        models, run, "make_tea", ["budgets.turn_ms=700", "budgets.llm_first_token_ms=0", "budgets.first_chunk_ms=0"]
    )
    run(asyncio.sleep(0.3))
    turn = session.report.to_json(include_dropped=True)[0]
    assert turn["status"] == "cancelled" and "turn budget" in turn["cancel_reason"]
    assert [e["stage"] for e in turn["budget_exceeded"]] == ["turn"]
    assert models.llm.pending_requests() == 0
    audio = output.render()
    apology = models.phrase(config.budgets.apology, config.audio.output_rate)
    start = int(np.flatnonzero(audio)[0])
    said = words(transcribe(models, audio[start:], config.audio.output_rate))
    assert "sorry" in said, said
    assert len(audio) - start <= len(apology) + config.audio.output_rate  # little else was said
