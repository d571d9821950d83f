"""Tests for audio.devices: the playback buffer, speaker, microphone, device lists.

Live audio is tested through fake streams and a fake ``sounddevice`` module,
since CI has no sound card.
"""

from __future__ import annotations

import builtins
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from audio import devices
from audio.devices import Microphone, PlaybackBuffer, Speaker, list_devices, resolve_device
from audio.errors import DeviceError
from helpers import amplitude, peak_freq, sine

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

    monkeypatch.setattr(devices, "_open_stream", open_stream)
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
    monkeypatch.setattr(devices, "_sounddevice", lambda: sd)
    return sd


def test_list_devices_table(fake_sd: Any) -> None:
    lines = list_devices().splitlines()
    assert lines[0].split()[:6] == ["#", "name", "in", "out", "rate", "host"]
    assert len(lines) == 1 + len(DEVICES)
    assert "ALC3246" in lines[1] and "44100" in lines[1] and "default output" in lines[1]
    assert "JACK" in lines[4] and "default input" in lines[4]
    assert "default" not in lines[3]


def test_list_devices_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_sounddevice", lambda: fake_sounddevice([], None, None))
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
    monkeypatch.setattr(devices, "_sounddevice", lambda: sd)
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
