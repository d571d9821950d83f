"""The one table of a turn's timing: its milestones, its spans, percentiles.

A *milestone* is a moment of a turn (the user's last voiced frame, the first
LLM token, the first reply sample...), stamped on the pipeline's monotonic
clock. A *span* is the time from one milestone to another: a stage's
latency. Everything that measures turns reads this table and defines no name
of its own:

* the budget watchdog (:class:`pipeline.runtime.Watchdog`) arms a timer on
  each budgeted span (the config's ``budgets.<span>_ms``);
* the per-turn report (:class:`pipeline.report.TurnReport`, REPORT.json and
  the websocket's ``turn.metrics``) lists the streaming milestones and spans;
* the naive sequential baseline (``assistant.evaluation.naive``) lists the
  naive ones, under the same names where the two pipelines share a span;
* the benchmark (``assistant.evaluation.bench``) summarizes the spans with
  :func:`summarize_spans` and the plot (``assistant.evaluation.plot``) draws
  them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .frames import (
    Event,
    LLMDone,
    LLMToken,
    ReplyAudioEnded,
    ReplyAudioStarted,
    ReplyInterrupted,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    TextChunk,
    ToolCalled,
    ToolResult,
    TranscriptFinal,
    TTSDone,
    TTSFirstAudio,
    TurnCancelled,
    TurnCompleted,
)

__all__ = [
    "BUDGETED_SPANS",
    "MILESTONES",
    "Milestone",
    "NAIVE_MILESTONES",
    "NAIVE_SPANS",
    "REPLY_MILESTONES",
    "REPORT_MILESTONES",
    "REPORT_SPANS",
    "SPAN",
    "SPANS",
    "Span",
    "milestone_ms",
    "milestones_of",
    "percentile",
    "span_ms",
    "summarize_spans",
    "summary",
]


@dataclass(frozen=True)
class Milestone:
    """A moment of a turn.

    ``report`` / ``naive``: listed in the streaming report's ``milestones_ms``
    / in the naive baseline's. ``reply``: a moment of the reply itself, taken
    back when an early reply is discarded (``ReplyCancelled``) and reached
    again by the next attempt.
    """

    name: str
    report: bool = False
    naive: bool = False
    reply: bool = False


@dataclass(frozen=True)
class Span:
    """The time from milestone ``start`` to milestone ``end``.

    ``budgeted``: the watchdog enforces ``budgets.<name>_ms`` on it.
    ``report`` / ``naive``: a latency (``latency_ms``) of the streaming report
    / of the naive baseline's. A span in none of them is drawn by the plot.
    """

    name: str
    start: str
    end: str
    budgeted: bool = False
    report: bool = False
    naive: bool = False


# Every milestone, in the order a turn reaches them. (A reply started early,
# at the pause, may reach its milestones before vad_end; the naive cascade
# reaches llm_done and tts_done before its first reply sample.)
MILESTONES: tuple[Milestone, ...] = (
    #          name               report  naive  reply
    Milestone("speech_start",     True,   True),          # first voiced frame of the turn
    Milestone("speech_end",       True,   True),          # last voiced frame of the turn
    Milestone("vad_end",          True,   True),          # the VAD ended the turn (after the hangover)
    Milestone("asr_final",        True,   True),          # the final transcript
    Milestone("tool_start",       True,   False,  True),  # the reply called a tool (its first call)
    Milestone("tool_done",        True,   False,  True),  # the first call's result came back
    Milestone("llm_first_token",  True,   True,   True),  # the reply's first token
    Milestone("first_chunk",      True,   False,  True),  # its first speakable chunk
    Milestone("tts_first_audio",  True,   False,  True),  # its first synthesized audio
    Milestone("llm_done",         False,  True,   True),  # its last token
    Milestone("tts_done",         False,  True),          # all of it synthesized
    Milestone("first_audio_out",  True,   True),          # its first sample played
    Milestone("turn_end",         False,  False),         # synthesized to the end, or the turn over
    Milestone("reply_end",        True,   True),          # its last sample played (or where it was cut)
)

# Every span. Names are unique; a span both pipelines have carries one name.
SPANS: tuple[Span, ...] = (
    #     name                    from               to                 budgeted report naive
    Span("user_speech",           "speech_start",    "speech_end"),
    Span("end_of_speech",         "speech_end",      "vad_end",          True,  True,  True),
    Span("asr_final",             "vad_end",         "asr_final",        True,  True,  True),
    Span("llm_first_token",       "asr_final",       "llm_first_token",  True,  True,  True),
    Span("tool_call",             "tool_start",      "tool_done",        True,  True,  False),
    Span("first_chunk",           "llm_first_token", "first_chunk",      True,  True,  False),
    Span("tts_first_audio",       "first_chunk",     "tts_first_audio",  True,  True,  False),
    Span("audio_out",             "tts_first_audio", "first_audio_out",  False, True,  False),
    Span("llm_full_reply",        "llm_first_token", "llm_done",         False, False, True),
    Span("tts_full_reply",        "llm_done",        "tts_done",         False, False, True),
    Span("full_reply_audio_out",  "tts_done",        "first_audio_out",  False, False, True),
    Span("voice_to_voice",        "speech_end",      "first_audio_out",  True,  True,  True),
    # the hard cap: until the whole reply is synthesized (or the turn ends)
    Span("turn",                  "speech_end",      "turn_end",         True,  False, False),
    Span("reply_audio",           "first_audio_out", "reply_end"),
)

# Views of the table, by what reads them.
SPAN: dict[str, Span] = {s.name: s for s in SPANS}
BUDGETED_SPANS: tuple[Span, ...] = tuple(s for s in SPANS if s.budgeted)
REPORT_SPANS: tuple[Span, ...] = tuple(s for s in SPANS if s.report)
NAIVE_SPANS: tuple[Span, ...] = tuple(s for s in SPANS if s.naive)
REPORT_MILESTONES: tuple[str, ...] = tuple(m.name for m in MILESTONES if m.report)
NAIVE_MILESTONES: tuple[str, ...] = tuple(m.name for m in MILESTONES if m.naive)
REPLY_MILESTONES: tuple[str, ...] = tuple(m.name for m in MILESTONES if m.reply)


def milestones_of(event: Event) -> list[tuple[str, float]]:
    """The turn milestones an event marks, with their stamps.

    A pause (``SpeechPaused``) marks ``speech_end`` only provisionally: the
    user may go on (``SpeechResumed``), and the stop marks it again.
    """
    match event:
        case SpeechStarted():
            return [("speech_start", event.onset_at)]
        case SpeechPaused():
            return [("speech_end", event.last_voiced_at)]
        case SpeechStopped():
            return [("speech_end", event.last_voiced_at), ("vad_end", event.at)]
        case TranscriptFinal() if not event.speculative:
            return [("asr_final", event.at)]
        case LLMToken():
            return [("llm_first_token", event.at)]
        case LLMDone():
            return [("llm_done", event.at)]
        case ToolCalled():
            return [("tool_start", event.at)]
        case ToolResult():
            return [("tool_done", event.at)]
        case TextChunk() if event.text:
            return [("first_chunk", event.at)]
        case TTSFirstAudio():
            return [("tts_first_audio", event.at)]
        case ReplyAudioStarted():
            return [("first_audio_out", event.at)]
        case ReplyAudioEnded():
            return [("reply_end", event.at)]
        case ReplyInterrupted():
            return [("reply_end", event.stopped_at)]
        case TTSDone():
            return [("tts_done", event.at), ("turn_end", event.at)]
        case TurnCompleted() | TurnCancelled():
            return [("turn_end", event.at)]
    return []


def milestone_ms(stamps: Mapping[str, float], names: Iterable[str], origin: float) -> dict[str, float]:
    """The stamped milestones among ``names``, in that order, in ms from ``origin``."""
    return {name: round((stamps[name] - origin) * 1000, 1) for name in names if name in stamps}


def span_ms(stamps: Mapping[str, float], spans: Iterable[Span]) -> dict[str, float]:
    """Each span both of whose milestones are stamped, in ms (0.1 ms steps).

    A reply started at the pause reaches its milestones before the turn
    ends: the wait a span adds is then 0, never negative.
    """
    return {
        s.name: round(max(0.0, stamps[s.end] - stamps[s.start]) * 1000, 1)
        for s in spans
        if s.start in stamps and s.end in stamps
    }


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between the closest ranks.

    The same as ``numpy.percentile``'s default; a ValueError for no values.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summary(values: list[float]) -> dict[str, float]:
    """p50, p95 and max (ms, rounded to 0.1) and how many values (n >= 1)."""
    return {
        "p50": round(percentile(values, 50), 1),
        "p95": round(percentile(values, 95), 1),
        "max": round(max(values), 1),
        "n": len(values),
    }


def summarize_spans(turns: list[dict[str, Any]], spans: Iterable[Span]) -> dict[str, dict[str, float]]:
    """:func:`summary` of each span over the report turns that have it."""
    table: dict[str, dict[str, float]] = {}
    for span in spans:
        values = [t["latency_ms"][span.name] for t in turns if span.name in t.get("latency_ms", {})]
        if values:
            table[span.name] = summary(values)
    return table
