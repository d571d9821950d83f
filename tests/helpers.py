"""Helpers shared by the tests: the committed speech, transcript checks, test tones."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "audio_assets"

# Config every test runs with, in process and on the command line. No test
# may depend on how long the model's answer happens to be: the int4 kernels
# of an AVX-512 CPU answered "What is the capital of France?" with the one
# token "Paris", the fp32 ones of an AVX2 CPU with a sentence. A floor of
# 12 tokens (about 2-3 s of speech) gives every test a reply to hear and to
# interrupt on both.
TEST_OVERRIDES = ["llm.min_tokens=12"]


# A child process that starts its own engine runs it eager: compiling the
# model (llm.enforce_eager: false, the default) takes ~2.5 min on 2 cores,
# and the in-process engine the session shares already runs it compiled.
CHILD_OVERRIDES = [*TEST_OVERRIDES, "llm.enforce_eager=true"]


def cli_flags() -> list[str]:
    """CHILD_OVERRIDES as command-line flags."""
    return [flag for override in CHILD_OVERRIDES for flag in ("--set", override)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (for a server the test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def question_files() -> list[Path]:
    return sorted((ASSETS / "questions").glob("*.wav"))


def expected_text(wav: Path) -> str:
    return wav.with_suffix(".txt").read_text(encoding="utf-8").strip()


def speech_span(wav: Path) -> tuple[float, float]:
    """Where the committed speech in ``wav`` starts and ends (s), from audio_assets/manifest.json."""
    import json

    files = json.loads((ASSETS / "manifest.json").read_text(encoding="utf-8"))["files"]
    start, end = files[wav.relative_to(ASSETS).as_posix()]["speech_s"]
    return float(start), float(end)


def load_pcm(path: Path) -> Any:
    from audio.files import read_wav

    pcm, rate = read_wav(path)
    assert rate == 16000
    return pcm


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts."""
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hyp, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[len(hyp)] / max(1, len(ref))


# Test tones (the audio layer's tests)


def sine(freq: float, rate: int, seconds: float, amp: float = 8000.0) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return np.round(amp * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def peak_freq(pcm: np.ndarray, rate: int) -> float:
    """Dominant frequency, interpolated between FFT bins (Hann window)."""
    x = pcm.astype(np.float64) * np.hanning(len(pcm))
    spec = np.abs(np.fft.rfft(x))
    k = int(np.argmax(spec[1:])) + 1
    a, b, c = np.log(spec[k - 1 : k + 2] + 1e-12)
    k_frac = k + 0.5 * (a - c) / (a - 2 * b + c)
    return k_frac * rate / len(pcm)


def amplitude(pcm: np.ndarray) -> float:
    """Sine amplitude from RMS (robust to phase and edge samples)."""
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) * np.sqrt(2))


def transcribe(models: Any, pcm: Any, rate: int = 16000) -> str:
    """Reply audio (int16 at ``rate``) transcribed back with the loaded Whisper."""
    import numpy as np

    from audio.resample import Resampler

    audio = Resampler(rate, 16000).process(pcm) if rate != 16000 else pcm
    segments, _ = models.whisper.transcribe(np.asarray(audio).astype(np.float32) / 32768, language="en", beam_size=1)
    return " ".join(s.text for s in segments).strip()


def no_tracebacks(caplog: Any) -> None:
    """No record with a traceback or at ERROR and above (a client's bad input is one info line)."""
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [(r.name, r.getMessage()[:200]) for r in bad]
