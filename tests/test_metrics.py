"""The table of turn milestones and spans, percentiles, and the report that reads them (no models)."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from assistant.config import BudgetPolicies, BudgetsConfig, load_config
from assistant.evaluation import plot
from pipeline.tools import ToolCall
from pipeline.frames import (
    ToolCalled,
    ToolResult,
    Event,
    LLMDone,
    LLMToken,
    ReplyAudioEnded,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyInterrupted,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    TextChunk,
    TranscriptFinal,
    TTSDone,
    TTSFirstAudio,
    TurnCancelled,
    TurnCompleted,
)
from pipeline.metrics import (
    BUDGETED_SPANS,
    MILESTONES,
    NAIVE_MILESTONES,
    NAIVE_SPANS,
    REPLY_MILESTONES,
    REPORT_MILESTONES,
    REPORT_SPANS,
    SPAN,
    SPANS,
    milestone_ms,
    milestones_of,
    percentile,
    span_ms,
    summarize_spans,
    summary,
)
from pipeline.report import TurnReport
from assistant.components import budgets_of
from pipeline.runtime import EventBus, Watchdog

NAMES = [m.name for m in MILESTONES]


def test_names_are_unique_and_every_span_runs_forward_between_known_milestones() -> None:
    assert len(set(NAMES)) == len(NAMES)
    assert len({s.name for s in SPANS}) == len(SPANS) == len(SPAN)
    for span in SPANS:
        assert span.start in NAMES and span.end in NAMES, span
        assert NAMES.index(span.start) < NAMES.index(span.end), span


def test_every_budgeted_span_has_its_milestones_and_a_config_key() -> None:
    assert [s.name for s in BUDGETED_SPANS] == [
        "end_of_speech", "asr_final", "llm_first_token", "tool_call", "first_chunk", "tts_first_audio",
        "voice_to_voice", "turn",
    ]
    budget_fields = {f.name for f in dataclasses.fields(BudgetsConfig)}
    policy_fields = {f.name for f in dataclasses.fields(BudgetPolicies)}
    for span in BUDGETED_SPANS:
        assert span.start in NAMES and span.end in NAMES
        assert f"{span.name}_ms" in budget_fields and span.name in policy_fields
    budgets = budgets_of(load_config(None, []))
    assert budgets and {b.stage for b in budgets} <= {s.name for s in BUDGETED_SPANS}
    Watchdog(EventBus(), budgets)  # every configured budget is one it knows


def test_the_reports_list_only_their_own_milestones() -> None:
    assert REPORT_MILESTONES == (
        "speech_start", "speech_end", "vad_end", "asr_final", "tool_start", "tool_done", "llm_first_token",
        "first_chunk", "tts_first_audio", "first_audio_out", "reply_end",
    )
    assert NAIVE_MILESTONES == (
        "speech_start", "speech_end", "vad_end", "asr_final", "llm_first_token", "llm_done", "tts_done",
        "first_audio_out", "reply_end",
    )
    for span in REPORT_SPANS:
        assert span.start in REPORT_MILESTONES and span.end in REPORT_MILESTONES, span
    for span in NAIVE_SPANS:
        assert span.start in NAIVE_MILESTONES and span.end in NAIVE_MILESTONES, span
    # The spans both pipelines have carry one name, so bench lines them up.
    shared = {s.name for s in REPORT_SPANS} & {s.name for s in NAIVE_SPANS}
    assert shared == {"end_of_speech", "asr_final", "llm_first_token", "voice_to_voice"}
    assert REPORT_SPANS[-1].name == NAIVE_SPANS[-1].name == "voice_to_voice"
    assert set(REPLY_MILESTONES) == {"tool_start", "tool_done", "llm_first_token", "first_chunk", "tts_first_audio", "llm_done"}


def _one_of_each(turn: int = 1) -> list[Event]:
    """One event of each kind that marks a milestone, stamped 1.0, 2.0, ... seconds."""
    return [
        SpeechStarted(turn_id=turn, at=1.2, onset_at=1.0, onset_position=0),
        SpeechPaused(turn_id=turn, at=1.6, last_voiced_at=1.5),
        SpeechStopped(turn_id=turn, at=3.0, last_voiced_at=2.0, last_voiced_position=32000),
        TranscriptFinal(turn_id=turn, at=3.1, text="Hello there."),
        ToolCalled(turn_id=turn, at=3.15, calls=(ToolCall("c1", "get_time", "{}"),)),
        ToolResult(turn_id=turn, at=3.2, call_id="c1", name="get_time", output="noon"),
        LLMToken(turn_id=turn, at=3.3, text="Hi", index=0),
        TextChunk(turn_id=turn, at=3.4, text="Hi there.", index=0, last=True),
        TTSFirstAudio(turn_id=turn, at=3.6, chunk_index=0),
        LLMDone(turn_id=turn, at=3.7, text="Hi there.", tokens=3, finish_reason="stop"),
        TTSDone(turn_id=turn, at=3.8, chunks=1),
        ReplyAudioStarted(turn_id=turn, at=3.9, position=0, sample_rate=22050),
        ReplyAudioEnded(turn_id=turn, at=5.0, samples=22050),
        TurnCompleted(turn_id=turn, at=5.0),
    ]


def test_milestones_of_covers_every_milestone() -> None:
    marked = [name for event in _one_of_each() for name, _ in milestones_of(event)]
    assert set(marked) == set(NAMES)
    stop = SpeechStopped(turn_id=1, at=3.0, last_voiced_at=2.0, last_voiced_position=0)
    assert milestones_of(stop) == [("speech_end", 2.0), ("vad_end", 3.0)]
    interrupted = ReplyInterrupted(
        turn_id=1, at=9.0, heard_text="Hi", played_samples=100, sample_rate=22050, onset_at=8.0, stopped_at=8.3
    )
    assert milestones_of(interrupted) == [("reply_end", 8.3)]
    assert milestones_of(TurnCancelled(turn_id=1, at=4.0, reason="x")) == [("turn_end", 4.0)]
    # What marks nothing: a speculative final, an empty chunk, a discarded reply.
    assert milestones_of(TranscriptFinal(turn_id=1, text="Hi", speculative=True)) == []
    assert milestones_of(TextChunk(turn_id=1, text="", index=0, last=True)) == []
    assert milestones_of(ReplyCancelled(turn_id=1, reason="resumed")) == []


def test_percentile_edge_cases() -> None:
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([10.0], 95) == 10.0
    assert percentile(list(range(101)), 95) == 95
    assert percentile([5, 1, 3], 0) == 1 and percentile([5, 1, 3], 100) == 5  # unsorted input
    assert percentile([0.0, 10.0], 25) == 2.5  # linear between ranks
    assert percentile([2, 2, 2], 95) == 2
    values = [3.0, 1.0, 2.0]
    percentile(values, 50)
    assert values == [3.0, 1.0, 2.0]  # not sorted in place
    rng = random.Random(7)
    for n in (2, 3, 10, 57):
        sample = [rng.uniform(0, 5000) for _ in range(n)]
        for q in (0, 1, 50, 90, 95, 99, 100):
            assert percentile(sample, q) == pytest.approx(float(np.percentile(sample, q)))
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], -1)


def test_summary_and_spans_in_ms() -> None:
    assert summary([100.0, 300.0, 200.0]) == {"p50": 200.0, "p95": 290.0, "max": 300.0, "n": 3}
    assert summary([7.04]) == {"p50": 7.0, "p95": 7.0, "max": 7.0, "n": 1}
    turns = [{"latency_ms": {"asr_final": 10.0}}, {"latency_ms": {"asr_final": 30.0, "turn": 5.0}}, {}]
    assert summarize_spans(turns, REPORT_SPANS) == {"asr_final": {"p50": 20.0, "p95": 29.0, "max": 30.0, "n": 2}}
    stamps = {"speech_end": 2.0, "vad_end": 2.3, "asr_final": 2.25, "first_audio_out": 3.0}
    # A span reached "early" (before its start) counts 0, never negative; a missing one is left out.
    assert span_ms(stamps, REPORT_SPANS) == {"end_of_speech": 300.0, "asr_final": 0.0, "voice_to_voice": 1000.0}
    assert list(milestone_ms(stamps, REPORT_MILESTONES, 1.0)) == ["speech_end", "vad_end", "asr_final", "first_audio_out"]
    assert milestone_ms(stamps, ["vad_end"], 1.0) == {"vad_end": 1300.0}


def test_the_report_reads_the_table() -> None:
    bus = EventBus()
    report = TurnReport(bus, origin=0.0, output_rate=22050)
    events = _one_of_each()
    # An early reply at the pause, thrown away when the user went on: its
    # milestones are taken back and the next attempt's count.
    early = [
        TranscriptFinal(turn_id=1, at=2.6, text="Hello", speculative=True),
        LLMToken(turn_id=1, at=2.7, text="Well", index=0),
        TextChunk(turn_id=1, at=2.8, text="Well.", index=0),
        ReplyCancelled(turn_id=1, at=2.9, reason="user went on"),
    ]
    for event in events[:2] + early + events[2:]:
        bus.publish(event)
    (turn,) = report.to_json()
    assert list(turn["milestones_ms"]) == list(REPORT_MILESTONES)
    assert turn["milestones_ms"]["speech_end"] == 2000.0  # the stop's, not a provisional pause's
    assert turn["milestones_ms"]["llm_first_token"] == 3300.0 and turn["early_replies_discarded"] == 1
    assert list(turn["latency_ms"]) == [s.name for s in REPORT_SPANS]
    assert turn["latency_ms"]["end_of_speech"] == 1000.0
    assert turn["voice_to_voice_ms"] == turn["latency_ms"]["voice_to_voice"] == 1900.0
    assert turn["reply_audio_seconds"] == 1.0 and turn["status"] == "completed"
    assert turn["speech_end_input_ms"] == 2000.0  # 32000 samples into the input at 16 kHz


def test_a_long_lived_report_keeps_only_its_last_turns() -> None:
    """A kiosk closes thousands of turns: the report (and the watchdog's
    results) hold the last ``keep``, every listener still sees every turn."""
    bus = EventBus()
    watchdog = Watchdog(bus, [])
    report = TurnReport(bus, origin=0.0, output_rate=22050, watchdog=watchdog, keep=2)
    seen: list[int] = []
    report.listeners.append(lambda record: seen.append(record.turn_id))
    for turn in range(1, 6):
        for event in _one_of_each(turn):
            bus.publish(event)
    assert seen == [1, 2, 3, 4, 5] and report.closed == 5
    assert sorted(report.turns) == [4, 5] and [t["turn"] for t in report.to_json()] == [4, 5]
    assert set(watchdog.results) <= {4, 5} and watchdog.results
    with pytest.raises(ValueError):
        TurnReport(bus, origin=0.0, output_rate=22050, keep=0)


def test_the_plot_draws_spans_and_milestones_of_the_table() -> None:
    assert set(plot._STYLE) <= set(SPAN)
    assert {k for k in plot._MARKERS if k != "asr_partial"} <= set(NAMES)
