"""The naive cascade baseline and the per-turn timeline plot."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from assistant.evaluation.naive import naive_turn
from assistant.evaluation.plot import plot_timelines
from helpers import ASSETS, expected_text, load_pcm, word_error_rate
from pipeline.metrics import NAIVE_SPANS, summarize_spans

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _streaming(origin: float, file: str | None = None) -> dict[str, Any]:
    """A report turn as TurnReport.turn_json gives it: ms from the session origin."""
    ms = {
        "speech_start": origin + 300.0,
        "speech_end": origin + 1900.0,
        "vad_end": origin + 2380.0,
        "asr_final": origin + 2400.0,
        "llm_first_token": origin + 2650.0,
        "first_chunk": origin + 2800.0,
        "tts_first_audio": origin + 2950.0,
        "first_audio_out": origin + 2955.0,
        "reply_end": origin + 6000.0,
    }
    turn = {"turn": 1, "transcript": "How many legs does a spider have?", "milestones_ms": ms,
            "latency_ms": {"voice_to_voice": 1055.0}, "voice_to_voice_ms": 1055.0}
    if file:
        turn["file"] = file
    return turn


def _naive(file: str | None = None) -> dict[str, Any]:
    ms = {"speech_start": 300.0, "speech_end": 1900.0, "vad_end": 2380.0, "asr_final": 3400.0,
          "llm_first_token": 3700.0, "llm_done": 5200.0, "tts_done": 6500.0, "first_audio_out": 6501.0,
          "reply_end": 9800.0}
    turn = {"pipeline": "naive", "transcript": "How many legs does a spider have?", "milestones_ms": ms,
            "latency_ms": {"voice_to_voice": 4601.0}, "voice_to_voice_ms": 4601.0}
    if file:
        turn["file"] = file
    return turn


def _check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    return width, height


def test_plot_timelines_writes_a_png(tmp_path: Path) -> None:
    streaming = [_streaming(0.0, "a.wav"), _streaming(12000.0, "b.wav")]
    naive = [_naive("b.wav"), _naive("a.wav")]  # matched by file, not position
    out = tmp_path / "sub" / "timelines.png"
    plot_timelines(streaming, naive, out)
    width, height = _check_png(out)
    assert 1000 < width < 1800 and height > 200  # ~12 in at 120 DPI


def test_plot_timelines_tolerates_missing_milestones(tmp_path: Path) -> None:
    partial = _streaming(500.0)
    for key in ("speech_start", "reply_end", "first_chunk"):
        del partial["milestones_ms"][key]
    no_audio = {"transcript": "hello", "milestones_ms": {"speech_end": 100.0, "vad_end": 580.0},
                "latency_ms": {}, "voice_to_voice_ms": None}
    unaligned = {"milestones_ms": {"asr_final": 50.0}, "voice_to_voice_ms": None}
    empty: dict[str, Any] = {}
    naive_short = {"milestones_ms": {"speech_end": 1000.0, "vad_end": 1480.0, "asr_final": 2000.0,
                                     "llm_first_token": 2300.0}, "voice_to_voice_ms": None}
    out = tmp_path / "partial.png"
    plot_timelines([partial, no_audio, unaligned, empty], [naive_short], out)
    _check_png(out)
    plot_timelines([partial], None, tmp_path / "streaming_only.png")
    _check_png(tmp_path / "streaming_only.png")
    plot_timelines([], None, tmp_path / "nothing.png")
    _check_png(tmp_path / "nothing.png")


def test_summarize_naive_spans_skips_missing() -> None:
    turns = [{"latency_ms": {"voice_to_voice": v}} for v in (3000.0, 5000.0)] + [{"latency_ms": {}}]
    table = summarize_spans(turns, NAIVE_SPANS)
    assert table == {"voice_to_voice": {"p50": 4000.0, "p95": 4900.0, "max": 5000.0, "n": 2}}
    assert [span.name for span in NAIVE_SPANS][-1] == "voice_to_voice"


@pytest.mark.slow
def test_naive_turn_on_real_speech(models: Any, config: Any, run: Any) -> None:
    wav = ASSETS / "questions" / "spider_legs.wav"
    turn = run(naive_turn(models, config, load_pcm(wav)))
    assert turn["status"] == "completed"
    assert word_error_rate(expected_text(wav), turn["transcript"]) <= 0.2, turn["transcript"]
    assert turn["reply"].strip()
    ms = turn["milestones_ms"]
    order = ["speech_end", "vad_end", "asr_final", "llm_first_token", "llm_done", "tts_done", "first_audio_out"]
    values = [ms[k] for k in order]
    assert values == sorted(values), ms
    assert ms["speech_start"] < ms["speech_end"] < ms["reply_end"]
    # The hangover is waited out in real time, never skipped.
    assert ms["vad_end"] - ms["speech_end"] >= config.vad.silence_ms - 1
    assert turn["voice_to_voice_ms"] > 0
    assert turn["voice_to_voice_ms"] == turn["latency_ms"]["voice_to_voice"]
    assert turn["reply_audio_seconds"] > 0.3
