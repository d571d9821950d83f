#!/usr/bin/env python3
"""Regenerate the spoken questions that need a tool, under ``audio_assets/tools/``.

Usage (from the repository root)::

    .venv/bin/python audio_assets/make_tool_questions.py

Each question is spoken by piper (the bundled ``joe`` voice, seeded as in
make_assets.py), framed as the other questions (0.4 s of silence before,
1.0 s after) and checked with Whisper tiny.en; ``tools/questions.json``
lists each file's text, the tool it needs and the argument it must carry.
tests/test_tools_real.py and ``voice-assistant bench-tools`` read them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_assets import (  # noqa: E402
    RATE,
    Piper,
    Take,
    Verifier,
    make_question_audio,
    sox_resample,
    speech_span,
    to_int16,
    trim,
    write_wav,
)

HERE = Path(__file__).resolve().parent / "tools"

# name, text, tool, (argument, value it must hold)
QUESTIONS: list[tuple[str, str, str, tuple[str, str]]] = [
    ("weather_paris", "What is the weather like in Paris?", "get_weather", ("city", "Paris")),
    ("weather_london", "Is it going to rain in London tomorrow?", "get_weather", ("city", "London")),
    ("weather_tokyo", "What is the temperature in Tokyo right now?", "get_weather", ("city", "Tokyo")),
    ("weather_berlin", "Do I need an umbrella in Berlin today?", "get_weather", ("city", "Berlin")),
    ("weather_rome", "What is the weather forecast for Rome?", "get_weather", ("city", "Rome")),
    ("hours_monday", "Is the museum open on Monday?", "opening_hours", ("day", "Monday")),
    ("hours_sunday", "What are the opening hours on Sunday?", "opening_hours", ("day", "Sunday")),
    ("hours_friday", "When does the museum open on Friday?", "opening_hours", ("day", "Friday")),
    ("hours_saturday", "Is the museum closed on Saturday?", "opening_hours", ("day", "Saturday")),
    ("hours_tuesday", "What time does the museum close on Tuesday?", "opening_hours", ("day", "Tuesday")),
    ("timer_five", "Set a timer for 5 minutes.", "set_timer", ("minutes", "5")),
    ("timer_ten", "Please set a timer for 10 minutes.", "set_timer", ("minutes", "10")),
    ("timer_twenty", "Start a timer for 20 minutes.", "set_timer", ("minutes", "20")),
    ("timer_three", "Can you set a 3 minute timer?", "set_timer", ("minutes", "3")),
    ("timer_fifteen", "I need a timer for 15 minutes.", "set_timer", ("minutes", "15")),
    ("lights_kitchen", "Turn on the lights in the kitchen.", "switch_lights", ("room", "kitchen")),
    ("lights_bedroom", "Switch off the lights in the bedroom.", "switch_lights", ("room", "bedroom")),
    ("lights_garage", "Please turn on the garage lights.", "switch_lights", ("room", "garage")),
    ("lights_office", "Turn off the office lights.", "switch_lights", ("room", "office")),
    ("lights_hall", "Can you switch on the lights in the hall?", "switch_lights", ("room", "hall")),
]


def main() -> int:
    HERE.mkdir(parents=True, exist_ok=True)
    piper, verifier = Piper(), Verifier()
    listing = []
    for name, text, tool, (argument, value) in QUESTIONS:
        for length in (1.0, 0.95, 1.05):
            take = Take(text, "piper", "joe", {"length_scale": length, "noise_scale": 0.667, "noise_w_scale": 0.8})
            raw, rate = piper.synth(take)
            audio = to_int16(make_question_audio(trim(sox_resample(raw, rate, RATE), RATE))).astype(np.float32) / 32767
            ok, got = verifier.matches(audio, text)
            if ok:
                break
            print(f"  {name}: length {length} rejected: {got}")
        else:
            print(f"error: no take of {name} was transcribed as {text!r}", file=sys.stderr)
            return 1
        write_wav(HERE / f"{name}.wav", audio)
        listing.append({"file": f"{name}.wav", "text": text, "tool": tool, "argument": argument, "value": value,
                        "length_scale": length, "speech_s": speech_span(audio)})
        print(f"tools/{name}.wav  {text}")
    (HERE / "questions.json").write_text(json.dumps({"rate": RATE, "questions": listing}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
