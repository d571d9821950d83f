"""The latency benchmark: percentiles, and a real run on two utterances."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from assistant.evaluation.bench import _bench, collect_audio, format_table, summarize
from assistant.evaluation.plot import plot_timelines
from assistant.errors import InputError
from helpers import ASSETS


def test_summary_with_budgets() -> None:
    # (the percentiles themselves: tests/test_metrics.py)
    turns = [{"latency_ms": {"voice_to_voice": v, "asr_final": 1.0}} for v in (100.0, 300.0, 200.0)]
    table = summarize(turns)
    assert table["voice_to_voice"] == {"p50": 200.0, "p95": 290.0, "max": 300.0, "n": 3, "budget_ms": None, "overruns": 0}
    turns[0]["budgets"] = {"voice_to_voice": {"budget_ms": 150, "exceeded": False}}
    turns[1]["budgets"] = {"voice_to_voice": {"budget_ms": 150, "exceeded": True}}
    row = summarize(turns)["voice_to_voice"]
    assert row["budget_ms"] == 150 and row["overruns"] == 1
    assert "voice_to_voice" in format_table(table)


def test_collect_audio_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="neither"):
        collect_audio([str(tmp_path / "missing")])
    with pytest.raises(InputError, match="no audio files"):
        collect_audio([str(tmp_path)])
    assert len(collect_audio([str(ASSETS / "questions")])) >= 8


@pytest.mark.slow
def test_bench_runs_for_real(models: Any, config: Any, run: Any, tmp_path: Path) -> None:
    files = [ASSETS / "questions" / "spider_legs.wav", ASSETS / "questions" / "boiling_point.wav"]
    result = run(_bench(config, models, files, baseline=True))
    assert result["measured_turns"] == 2
    naive = result["naive"]
    assert naive["measured_turns"] == 2 and naive["stages_ms"]["voice_to_voice"]["n"] == 2
    assert result["naive_over_streaming_voice_to_voice_p50"] > 0
    png = tmp_path / "timeline.png"
    plot_timelines(result["turns"], naive["turns"], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    v2v = result["stages_ms"]["voice_to_voice"]
    assert v2v["n"] == 2 and 0 < v2v["p50"] <= v2v["p95"] <= v2v["max"]
    assert result["work_ms"]["asr_decodes"] >= 2
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(result))
    assert json.loads(path.read_text())["turns"][0]["file"].endswith("spider_legs.wav")
