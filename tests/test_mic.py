"""`voice-assistant mic` for real, with no sound card.

A private PulseAudio (tests/virtual_audio.py) gives the program a default
microphone we feed a committed question into, and a default speaker we
record. The program hears the question through sounddevice/PortAudio, and
the test hears its spoken reply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audio.files import read_wav
from helpers import ASSETS, ROOT, cli_flags, transcribe, word_error_rate, words
from virtual_audio import VirtualAudio, skip_if_unavailable

pytestmark = pytest.mark.slow


def test_mic_mode_hears_a_question_and_speaks_the_reply(tmp_path: Path, models: Any) -> None:
    skip_if_unavailable()
    question = ASSETS / "questions" / "capital_of_france.wav"
    report = tmp_path / "report.json"
    heard = tmp_path / "speaker.wav"
    with VirtualAudio(tmp_path / "pulse") as va:
        proc = subprocess.Popen(
            [sys.executable, "-m", "assistant", "mic", "--report", str(report), "--max-seconds", "40", *cli_flags()],
            cwd=ROOT,
            env={**os.environ, **va.env},
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        lines: list[str] = []
        listening = threading.Event()

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if line.startswith("listening"):
                    listening.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            assert listening.wait(300), "".join(lines)[-3000:]
            va.start_recording_speaker(heard, rate=16000, channels=1)
            va.play_into_mic(question, lead_silence_s=0.5, trail_silence_s=0.5)
            # Wait until the reply has been spoken (the turn line is printed).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any("voice-to-voice" in line for line in lines):
                time.sleep(0.2)
            time.sleep(6)  # let the reply play out
            va.stop_recording()
        finally:
            proc.send_signal(2)  # Ctrl+C: a clean stop
            proc.wait(30)
            reader.join(5)
    log = "".join(lines)
    assert proc.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    turns = json.loads(report.read_text())["turns"]
    assert len(turns) == 1, log[-2000:]
    assert word_error_rate(question.with_suffix(".txt").read_text(), turns[0]["transcript"]) <= 0.2
    assert turns[0]["reply"] and turns[0]["voice_to_voice_ms"] > 0

    pcm, rate = read_wav(heard)
    loud = np.flatnonzero(np.abs(pcm) > 1000)
    assert len(loud) > rate // 2, "nothing was played to the speaker"
    said = transcribe(models, pcm)
    assert len(words(said)) >= 3, said
