"""``voice-assistant bench``: per-stage latency over spoken questions.

Each utterance streams at real-time pace through the same :class:`Session`
the product uses, with a fresh conversation each time, and the report's
stamps give each stage's latency. One warm-up turn runs first and is not
counted. The table prints p50, p95 and max per stage and for voice to voice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.metrics import REPORT_SPANS, percentile, summarize_spans

from ..config import Config
from ..errors import InputError

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".m4a", ".opus", ".webm"}


def collect_audio(specs: list[str]) -> list[Path]:
    files: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"--audio: {spec} is neither an audio file nor a folder")
    if not files:
        raise InputError("--audio: no audio files found")
    return files


def summarize(turns: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """p50/p95/max per span of the report and, for budgeted spans, the budget and its overruns."""
    table: dict[str, dict[str, Any]] = dict(summarize_spans(turns, REPORT_SPANS))
    for span in REPORT_SPANS:
        if span.name in table:
            budgets = [t.get("budgets", {}).get(span.name, {}) for t in turns] if span.budgeted else []
            table[span.name]["budget_ms"] = next((b["budget_ms"] for b in budgets if "budget_ms" in b), None)
            table[span.name]["overruns"] = sum(1 for b in budgets if b.get("exceeded"))
    return table


def format_table(table: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'stage':<22}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'n':>4}{'budget':>9}{'over':>6}"]
    for name, row in table.items():
        budget = f"{row['budget_ms']:.0f}" if row.get("budget_ms") else "-"
        lines.append(
            f"{name:<22}{row['p50']:>9.0f}{row['p95']:>9.0f}{row['max']:>9.0f}{row['n']:>4.0f}"
            f"{budget:>9}{row.get('overruns', 0):>6}"
        )
    return "\n".join(lines)


async def run_bench(config: Config, models: Any, files: list[Path]) -> dict[str, Any]:
    from pipeline.playback import TimelineOutput

    from audio.files import decode_file
    from audio.framing import file_source

    from ..session import Session

    decode_ms: list[float] = []
    synth_ms: list[float] = []

    async def one(path: Path, count: bool = True) -> list[dict[str, Any]]:
        pcm = decode_file(path, config.audio.input_rate, config.audio.max_input_seconds)
        session = Session(models, config, TimelineOutput(config.audio.output_rate, config.audio.input_rate, realtime=False))
        source = file_source(pcm, config.audio.input_rate, config.audio.frame_ms, realtime=True, start=session.origin)
        await session.run(source)
        if count:
            decode_ms.extend(session.asr.decode_ms)
            synth_ms.extend(session.tts.first_audio_ms)
        turns = session.report.to_json()
        for turn in turns:
            turn["file"] = str(path)
        return turns

    print(f"warm-up turn: {files[0].name} (not counted)", file=sys.stderr)
    await one(files[0], count=False)
    measured: list[dict[str, Any]] = []
    for path in files:
        turns = await one(path)
        for turn in turns:
            v2v = turn.get("voice_to_voice_ms")
            print(f"  {path.name}: {turn['transcript']!r} -> voice-to-voice {v2v} ms", file=sys.stderr)
        measured.extend(turns)
    work = {
        "asr_decode_ms_p50": round(percentile(decode_ms, 50), 1) if decode_ms else None,
        "asr_decodes": len(decode_ms),
        "tts_first_audio_of_a_chunk_ms_p50": round(percentile(synth_ms, 50), 1) if synth_ms else None,
    }
    return {"measured_turns": len(measured), "stages_ms": summarize(measured), "work_ms": work, "turns": measured}


def bench(args: Any, config: Config) -> int:
    import asyncio

    from ..models import load_models

    files = collect_audio(args.audio)
    for flag in ("json", "plot"):
        value = getattr(args, flag, None)
        if value and not Path(value).resolve().parent.is_dir():
            raise InputError(f"--{flag}: folder {Path(value).parent} does not exist")
    models = load_models(config)
    try:
        result = asyncio.run(_bench(config, models, files, baseline=not args.no_baseline))
    finally:
        models.close()
    print(f"measured turns: {result['measured_turns']} (warm-up excluded)")
    print("streaming pipeline:")
    print(format_table(result["stages_ms"]))
    work = result["work_ms"]
    print(f"ASR: {work['asr_decodes']} decodes, p50 {work['asr_decode_ms_p50']} ms each; "
          f"piper: first audio of a chunk p50 {work['tts_first_audio_of_a_chunk_ms_p50']} ms")
    naive = result.get("naive")
    if naive:
        print(f"naive sequential baseline ({naive['measured_turns']} turns):")
        print(format_table(naive["stages_ms"]))
        ratio = result["naive_over_streaming_voice_to_voice_p50"]
        print(f"voice-to-voice p50: naive / streaming = {ratio:.2f}")
    if args.plot:
        from .plot import plot_timelines

        plot_timelines(result["turns"], naive["turns"] if naive else None, Path(args.plot))
        print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


async def _bench(config: Config, models: Any, files: list[Path], baseline: bool = True) -> dict[str, Any]:
    """The streaming pipeline, then (same audio, same models) the naive cascade."""
    await models.warm_up()
    result = await run_bench(config, models, files)
    if baseline:
        from .naive import run_naive

        print("naive sequential baseline...", file=sys.stderr)
        naive = await run_naive(config, models, files)
        result["naive"] = naive
        streaming_p50 = result["stages_ms"].get("voice_to_voice", {}).get("p50")
        naive_p50 = naive["stages_ms"].get("voice_to_voice", {}).get("p50")
        if streaming_p50 and naive_p50:
            result["naive_over_streaming_voice_to_voice_p50"] = round(naive_p50 / streaming_p50, 2)
    return result
