"""Demo of tests/virtual_audio.py: a sounddevice program with no sound card.

A small subprocess opens the default input and output with sounddevice
(PortAudio -> ALSA -> the private PulseAudio), records 3 s while the test
plays a committed question into the microphone, and plays a 1 s 440 Hz tone
meanwhile. The test checks that the program heard the question where it was
played, and that the speaker recording holds the tone.

Skipped when PulseAudio is not installed, unless VIRTUAL_AUDIO_REQUIRED=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

try:
    from tests.virtual_audio import VirtualAudio, skip_if_unavailable
except ImportError:  # tests/ is not a package: pytest put tests/ on sys.path
    from virtual_audio import VirtualAudio, skip_if_unavailable

ROOT = Path(__file__).resolve().parent.parent
QUESTION = ROOT / "audio_assets" / "questions" / "capital_of_france.wav"
RATE = 16000
LEAD_S = 0.5

CHILD = r"""
import sys, threading, time, wave
import numpy as np
import sounddevice as sd

RATE, SECONDS = 16000, 3.0
need = int(RATE * SECONDS)
chunks, got, done = [], [0], threading.Event()

def on_input(indata, frames, time_info, status):
    if got[0] < need:
        chunks.append(indata.copy())
        got[0] += frames
    if got[0] >= need:
        done.set()

print("default devices:", sd.default.device, sd.query_devices(kind="input")["name"],
      file=sys.stderr, flush=True)
with sd.InputStream(samplerate=RATE, channels=1, dtype="int16", callback=on_input):
    print("READY", flush=True)
    t = np.arange(RATE) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    with sd.OutputStream(samplerate=RATE, channels=1, dtype="float32") as out:
        out.write(np.concatenate([tone, np.zeros(RATE // 10, np.float32)]))
    if not done.wait(15):
        sys.exit("input stream stalled")
audio = np.concatenate(chunks)[:need, 0]
with wave.open(sys.argv[1], "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(RATE)
    w.writeframes(audio.astype("<i2").tobytes())
print("DONE", flush=True)
"""


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        ch, rate = w.getnchannels(), w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return data.reshape(-1, ch).mean(axis=1) / 32768.0, rate


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


@pytest.fixture
def va(tmp_path):
    skip_if_unavailable()
    with VirtualAudio(tmp_path) as audio:
        yield audio


def test_program_hears_mic_and_speaker_is_recorded(va, tmp_path):
    mic_wav, speaker_wav = tmp_path / "heard.wav", tmp_path / "speaker.wav"
    child = tmp_path / "child.py"
    child.write_text(CHILD)

    va.start_recording_speaker(speaker_wav, rate=RATE)
    proc = subprocess.Popen([sys.executable, str(child), str(mic_wav)], env=va.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", f"child: {line!r} {proc.stderr.read()}"
        va.play_into_mic(QUESTION, lead_silence_s=LEAD_S)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"child failed:\n{out}\n{err}\n{va.log_text()[-2000:]}"
    va.wait_mic()
    va.stop_recording()

    # -- the program heard the question, where it was played -----------------
    heard, rate = read_wav(mic_wav)
    assert rate == RATE and len(heard) == 3 * RATE
    ref, ref_rate = read_wav(QUESTION)
    assert ref_rate == RATE
    voiced = np.flatnonzero(np.abs(ref) > 0.02)
    ref_on, ref_off = voiced[0], voiced[-1]  # speech inside the question file

    # Where the file starts in the recording: cross-correlate.
    n = len(heard) + len(ref)
    corr = np.fft.irfft(np.fft.rfft(heard, n) * np.conj(np.fft.rfft(ref, n)), n)
    lag = int(np.argmax(corr[: len(heard)]))
    lag_s = lag / RATE
    # The feed starts after the program opened its input: the lead silence
    # plus scheduling delays (about 60 ms here; a few ms of slack below, as
    # the null sink renders a block ahead).
    assert LEAD_S - 0.05 <= lag_s <= LEAD_S + 1.0, f"question found at {lag_s:.3f} s"
    on, off = lag + ref_on, min(lag + ref_off, len(heard))
    assert off - on > 0.5 * RATE, "too little of the question was recorded"
    seg, ref_seg = heard[on:off], ref[ref_on: ref_on + (off - on)]
    similarity = float(np.dot(seg, ref_seg) / (np.linalg.norm(seg) * np.linalg.norm(ref_seg)))
    assert similarity > 0.9, f"recorded speech differs from the file (cosine {similarity:.3f})"
    assert rms(heard[: int(LEAD_S * RATE)]) < 1e-3, "the microphone was not silent before the feed"
    assert rms(seg) > 0.05, "no speech energy where the question was played"

    # -- the speaker recording holds the 1 s 440 Hz tone --------------------
    spk, spk_rate = read_wav(speaker_wav)
    assert spk_rate == RATE
    frame = RATE // 100  # 10 ms
    frames = spk[: len(spk) // frame * frame].reshape(-1, frame)
    loud = np.flatnonzero(np.sqrt(np.mean(frames ** 2, axis=1)) > 0.05)
    assert loud.size, "nothing was played to the speaker"
    tone_s = (loud[-1] - loud[0] + 1) / 100
    assert 0.9 <= tone_s <= 1.1, f"tone lasts {tone_s:.2f} s"
    tone = spk[loud[0] * frame: (loud[-1] + 1) * frame]
    spectrum = np.abs(np.fft.rfft(tone * np.hanning(len(tone))))
    freqs = np.fft.rfftfreq(len(tone), 1 / RATE)
    peak = freqs[int(np.argmax(spectrum))]
    assert abs(peak - 440.0) < 3.0, f"speaker peak at {peak:.1f} Hz"
    band = (freqs > 420) & (freqs < 460)
    assert np.sum(spectrum[band] ** 2) / np.sum(spectrum ** 2) > 0.9
    assert rms(tone) > 0.15, f"tone too quiet: rms {rms(tone):.3f}"


def test_no_processes_left_behind(tmp_path):
    skip_if_unavailable()
    with VirtualAudio(tmp_path) as va:
        va.start_recording_speaker(tmp_path / "s.wav")
        va.play_into_mic(QUESTION, lead_silence_s=0.0, trail_silence_s=0.0)
        procs = [va._daemon, va._recorder, va._feeder, *va._keepalives]
        assert all(p is not None and p.poll() is None for p in procs)
        pids = [p.pid for p in procs]
        rundir = va._rundir
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"process {pid} still running"
    assert not os.path.exists(rundir)
    assert (tmp_path / "s.wav").exists()
