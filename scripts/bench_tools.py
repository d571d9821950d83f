#!/usr/bin/env python
"""Benchmark function calls on spoken questions: is the right tool called, with the right argument?

Each of the 20 questions under ``audio_assets/tools/`` (``questions.json``:
the tool it needs and the argument value it must carry) is spoken to a
session at real-time pace with the demo MCP server's tools
(examples/mcp_demo_server.py, over stdio), the way ``kiosk`` or ``mic``
would hear it. Per question it prints the transcript, the call made (or
none), whether the tool and the argument were right, whether the result
came back, and the turn's voice to voice; then the share of questions
answered with the right call and the voice to voice (p50 / p95) of the
turns that called.

Modes (``--mode``):
  preselect  the config's default: a question holding one tool's keywords
             calls that tool, its arguments written under its schema
  auto       the model alone chooses (tools.preselect off): a model that
             cannot call (the default SmolLM2, llm.tool_parser none) never
             does; one trained for calls (llm.tool_parser hermes) may
  required   every reply must call one of the tools (the model picks which)

Usage: .venv/bin/python scripts/bench_tools.py [--mode preselect,auto,required] [--config FILE]
           [--set KEY=VALUE ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEYWORDS = {
    "opening_hours": ["open", "opening", "close", "closed", "hours"],
    "get_weather": ["weather", "rain", "forecast", "temperature", "umbrella"],
    "set_timer": ["timer"],
    "switch_lights": ["lights", "light"],
}


def _answer_ms(turn: dict[str, Any]) -> float | None:
    stamps = turn.get("milestones_ms", {})
    if "tts_first_audio" not in stamps or "speech_end" not in stamps:
        return None
    return round(max(stamps["tts_first_audio"], stamps.get("first_audio_out", 0)) - stamps["speech_end"], 1)


def right_argument(arguments: str, argument: str, value: str) -> bool:
    try:
        given = json.loads(arguments).get(argument)
    except (ValueError, AttributeError):
        return False
    if isinstance(given, bool) or given is None:
        return False
    return str(given).strip().lower() == value.lower() or value.lower() in str(given).lower().split()


async def one_mode(models: Any, mode: str, overrides: list[str], config_path: str | None) -> dict[str, Any]:
    from assistant.config import load_config
    from assistant.session import Session
    from assistant.tools import Tools
    from audio.framing import file_source
    from pipeline.frames import Event, ToolCalled, ToolResult
    from pipeline.metrics import summary
    from pipeline.playback import TimelineOutput
    from audio.files import read_wav

    demo = [sys.executable, str(ROOT / "examples" / "mcp_demo_server.py")]
    choice = {"preselect": ["tools.choice=auto", "tools.preselect=true"],
              "auto": ["tools.choice=auto", "tools.preselect=false"],
              "required": ["tools.choice=required", "tools.preselect=false"]}[mode]
    mcp = json.dumps([{"command": demo, "keywords": KEYWORDS}])
    config = load_config(config_path, [*overrides, *choice, f"tools.mcp={mcp}"])
    tools = Tools(config)
    await tools.start()
    listing = json.loads((ROOT / "audio_assets" / "tools" / "questions.json").read_text(encoding="utf-8"))
    rows = []
    try:
        for q in listing["questions"]:
            session = Session(dataclasses.replace(models, toolbox=tools), config,
                              TimelineOutput(config.audio.output_rate, 16000))
            events: list[Event] = []
            session.bus.subscribe(events.append)
            pcm, _ = read_wav(ROOT / "audio_assets" / "tools" / q["file"])
            await session.run(file_source(pcm, 16000, config.audio.frame_ms, realtime=True, start=session.origin))
            turns = session.report.to_json()
            turn = turns[0] if turns else {}
            calls = [c for e in events if isinstance(e, ToolCalled) for c in e.calls]
            results = [e for e in events if isinstance(e, ToolResult)]
            call = calls[0] if calls else None
            rows.append({
                "file": q["file"], "expected": f"{q['tool']}({q['argument']}={q['value']})",
                "transcript": turn.get("transcript", ""),
                "call": f"{call.name}({call.arguments})" if call else None,
                "right_tool": bool(call and call.name == q["tool"]),
                "right_call": bool(call and call.name == q["tool"] and right_argument(call.arguments, q["argument"],
                                                                                     q["value"])),
                "result_ok": bool(results and results[0].error is None),
                "acknowledged": any(b["stage"] in ("llm_first_token", "tool_call", "first_chunk")
                                    and b["policy"] == "acknowledge" for b in turn.get("budget_exceeded", [])),
                "voice_to_voice_ms": turn.get("voice_to_voice_ms"),
                # the answer itself (the acknowledgement may have played first): its first audio synthesized
                "answer_ms": _answer_ms(turn),
                "tool_call_ms": turn.get("latency_ms", {}).get("tool_call"),
                "reply": turn.get("reply", ""),
            })
            r = rows[-1]
            print(f"  {q['file']:20} {' '.join((r['call'] or 'no call').split()):44} right={r['right_call']!s:5} "
                  f"v2v={r['voice_to_voice_ms']} answer={r['answer_ms']} ack={r['acknowledged']!s:5} "
                  f"heard={r['transcript']!r} said={r['reply'][:50]!r}", flush=True)
    finally:
        await tools.close()
    called = [r["voice_to_voice_ms"] for r in rows if r["call"] and r["voice_to_voice_ms"] is not None]
    answered = [r["answer_ms"] for r in rows if r["call"] and r["answer_ms"] is not None]
    return {
        "mode": mode, "questions": len(rows),
        "right_call": sum(r["right_call"] for r in rows), "right_tool": sum(r["right_tool"] for r in rows),
        "called": sum(bool(r["call"]) for r in rows), "results_ok": sum(r["result_ok"] for r in rows),
        "acknowledged": sum(r["acknowledged"] for r in rows),
        "v2v_with_call_ms": summary(called) if called else None,
        "answer_with_call_ms": summary(answered) if answered else None, "rows": rows,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="preselect,auto", help="comma-separated: preselect, auto, required")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args()
    from assistant.config import load_config
    from assistant.models import load_models

    models = load_models(load_config(args.config, args.set))
    await models.warm_up()
    results = []
    try:
        for mode in args.mode.split(","):
            print(f"mode {mode}:", flush=True)
            results.append(await one_mode(models, mode.strip(), args.set, args.config))
    finally:
        models.close()
    print(f"\n{'mode':10} {'right call':>11} {'right tool':>11} {'called':>7} {'result ok':>10} {'ack':>4}"
          f" {'v2v p50':>8} {'v2v p95':>8} {'answer p50':>11} {'answer p95':>11}")
    for r in results:
        v, a = r["v2v_with_call_ms"] or {}, r["answer_with_call_ms"] or {}
        print(f"{r['mode']:10} {r['right_call']:>5}/{r['questions']:<5} {r['right_tool']:>5}/{r['questions']:<5}"
              f" {r['called']:>7} {r['results_ok']:>10} {r['acknowledged']:>4} {v.get('p50', '-'):>8}"
              f" {v.get('p95', '-'):>8} {a.get('p50', '-'):>11} {a.get('p95', '-'):>11}")
    print("v2v: from the last voiced sample to the first audio (the acknowledgement, where one played);"
          " answer: to the answer's own first audio")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
