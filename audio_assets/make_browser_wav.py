#!/usr/bin/env python3
"""Make the fake microphone of the browser test: ``browser/capital_of_france_30s.wav``.

Chromium's ``--use-file-for-fake-audio-capture`` plays a WAV file as the
microphone and loops it. The test wants exactly one turn in its window, so
the file is a committed question (``questions/capital_of_france.wav``, whose
transcript Whisper gets exactly) between 2 s of leading silence (the page
opens its session while the file already plays) and silence up to 30 s in
all. 16 kHz mono PCM16, like the question; Chromium resamples it to the
capture rate.

Usage (from the repository root, the standard library only)::

    python3 audio_assets/make_browser_wav.py
"""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUESTION = HERE / "questions" / "capital_of_france.wav"
OUT = HERE / "browser" / "capital_of_france_30s.wav"
LEAD_S = 2.0
TOTAL_S = 30.0


def main() -> None:
    with wave.open(str(QUESTION), "rb") as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        assert (channels, width) == (1, 2), "the question must be mono PCM16"
        speech = w.readframes(w.getnframes())
    lead = b"\0\0" * int(LEAD_S * rate)
    tail = b"\0\0" * (int(TOTAL_S * rate) - len(lead) // 2 - len(speech) // 2)
    OUT.parent.mkdir(exist_ok=True)
    with wave.open(str(OUT), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(lead + speech + tail)
    shutil.copyfile(QUESTION.with_suffix(".txt"), OUT.with_suffix(".txt"))
    print(f"wrote {OUT.relative_to(HERE.parent)} ({TOTAL_S:.0f} s at {rate} Hz)")


if __name__ == "__main__":
    main()
