"""Tests for assistant.audio_io: decoding, WAV, resampling, framing, playback, devices.

Every input is generated in tmp_path; live audio is tested through fake
streams and a fake ``sounddevice`` module, since CI has no sound card.
"""

from __future__ import annotations

import builtins
import os
import re
import sys
import threading
import time
import wave
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import av
import numpy as np
import pytest

from assistant import audio_io
from assistant.audio_io import (
    FrameAssembler,
    Microphone,
    PlaybackBuffer,
    Resampler,
    Speaker,
    decode_file,
    frames_from_pcm,
    list_devices,
    read_wav,
    resolve_device,
    write_wav,
)
from assistant.errors import DeviceError, InputError

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


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


def write_multichannel_wav(path: Path, channels: np.ndarray, rate: int) -> None:
    """channels: shape (n_channels, n_samples) int16."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(channels.T).astype("<i2").tobytes())


def encode(path: Path, codec: str, rate: int, channels: np.ndarray) -> Path:
    """Encode (n_channels, n) int16 audio with PyAV; skip the test if the codec is missing."""
    layout = {1: "mono", 2: "stereo"}[channels.shape[0]]
    try:
        container = av.open(str(path), "w")
    except Exception as e:  # pragma: no cover - depends on the FFmpeg build
        pytest.skip(f"cannot write {path.suffix}: {e}")
    with container:
        try:
            stream = container.add_stream(codec, rate=rate, layout=layout)
        except Exception as e:  # pragma: no cover
            pytest.skip(f"encoder {codec} unavailable: {e}")
        pts = 0
        for i in range(0, channels.shape[1], 1024):
            block = np.ascontiguousarray(channels[:, i : i + 1024])
            frame = av.AudioFrame.from_ndarray(block, format="s16p", layout=layout)
            frame.sample_rate = rate
            frame.pts = pts
            pts += block.shape[1]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def check_tone(pcm: np.ndarray, seconds: float, freq: float = 440.0, amp: float = 8000.0, *,
               length_tol: float = 0.002, amp_tol: float = 0.03) -> None:
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert abs(len(pcm) - seconds * 16000) <= length_tol * 16000 + 2, len(pcm)
    middle = pcm[1600:-1600]
    assert abs(peak_freq(middle, 16000) - freq) < 1.0
    assert abs(amplitude(middle) - amp) < amp_tol * amp


# --------------------------------------------------------------------------
# decode_file: good inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_decode_wav_any_rate_gives_16k_mono_tone(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"tone_{rate}.wav"
    write_wav(path, sine(440, rate, 1.5), rate)
    pcm = decode_file(path)
    check_tone(pcm, 1.5)


def test_decode_respects_target_rate(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    write_wav(path, sine(440, 44100, 1.0), 44100)
    pcm = decode_file(path, rate=8000)
    assert abs(len(pcm) - 8000) <= 2
    assert abs(peak_freq(pcm[800:-800], 8000) - 440) < 1.0


def test_decode_stereo_downmixes_without_gain_change(tmp_path: Path) -> None:
    tone = sine(440, 44100, 1.0)
    path = tmp_path / "stereo.wav"
    write_multichannel_wav(path, np.stack([tone, tone]), 44100)
    check_tone(decode_file(path), 1.0)


def test_decode_stereo_mixes_both_channels(tmp_path: Path) -> None:
    left, right = sine(440, 48000, 1.0), sine(1000, 48000, 1.0)
    path = tmp_path / "lr.wav"
    write_multichannel_wav(path, np.stack([left, right]), 48000)
    pcm = decode_file(path)[1600:-1600].astype(np.float64)
    spec = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    freqs = np.fft.rfftfreq(len(pcm), 1 / 16000)
    at = lambda f: spec[np.argmin(np.abs(freqs - f))]  # noqa: E731
    # Both channels are heard, equally loud; nothing else is.
    assert at(440) > 100 * at(700) and at(1000) > 100 * at(700)
    assert 0.8 < at(440) / at(1000) < 1.25


def test_decode_six_channels(tmp_path: Path) -> None:
    tone = sine(440, 48000, 1.0, amp=6000)
    path = tmp_path / "surround.wav"
    write_multichannel_wav(path, np.stack([tone] * 6), 48000)
    check_tone(decode_file(path), 1.0, amp=6000, amp_tol=0.1)


@pytest.mark.parametrize(
    "name, codec, rate, layout",
    [
        ("tone.flac", "flac", 44100, 2),
        ("tone.mp3", "libmp3lame", 44100, 2),
        ("tone.m4a", "aac", 48000, 2),
        ("tone.ogg", "libopus", 48000, 1),
        ("tone.opus", "libopus", 48000, 2),
        ("tone.webm", "libopus", 48000, 1),
    ],
)
def test_decode_compressed_formats(tmp_path: Path, name: str, codec: str, rate: int, layout: int) -> None:
    tone = sine(440, rate, 2.0)
    path = encode(tmp_path / name, codec, rate, np.stack([tone] * layout))
    pcm = decode_file(path)
    # Lossy codecs add priming/padding (AAC ~ 1024 samples at the source rate).
    check_tone(pcm, 2.0, length_tol=0.05, amp_tol=0.08)


def test_decode_flac_is_lossless_after_resampling_path(tmp_path: Path) -> None:
    tone = sine(440, 16000, 1.0)
    path = encode(tmp_path / "exact.flac", "flac", 16000, tone.reshape(1, -1))
    assert np.array_equal(decode_file(path), tone)


def test_decode_accepts_str_path(tmp_path: Path) -> None:
    path = tmp_path / "tone.wav"
    write_wav(path, sine(440, 16000, 0.5), 16000)
    assert len(decode_file(str(path))) == 8000


# --------------------------------------------------------------------------
# decode_file: bad inputs, one line each, naming the file
# --------------------------------------------------------------------------


def error_of(path: Any, **kwargs: Any) -> str:
    with pytest.raises(InputError) as info:
        decode_file(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in error_of(tmp_path / "nope.wav")


def test_directory(tmp_path: Path) -> None:
    assert "is a directory" in error_of(tmp_path)


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not audio\n" * 20)
    # FFmpeg may read a .txt as ANSI art (a video): still named as not audio.
    assert re.search("not (a readable|an) audio file", error_of(path))


def test_text_file_with_audio_extension(tmp_path: Path) -> None:
    path = tmp_path / "fake.mp3"
    path.write_text("definitely not an mp3\n" * 20)
    assert "not a readable audio file" in error_of(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    assert "not a readable audio file" in error_of(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "zero.wav"
    path.write_bytes(b"")
    assert "empty" in error_of(path)


def test_wav_with_no_samples(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    write_wav(path, np.zeros(0, dtype=np.int16), 16000)
    assert "no audio samples" in error_of(path)


def test_video_without_audio(tmp_path: Path) -> None:
    path = tmp_path / "silent_movie.mp4"
    try:
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for _ in range(5):
                frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
    except Exception as e:  # pragma: no cover - depends on the FFmpeg build
        pytest.skip(f"cannot encode a video: {e}")
    message = error_of(path)
    assert "no audio stream" in message and "video" in message


def make_long_silence(path: Path, seconds: int, rate: int = 1000) -> Path:
    """A long file made cheap: silence at a low rate (11 min = 1.3 MB)."""
    write_wav(path, np.zeros(seconds * rate, dtype=np.int16), rate)
    return path


def test_too_long_refused_from_metadata_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_long_silence(tmp_path / "long.wav", 660)

    def no_decoding(*args: Any) -> None:
        raise AssertionError("the file was decoded although its header says it is too long")

    monkeypatch.setattr(audio_io, "_decode_stream", no_decoding)
    message = error_of(path)
    assert message == f"{path} is 660.0 s long; the limit is 300 s (audio.max_input_seconds)"


def test_too_long_custom_limit(tmp_path: Path) -> None:
    path = make_long_silence(tmp_path / "long.wav", 60)
    assert "is 60.0 s long; the limit is 30 s" in error_of(path, max_seconds=30)
    assert len(decode_file(path, max_seconds=61)) == 60 * 16000


def test_too_long_caught_while_decoding_when_metadata_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_long_silence(tmp_path / "long.wav", 660)
    monkeypatch.setattr(audio_io, "_metadata_seconds", lambda container, stream: None)
    produced: list[int] = []
    real = av.AudioResampler

    class CountingResampler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner = real(*args, **kwargs)

        def resample(self, frame: Any) -> list[Any]:
            out = self._inner.resample(frame)
            produced.append(sum(f.samples for f in out))
            return out

    monkeypatch.setattr(audio_io.av, "AudioResampler", CountingResampler)
    message = error_of(path)
    assert "is more than 300 s long; the limit is 300 s (audio.max_input_seconds)" in message
    # Decoding stopped right after the limit, not at the end of the 11 minutes.
    assert 300 * 16000 < sum(produced) < 310 * 16000


def test_slightly_long_file_is_refused_exactly_while_decoding(tmp_path: Path) -> None:
    path = make_long_silence(tmp_path / "long.wav", 12)
    # Within the metadata slack, so the decoder must catch it.
    assert "is more than 11.5 s long" in error_of(path, max_seconds=11.5)


def test_unreadable_permissions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.wav"
    write_wav(path, sine(440, 16000, 0.1), 16000)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads everything: simulate the refusal
        monkeypatch.setattr(audio_io.os, "access", lambda p, mode: False)
    assert "permission denied" in error_of(path)


def test_permission_error_from_ffmpeg_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "racy.wav"
    write_wav(path, sine(440, 16000, 0.1), 16000)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(audio_io.av, "open", refuse)
    assert "permission denied" in error_of(path)


@pytest.mark.parametrize("seed", range(6))
def test_damaged_files_never_raise_anything_but_input_error(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tone = sine(440, 44100, 1.0)
    codec, suffix = [("flac", ".flac"), ("libmp3lame", ".mp3"), ("aac", ".m4a")][seed % 3]
    good = encode(tmp_path / f"good{suffix}", codec, 44100, np.stack([tone, tone])).read_bytes()
    damaged = bytearray(good)
    if seed < 3:  # garbage in the middle
        start = len(damaged) // 3
        damaged[start : start + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    else:  # truncated
        damaged = damaged[: len(damaged) // 5]
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(bytes(damaged))
    try:
        pcm = decode_file(path)
    except InputError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert pcm.dtype == np.int16 and 0 < len(pcm) <= 1.1 * 16000


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        decode_file("x.wav", rate=0)
    with pytest.raises(ValueError):
        decode_file("x.wav", max_seconds=0)


# --------------------------------------------------------------------------
# WAV helpers
# --------------------------------------------------------------------------


def test_wav_round_trip(tmp_path: Path) -> None:
    pcm = np.random.default_rng(0).integers(-32768, 32767, 12345).astype(np.int16)
    path = tmp_path / "out.wav"
    write_wav(path, pcm, 24000)
    back, rate = read_wav(path)
    assert rate == 24000 and np.array_equal(back, pcm)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)


def test_read_wav_downmixes_stereo(tmp_path: Path) -> None:
    path = tmp_path / "st.wav"
    write_multichannel_wav(path, np.array([[100, 200, -300], [300, 0, -100]], dtype=np.int16), 8000)
    pcm, rate = read_wav(path)
    assert rate == 8000 and pcm.tolist() == [200, 100, -200]


def test_read_wav_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.wav"
    path.write_text("nope")
    with pytest.raises(InputError, match="not a readable WAV"):
        read_wav(path)


def test_write_wav_refuses_float(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int16"):
        write_wav(tmp_path / "f.wav", np.zeros(10, dtype=np.float32), 16000)


# --------------------------------------------------------------------------
# Resampler
# --------------------------------------------------------------------------


def resample_in_chunks(r: Resampler, pcm: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, i = [], 0
    for size in sizes:
        out.append(r.process(pcm[i : i + size]))
        i += size
    assert i >= len(pcm)
    out.append(r.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("out_rate", [16000, 48000])
def test_resampler_keeps_frequency_amplitude_and_length(out_rate: int) -> None:
    tone = sine(440, 22050, 2.0)
    r = Resampler(22050, out_rate)
    out = np.concatenate([r.process(tone), r.flush()])
    assert abs(len(out) - 2.0 * out_rate) <= 3
    middle = out[out_rate // 10 : -out_rate // 10]
    assert abs(peak_freq(middle, out_rate) - 440) < 0.5
    assert abs(amplitude(middle) - 8000) < 0.01 * 8000
    # It is the same sine, sample for sample (no delay, no phase shift).
    t = np.arange(len(out)) / out_rate
    ideal = 8000 * np.sin(2 * np.pi * 440 * t)
    assert np.max(np.abs(out[100:-100] - ideal[100:-100])) < 20


@pytest.mark.parametrize("in_rate, out_rate", [(22050, 16000), (22050, 48000), (44100, 16000), (8000, 24000)])
def test_resampler_random_chunks_join_without_clicks(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(in_rate + out_rate)
    tone = sine(440, in_rate, 1.0)
    whole = Resampler(in_rate, out_rate)
    reference = np.concatenate([whole.process(tone), whole.flush()])
    sizes = []
    while sum(sizes) < len(tone):
        sizes.append(int(rng.integers(0, 700)))  # zero-sized chunks included
    chunked = resample_in_chunks(Resampler(in_rate, out_rate), tone, sizes)
    assert abs(len(chunked) - len(reference)) <= 1
    n = min(len(chunked), len(reference))
    assert np.max(np.abs(chunked[:n].astype(int) - reference[:n])) <= 1
    # No step anywhere: the sample-to-sample change stays within the sine's slope.
    max_step = 8000 * 2 * np.pi * 440 / out_rate
    assert np.max(np.abs(np.diff(chunked[50:-50].astype(int)))) <= max_step * 1.05 + 2


def test_resampler_identity_and_flush_reset() -> None:
    pcm = np.arange(-50, 50, dtype=np.int16)
    same = Resampler(16000, 16000)
    out = same.process(pcm)
    assert np.array_equal(out, pcm) and out is not pcm and len(same.flush()) == 0
    r = Resampler(16000, 8000)
    first = np.concatenate([r.process(sine(440, 16000, 0.5)), r.flush()])
    second = np.concatenate([r.process(sine(440, 16000, 0.5)), r.flush()])
    assert np.array_equal(first, second)  # flush started a fresh stream
    assert len(r.process(np.zeros(0, dtype=np.int16))) == 0
    with pytest.raises(ValueError):
        Resampler(0, 16000)


# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------


def test_frames_from_pcm_pads_last_frame() -> None:
    pcm = np.arange(1, 701, dtype=np.int16)
    frames = frames_from_pcm(pcm, 16000, 20)
    assert [len(f) for f in frames] == [320, 320, 320]
    assert np.array_equal(np.concatenate(frames)[:700], pcm)
    assert not frames[-1][60:].any() and frames[-1][59] == 700
    assert frames_from_pcm(np.zeros(0, dtype=np.int16), 16000, 20) == []
    assert len(frames_from_pcm(np.zeros(480, dtype=np.int16), 16000, 30)) == 1
    with pytest.raises(ValueError):
        frames_from_pcm(pcm, 22050, 10)  # 220.5 samples


def test_frame_assembler_random_chunks() -> None:
    rng = np.random.default_rng(3)
    pcm = rng.integers(-1000, 1000, 10_000).astype(np.int16)
    asm = FrameAssembler(320)
    frames, i = [], 0
    while i < len(pcm):
        size = int(rng.integers(0, 900))
        chunk = pcm[i : i + size]
        for frame, after in asm.push(chunk):
            assert len(frame) == 320
            # the frame's last sample sits `after` samples before the chunk's end
            assert frame[-1] == chunk[len(chunk) - after - 1]
            frames.append(frame)
        i += size
    joined = np.concatenate(frames)
    assert len(joined) == len(pcm) // 320 * 320 and np.array_equal(joined, pcm[: len(joined)])


# --------------------------------------------------------------------------
# PlaybackBuffer
# --------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.played: list[tuple[object, int, float]] = []
        self.drained: list[tuple[object, float]] = []

    def on_played(self, tag: object, offset: int, at: float) -> None:
        self.played.append((tag, offset, at))

    def on_drained(self, tag: object, at: float) -> None:
        self.drained.append((tag, at))


def make_buffer(rate: int = 1000) -> tuple[PlaybackBuffer, Recorder]:
    rec = Recorder()
    return PlaybackBuffer(rate, rec.on_played, rec.on_drained), rec


def test_playback_silence_when_empty() -> None:
    buf, rec = make_buffer()
    out = np.full(100, 7, dtype=np.int16)
    assert buf.read_into(out, at=0.0) == 0
    assert not out.any() and buf.position == 100 and buf.pending() == 0
    assert rec.played == [] and rec.drained == []


def test_playback_plays_in_order_with_timeline_and_hooks() -> None:
    buf, rec = make_buffer(rate=1000)
    buf.read_into(np.zeros(40, dtype=np.int16), at=10.0)  # 40 samples of silence first
    buf.write(np.full(30, 1, dtype=np.int16), tag="a")
    buf.write(np.full(50, 1, dtype=np.int16), tag="a")
    buf.write(np.full(20, 2, dtype=np.int16), tag="b")
    assert buf.pending() == 100

    out = np.zeros(60, dtype=np.int16)
    assert buf.read_into(out, at=20.0) == 60
    assert (out == 1).all()
    assert buf.played("a") == 60 and buf.played("b") == 0 and buf.pending() == 40
    assert rec.played == [("a", 40, 20.0)]  # offset on the timeline, silence included
    assert rec.drained == []  # "a" continues in the next segment

    out = np.full(60, 9, dtype=np.int16)
    assert buf.read_into(out, at=30.0) == 40
    assert (out[:20] == 1).all() and (out[20:40] == 2).all() and not out[40:].any()
    assert buf.played("a") == 80 and buf.played("b") == 20 and buf.pending() == 0
    assert rec.played[1] == ("b", 120, pytest.approx(30.02))
    assert rec.drained == [("a", pytest.approx(30.02)), ("b", pytest.approx(30.04))]
    assert buf.position == 160


def test_playback_clear_drops_everything_at_once() -> None:
    buf, rec = make_buffer()
    buf.write(np.full(100, 5, dtype=np.int16), tag=1)
    buf.write(np.full(100, 6, dtype=np.int16), tag=2)
    buf.read_into(np.zeros(30, dtype=np.int16), at=0.0)
    assert buf.clear() == 170
    assert buf.pending() == 0 and buf.played(1) == 30 and buf.played(2) == 0
    out = np.full(50, 3, dtype=np.int16)
    assert buf.read_into(out, at=1.0) == 0 and not out.any()
    assert rec.drained == []  # cancelled audio is not "drained"
    assert buf.clear() == 0
    # New audio after a clear plays normally.
    buf.write(np.full(10, 4, dtype=np.int16), tag=3)
    out = np.zeros(20, dtype=np.int16)
    buf.read_into(out, at=2.0)
    assert (out[:10] == 4).all() and not out[10:].any() and rec.drained == [(3, pytest.approx(2.01))]


def test_playback_write_copies_and_validates() -> None:
    buf, _ = make_buffer()
    pcm = np.full(10, 1, dtype=np.int16)
    buf.write(pcm, tag="x")
    pcm[:] = 99  # the caller reuses its array
    out = np.zeros(10, dtype=np.int16)
    buf.read_into(out, at=0.0)
    assert (out == 1).all()
    buf.write(np.zeros(0, dtype=np.int16), tag="empty")
    assert buf.pending() == 0
    with pytest.raises(ValueError):
        buf.write(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError):
        buf.write(np.zeros((2, 10), dtype=np.int16))


def test_playback_hooks_may_reenter_and_may_fail() -> None:
    buf = PlaybackBuffer(1000)
    seen: list[int] = []
    buf.on_played = lambda tag, offset, at: seen.append(buf.pending())  # re-enters the lock
    buf.on_drained = lambda tag, at: 1 / 0
    buf.write(np.ones(10, dtype=np.int16), tag="t")
    out = np.zeros(20, dtype=np.int16)
    assert buf.read_into(out, at=0.0) == 10  # no deadlock, no exception
    assert seen == [0] and buf.hook_errors == 1


def test_playback_is_thread_safe() -> None:
    buf = PlaybackBuffer(16000)
    total = 200 * 160
    got: list[np.ndarray] = []

    def reader() -> None:
        out = np.zeros(320, dtype=np.int16)
        while sum(int((g != 0).sum()) for g in got) < total:
            buf.read_into(out, at=0.0)
            got.append(out.copy())

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(200):
        buf.write(np.full(160, i + 1, dtype=np.int16), tag=i)
    thread.join(timeout=10)
    played = np.concatenate(got)
    played = played[played != 0]
    assert len(played) == total
    assert np.all(np.diff(played.astype(int)) >= 0)  # order kept
    assert sum(buf.played(i) for i in range(200)) == total


# --------------------------------------------------------------------------
# Speaker and Microphone through fake streams
# --------------------------------------------------------------------------


class FakeStream:
    def __init__(self, callback: Any, latency: float = 0.05) -> None:
        self.callback = callback
        self.latency = latency
        self.started = self.stopped = self.closed = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        self.closed = True


def fake_open(monkeypatch: pytest.MonkeyPatch, device_rate: int | None, channels: int = 1) -> list[Any]:
    opened: list[Any] = []

    def open_stream(kind: str, device: Any, rate: int, frame_ms: int, callback: Any) -> tuple[Any, int, int]:
        stream = FakeStream(callback)
        stream.kind, stream.frame_ms = kind, frame_ms
        opened.append(stream)
        return stream, device_rate or rate, channels

    monkeypatch.setattr(audio_io, "_open_stream", open_stream)
    return opened


def pull(stream: FakeStream, frames: int, channels: int = 1) -> np.ndarray:
    out = bytearray(frames * channels * 2)
    stream.callback(out, frames, None, None)
    return np.frombuffer(bytes(out), dtype=np.int16)


def test_speaker_plays_written_audio(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = fake_open(monkeypatch, None)
    rec = Recorder()
    speaker = Speaker(None, rate=24000, on_played=rec.on_played, on_drained=rec.on_drained)
    with speaker:
        stream = opened[0]
        assert stream.started and stream.kind == "output"
        assert len(pull(stream, 480)) == 480 and not pull(stream, 480).any()
        speaker.write(np.full(600, 3, dtype=np.int16), tag=7)
        assert speaker.pending() == 600
        before = time.monotonic()
        first = pull(stream, 480)
        assert (first == 3).all() and speaker.played(7) == 480
        tag, offset, at = rec.played[0]
        assert (tag, offset) == (7, 960) and before + 0.05 <= at <= time.monotonic() + 0.05
        second = pull(stream, 480)
        assert (second[:120] == 3).all() and not second[120:].any()
        assert rec.drained[0][0] == 7 and speaker.played(7) == 600 and speaker.pending() == 0
        speaker.write(np.full(1000, 4, dtype=np.int16), tag=8)
        assert speaker.clear() == 1000 and not pull(stream, 480).any()
    assert stream.stopped and stream.closed


def test_speaker_resamples_to_device_rate_and_counts_at_caller_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = fake_open(monkeypatch, 48000, channels=2)
    rec = Recorder()
    speaker = Speaker(None, rate=24000, on_played=rec.on_played, on_drained=rec.on_drained)
    speaker.start()
    stream = opened[0]
    tone = sine(440, 24000, 0.5)
    for i in range(0, len(tone), 1000):  # streamed in chunks, like TTS output
        speaker.write(tone[i : i + 1000], tag="reply")
    speaker.finish()
    assert abs(speaker.pending() - len(tone)) <= 2
    out = np.concatenate([pull(stream, 960, channels=2) for _ in range(30)]).reshape(-1, 2)
    assert np.array_equal(out[:, 0], out[:, 1])  # mono duplicated on both channels
    left = out[:, 0]
    assert abs(int(np.count_nonzero(left[:24500])) - 24000) < 50
    assert abs(peak_freq(left[2000:22000], 48000) - 440) < 0.5
    assert abs(speaker.played("reply") - len(tone)) <= 2 and rec.drained and rec.played[0][:2] == ("reply", 0)
    speaker.stop()


def test_microphone_frames_at_16k_from_44k_device(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = fake_open(monkeypatch, 44100)
    frames: list[tuple[np.ndarray, float]] = []
    mic = Microphone(None, 20, lambda pcm, at: frames.append((pcm, at)))
    with mic:
        stream = opened[0]
        assert stream.kind == "input" and stream.frame_ms == 20 and mic.device_rate == 44100
        tone = sine(440, 44100, 1.0)
        t0 = time.monotonic()
        for i in range(0, len(tone), 882):
            block = tone[i : i + 882]
            stream.callback(block.tobytes(), len(block), None, None)
    assert stream.closed
    assert all(len(pcm) == 320 and pcm.dtype == np.int16 for pcm, _ in frames)
    assert abs(len(frames) - 50) <= 1
    stamps = [at for _, at in frames]
    assert all(t0 - 0.05 <= s <= time.monotonic() for s in stamps) and stamps == sorted(stamps)
    pcm = np.concatenate([p for p, _ in frames])
    assert abs(peak_freq(pcm[1600:-1600], 16000) - 440) < 1.0
    assert abs(amplitude(pcm[1600:-1600]) - 8000) < 200


def test_microphone_native_rate_stereo_and_failing_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = fake_open(monkeypatch, None, channels=2)
    got: list[np.ndarray] = []

    def on_frame(pcm: np.ndarray, at: float) -> None:
        got.append(pcm)
        raise RuntimeError("Event loop is closed")

    mic = Microphone("usb", 10, on_frame)
    mic.start()
    stream = opened[0]
    left = np.arange(160, dtype=np.int16)
    stereo = np.stack([left, -left], axis=1).reshape(-1)
    stream.callback(stereo.tobytes(), 160, None, None)  # does not raise
    mic.stop()
    mic.stop()
    assert len(got) == 1 and np.array_equal(got[0], left) and mic.callback_errors == 1


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------


def test_devices_on_this_machine_never_traceback() -> None:
    """Real PortAudio: without a sound card, a clear text or a DeviceError."""
    try:
        text = list_devices()
    except DeviceError as e:
        assert "PortAudio" in str(e) and "\n" not in str(e)
        return
    import sounddevice

    if len(sounddevice.query_devices()) == 0:
        assert text.startswith("No audio devices found") and "converse FILE" in text
        with pytest.raises(DeviceError, match="no audio input device found"):
            resolve_device(None, "input")
        with pytest.raises(DeviceError, match="no audio output device found"):
            resolve_device(None, "output")
        with pytest.raises(DeviceError, match="no audio device"):
            resolve_device("usb", "input")
        with pytest.raises(DeviceError):
            Microphone(None, 20, lambda pcm, at: None).start()
        with pytest.raises(DeviceError):
            Speaker(None, 24000).start()
    else:  # a machine with devices: the table lists them
        for device in sounddevice.query_devices():
            assert device["name"] in text


def test_portaudio_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_portaudio(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    with pytest.raises(DeviceError, match="PortAudio is not installed: apt-get install libportaudio2"):
        list_devices()
    with pytest.raises(DeviceError, match="PortAudio is not installed"):
        Microphone(None, 20, lambda pcm, at: None).start()


class FakePortAudioError(Exception):
    pass


def fake_sounddevice(devices: list[dict[str, Any]], default_in: int | None, default_out: int | None) -> Any:
    for i, d in enumerate(devices):
        d.setdefault("index", i)
        d.setdefault("hostapi", 0)
        d.setdefault("default_samplerate", 48000.0)
    calls: dict[str, Any] = {}

    def query_devices(device: Any = None, kind: str | None = None) -> Any:
        if device is None and kind is None:
            return list(devices)
        if device is None:
            device = default_in if kind == "input" else default_out
            if device is None:
                raise FakePortAudioError("Error querying device -1")
        return devices[device]

    def check(device: Any = None, channels: int = 1, dtype: str = "", samplerate: float = 0) -> None:
        index = device if device is not None else default_in
        if samplerate != devices[index]["default_samplerate"]:
            raise FakePortAudioError("Invalid sample rate")

    def raw_stream(**kwargs: Any) -> Any:
        calls["stream"] = kwargs
        if calls.get("fail"):
            raise FakePortAudioError("Error opening RawInputStream:\nDevice unavailable [PaErrorCode -9985]")
        return FakeStream(kwargs["callback"])

    return SimpleNamespace(
        query_devices=query_devices,
        query_hostapis=lambda: [{"name": "ALSA"}, {"name": "JACK"}],
        check_input_settings=check,
        check_output_settings=check,
        RawInputStream=lambda **kw: raw_stream(**kw),
        RawOutputStream=lambda **kw: raw_stream(**kw),
        calls=calls,
    )


DEVICES = [
    {"name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "max_input_channels": 2, "max_output_channels": 2,
     "default_samplerate": 44100.0},
    {"name": "HDA Intel PCH: HDMI 0 (hw:0,3)", "max_input_channels": 0, "max_output_channels": 8},
    {"name": "USB Headset: Audio (hw:1,0)", "max_input_channels": 1, "max_output_channels": 2},
    {"name": "pulse", "max_input_channels": 32, "max_output_channels": 32, "hostapi": 1},
    {"name": "pulse monitor", "max_input_channels": 2, "max_output_channels": 0},
]


@pytest.fixture
def fake_sd(monkeypatch: pytest.MonkeyPatch) -> Any:
    sd = fake_sounddevice([dict(d) for d in DEVICES], default_in=3, default_out=0)
    monkeypatch.setattr(audio_io, "_sounddevice", lambda: sd)
    return sd


def test_list_devices_table(fake_sd: Any) -> None:
    lines = list_devices().splitlines()
    assert lines[0].split()[:6] == ["#", "name", "in", "out", "rate", "host"]
    assert len(lines) == 1 + len(DEVICES)
    assert "ALC3246" in lines[1] and "44100" in lines[1] and "default output" in lines[1]
    assert "JACK" in lines[4] and "default input" in lines[4]
    assert "default" not in lines[3]


def test_list_devices_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio_io, "_sounddevice", lambda: fake_sounddevice([], None, None))
    text = list_devices()
    assert "No audio devices found" in text and "PulseAudio" in text and "converse FILE" in text


def test_resolve_device(fake_sd: Any) -> None:
    assert resolve_device(None, "input") is None
    assert resolve_device(2, "input") == 2
    assert resolve_device("2", "output") == 2
    assert resolve_device("usb", "input") == 2
    assert resolve_device("HDMI", "output") == 1
    assert resolve_device("PULSE", "output") == 3  # exact name wins over "pulse monitor"
    assert resolve_device("monitor", "input") == 4


@pytest.mark.parametrize(
    "spec, kind, message",
    [
        ("hdmi", "input", "has no input channels"),
        (1, "input", "has no input channels"),
        ("monitor", "output", "has no output channels"),
        ("hw:0", "output", "is ambiguous"),
        ("nonesuch", "input", "no audio device matches 'nonesuch'"),
        (9, "output", "no audio device #9"),
    ],
)
def test_resolve_device_errors(fake_sd: Any, spec: Any, kind: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message) as info:
        resolve_device(spec, kind)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_resolve_device_no_default(monkeypatch: pytest.MonkeyPatch) -> None:
    sd = fake_sounddevice([dict(DEVICES[1])], default_in=None, default_out=0)
    monkeypatch.setattr(audio_io, "_sounddevice", lambda: sd)
    with pytest.raises(DeviceError, match="no audio input device found"):
        resolve_device(None, "input")
    assert resolve_device(None, "output") is None


def test_open_stream_falls_back_to_device_rate(fake_sd: Any) -> None:
    frames: list[np.ndarray] = []
    mic = Microphone("ALC3246", 20, lambda pcm, at: frames.append(pcm))
    mic.start()
    opened = fake_sd.calls["stream"]
    assert opened["samplerate"] == 44100 and opened["blocksize"] == 882
    assert opened["channels"] == 1 and opened["dtype"] == "int16" and opened["device"] == 0
    assert mic.device_rate == 44100
    mic.stop()


def test_open_stream_error_is_one_device_error_line(fake_sd: Any) -> None:
    fake_sd.calls["fail"] = True
    with pytest.raises(DeviceError) as info:
        Microphone("usb", 20, lambda pcm, at: None).start()
    message = str(info.value)
    assert "\n" not in message and "Device unavailable" in message and "USB Headset" in message
