"""Tests for audio.files: decoding any file, its errors, WAV read and write.

Every input is generated in tmp_path.
"""

from __future__ import annotations

import os
import re
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from audio import files
from audio.errors import InputError
from audio.files import decode_file, read_wav, write_wav
from helpers import amplitude, peak_freq, sine

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


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

    monkeypatch.setattr(files, "_decode_stream", no_decoding)
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
    monkeypatch.setattr(files, "_metadata_seconds", lambda container, stream: None)
    produced: list[int] = []
    real = av.AudioResampler

    class CountingResampler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._inner = real(*args, **kwargs)

        def resample(self, frame: Any) -> list[Any]:
            out = self._inner.resample(frame)
            produced.append(sum(f.samples for f in out))
            return out

    monkeypatch.setattr(files.av, "AudioResampler", CountingResampler)
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
        monkeypatch.setattr(files.os, "access", lambda p, mode: False)
    assert "permission denied" in error_of(path)


def test_permission_error_from_ffmpeg_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "racy.wav"
    write_wav(path, sine(440, 16000, 0.1), 16000)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.av, "open", refuse)
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


def test_pcm16_from_bytes_reads_every_width_and_downmixes() -> None:
    from audio.frame import pcm16_from_bytes

    x = np.array([1000, -1000, 32767, -32768], dtype=np.int16)
    assert np.array_equal(pcm16_from_bytes(x.astype("<i2").tobytes(), 2, 1), x)
    assert np.array_equal(pcm16_from_bytes((x.astype("<i4") << 16).tobytes(), 4, 1), x)
    b24 = b"".join(int(v).to_bytes(2, "little", signed=True).rjust(3, b"\x07") for v in x)  # low byte ignored
    assert np.array_equal(pcm16_from_bytes(b24, 3, 1), x)
    assert np.array_equal(pcm16_from_bytes(bytes([128, 255, 0]), 1, 1), [0, 127 << 8, -32768])
    stereo = np.array([1000, 3000, -1000, -3000], dtype="<i2").tobytes() + b"\x01"  # a stray byte is dropped
    assert np.array_equal(pcm16_from_bytes(stereo, 2, 2), [2000, -2000])
    with pytest.raises(ValueError):
        pcm16_from_bytes(b"\0" * 10, 5, 1)


def raw_wav(path: Path, data: bytes, rate: int, *, fmt: int = 1, bits: int = 16, stated_bytes: int | None = None) -> Path:
    """A mono WAV written byte by byte, its data chunk's stated size free to lie."""
    import struct

    align = bits // 8
    fmt_chunk = struct.pack("<HHIIHH", fmt, 1, rate, rate * align, align, bits)
    stated = len(data) if stated_bytes is None else stated_bytes
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", stated) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body) - 4) + body)
    return path


@pytest.mark.parametrize(("value", "says"), [(np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")])
def test_float_wav_with_nan_or_infinite_samples_says_so(tmp_path: Path, value: float, says: str) -> None:
    """Such samples were read as silence ("nothing to answer")."""
    samples = (0.3 * np.sin(np.arange(16000) / 5)).astype("<f4")
    samples[4000:4100] = value
    path = raw_wav(tmp_path / "float.wav", samples.tobytes(), 16000, fmt=3, bits=32)
    with pytest.raises(InputError) as caught:
        decode_file(path)
    assert "float.wav" in str(caught.value) and says in str(caught.value)


def test_a_finite_float_wav_still_decodes(tmp_path: Path) -> None:
    samples = (0.3 * np.sin(np.arange(16000) / 5)).astype("<f4")
    pcm = decode_file(raw_wav(tmp_path / "float.wav", samples.tobytes(), 16000, fmt=3, bits=32))
    assert len(pcm) == 16000 and np.abs(pcm).max() > 5000


def test_wav_holding_more_than_its_header_says_is_refused(tmp_path: Path) -> None:
    """A header that claims 10 s over 301 s of samples was cut to 10 s silently."""
    rate = 8000
    data = sine(300, rate, 301.0).astype("<i2").tobytes()
    path = raw_wav(tmp_path / "liar.wav", data, rate, stated_bytes=10 * rate * 2)
    with pytest.raises(InputError) as caught:
        decode_file(path)
    message = str(caught.value)
    assert "liar.wav" in message and "10.0 s" in message and "301.0 s" in message


def test_wav_with_chunks_after_the_data_is_fine(tmp_path: Path) -> None:
    """Metadata after the samples (a LIST chunk) is not extra audio."""
    import struct

    path = raw_wav(tmp_path / "tagged.wav", sine(300, 16000, 1.0).astype("<i2").tobytes(), 16000)
    info = b"INFOISFT" + struct.pack("<I", 6) + b"tests\x00"
    path.write_bytes(path.read_bytes() + b"LIST" + struct.pack("<I", len(info)) + info)
    assert len(decode_file(path)) == 16000
