"""Turn-taking scenarios with the real models, in the simulated room.

Each scenario (audio_assets/scenarios, built by make_scenarios.py from the
committed speech) is played at real-time pace into the full pipeline; the
assistant's replies go to a virtual speaker on the input's timeline and,
with echo on, back into the microphone through a simulated room and the
echo canceller. Each test asserts what happened: playback stopped and when,
the request gone, the history cut at what was heard, the number of turns.
The figures over the whole set come from `voice-assistant scenarios`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from assistant.evaluation.scenarios import EchoSettings, ScenarioResult, load_scenarios, run_scenario
from helpers import words
from pipeline.frames import LLMToken, ReplyInterrupted

SCENARIOS = {s["name"]: s for s in load_scenarios()}


def play(name: str, models: Any, config: Any, run: Callable[..., Any], echo: bool) -> ScenarioResult:
    settings = EchoSettings(delay_ms=80.0, gain_db=-10.0) if echo else None
    result = run(run_scenario(models, config, SCENARIOS[name], settings))
    assert models.llm.pending_requests() == 0, "a vLLM request outlived its turn"
    assert all(len(stage.inbox) == 0 for stage in result.session.stages), "work left queued"
    return result


def spoken_turns(result: ScenarioResult) -> list[dict[str, Any]]:
    return [t for t in result.turns if t["transcript"]]


def check_interruption(result: ScenarioResult, onset_s: float) -> None:
    """The reply stopped soon after the user's onset, and history kept only what was heard."""
    (event,) = [e for e in result.events if isinstance(e, ReplyInterrupted)]
    origin = result.room.t0
    assert abs((event.onset_at - origin) - onset_s) < 0.5, "the interruption was detected at the user's onset"
    assert event.stop_ms < 1000, f"playback took {event.stop_ms:.0f} ms to stop"
    # Nothing of the interrupted reply plays after it was stopped.
    output = result.room.output
    stop_position = (event.stopped_at - origin) * output.sample_rate
    late = [s + len(p) for s, p, turn in output._pieces if turn == event.turn_id and s + len(p) > stop_position + 1]
    assert not late, "reply audio kept playing after the barge-in"
    # The LLM produced nothing for the turn after the interruption.
    assert not [e for e in result.events if isinstance(e, LLMToken) and e.turn_id == event.turn_id and e.at > event.at]
    # History: the heard part only, marked interrupted.
    interrupted = [m for m in result.session.conversation.turns if m.get("turn_id") == event.turn_id and m["role"] == "assistant"]
    turn = next(t for t in result.turns if t["turn"] == event.turn_id)
    assert turn["status"] == "interrupted" and turn["interrupted"] is True
    assert turn["barge_in_stop_ms"] == pytest.approx(event.stop_ms, abs=0.2)
    if event.heard_text:
        assert interrupted and interrupted[0]["content"] == event.heard_text and interrupted[0]["interrupted"]
        assert words(turn["reply"])[: len(words(event.heard_text))] == words(event.heard_text)
        assert len(words(event.heard_text)) < len(words(turn["reply"])), "the whole reply cannot have been heard"
    else:
        assert not interrupted
    # The interruption opened a new turn that kept the user's words.
    new_turn = next(t for t in result.turns if t["turn"] == event.by_turn)
    assert new_turn["opened_by_barge_in"] and words(new_turn["transcript"])


def test_interruption_mid_reply(models: Any, config: Any, run: Callable[..., Any]) -> None:
    scenario = SCENARIOS["interrupt_mid_reply"]
    result = play("interrupt_mid_reply", models, config, run, echo=False)
    check_interruption(result, scenario["interruption_onsets_s"][0])
    assert len(spoken_turns(result)) == 2
    assert spoken_turns(result)[-1]["status"] == "completed", "the interrupting question was answered"


def test_interruption_over_echo(models: Any, config: Any, run: Callable[..., Any]) -> None:
    scenario = SCENARIOS["interrupt_over_echo"]
    result = play("interrupt_over_echo", models, config, run, echo=True)
    assert result.room.echo_energy > 0, "the room fed the assistant's voice back"
    check_interruption(result, scenario["interruption_onsets_s"][0])
    assert len(spoken_turns(result)) == 2


def test_cough_during_reply_does_not_interrupt(models: Any, config: Any, run: Callable[..., Any]) -> None:
    result = play("cough_during_reply", models, config, run, echo=True)
    assert not result.interruptions, f"a cough or knock interrupted the reply: {result.interruptions}"
    (turn,) = spoken_turns(result)
    assert turn["status"] == "completed" and turn["reply_audio_seconds"] > 1


def test_thinking_pause_stays_one_turn(models: Any, config: Any, run: Callable[..., Any]) -> None:
    result = play("thinking_pause_800ms", models, config, run, echo=False)
    (turn,) = spoken_turns(result)
    assert "help" in words(turn["transcript"]) and "homework" in words(turn["transcript"])


def test_two_quick_turns_both_answered_in_order(models: Any, config: Any, run: Callable[..., Any]) -> None:
    result = play("two_quick_turns", models, config, run, echo=False)
    turns = spoken_turns(result)
    assert len(turns) == 2
    assert turns[-1]["status"] == "completed" and turns[-1]["reply_audio_seconds"] > 0.5
    # The first reply either finished or was stopped by the second question:
    # never anything else, and never over the user.
    onset = SCENARIOS["two_quick_turns"]["interruption_onsets_s"][0]
    for i in result.interruptions:
        assert abs(i["onset_s"] - onset) < 0.5
    second_start = turns[-1]["speech_start_s"]
    output = result.room.output
    end_of_second_speech = (turns[-1]["milestones_ms"]["speech_end"] / 1000) + (result.session.origin - result.room.t0)
    for start, pcm, turn in output._pieces:
        if turn == turns[0]["turn"]:
            begin = start / output.sample_rate
            assert not (second_start + 0.5 < begin < end_of_second_speech), "the first reply started over the user"
