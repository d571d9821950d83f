"""Audio devices: microphone and speaker through PortAudio (``sounddevice``).

:class:`Microphone` and :class:`Speaker` wrap PortAudio streams through
``sounddevice``, which is imported lazily: a machine without PortAudio or
without a sound card can still decode files and run the tests, and the user
gets a :class:`~audio.errors.DeviceError` line, not a traceback.

The logic that runs on the audio thread (:class:`~audio.framing.FrameAssembler`,
:class:`PlaybackBuffer`) is kept in plain classes so it can be tested without
a sound card; opening the PortAudio stream sits behind :func:`_open_stream`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any, Literal

import numpy as np

from .errors import DeviceError, one_line
from .frame import as_pcm16
from .framing import FrameAssembler, frame_samples
from .resample import Resampler

__all__ = ["PlaybackBuffer", "list_devices", "resolve_device", "Microphone", "Speaker"]

log = logging.getLogger("audio")

_NO_DEVICES = (
    "No audio devices found: PortAudio sees no sound card on this machine.\n"
    "To fix it: connect a microphone and speakers (or a USB headset), or run a "
    "PulseAudio/PipeWire server, or use `voice-assistant converse FILE` to talk "
    "to the assistant through an audio file instead."
)


class PlaybackBuffer:
    """Thread-safe FIFO of tagged samples that an output callback drains.

    ``write`` appends samples with a tag (whose audio it is: a turn id);
    ``read_into`` fills a device buffer and pads with silence; ``clear``
    drops everything not yet handed over at once (barge-in). The buffer also
    keeps the output *timeline*: ``position`` counts every sample handed to
    the device, silence included, so an offset says where a reply lies in
    what was actually played.

    Hooks run on the audio thread after the lock is released (so a hook may
    call back into the buffer) and must be quick:

    * ``on_played(tag, offset, at)``: the first samples of ``tag`` were
      handed over; ``offset`` is their timeline position, ``at`` when they
      should be heard (``read_into``'s ``at`` plus their place in the block).
    * ``on_drained(tag, at)``: the last buffered sample of ``tag`` was handed
      over (it fires again if more of that tag is written later; cleared
      samples do not count as drained).
    """

    def __init__(
        self,
        rate: int,
        on_played: Callable[[object, int, float], None] | None = None,
        on_drained: Callable[[object, float], None] | None = None,
    ) -> None:
        self.rate = int(rate)
        self.on_played = on_played
        self.on_drained = on_drained
        self.hook_errors = 0
        self._lock = threading.Lock()
        self._segments: deque[list[Any]] = deque()  # [tag, pcm, next index]
        self._pending = 0
        self._played: dict[object, int] = {}
        self._position = 0

    def write(self, pcm: np.ndarray, tag: object = None) -> None:
        """Append samples of ``tag`` (copied: the caller may reuse its array)."""
        data = as_pcm16(pcm).copy()
        if len(data) == 0:
            return
        with self._lock:
            self._segments.append([tag, data, 0])
            self._pending += len(data)

    def clear(self) -> int:
        """Drop everything not yet handed over; return how many samples."""
        with self._lock:
            dropped = self._pending
            self._segments.clear()
            self._pending = 0
        return dropped

    def pending(self) -> int:
        """Samples buffered and not yet handed to the device."""
        with self._lock:
            return self._pending

    def played(self, tag: object) -> int:
        """Samples of ``tag`` handed to the device so far."""
        with self._lock:
            return self._played.get(tag, 0)

    @property
    def position(self) -> int:
        """Samples handed to the device so far, silence included."""
        with self._lock:
            return self._position

    def read_into(self, out: np.ndarray, at: float) -> int:
        """Fill ``out`` (int16) from the FIFO, silence after; return samples of audio.

        ``at`` is when the first sample of ``out`` will be heard.
        """
        n = len(out)
        filled = 0
        events: list[tuple[Any, ...]] = []
        with self._lock:
            start = self._position
            segments = self._segments
            while filled < n and segments:
                seg = segments[0]
                tag, data, index = seg
                take = min(n - filled, len(data) - index)
                out[filled : filled + take] = data[index : index + take]
                if tag not in self._played:
                    self._played[tag] = 0
                    events.append((True, tag, start + filled, at + filled / self.rate))
                self._played[tag] += take
                filled += take
                index += take
                if index == len(data):
                    segments.popleft()
                    if not segments or segments[0][0] != tag:
                        events.append((False, tag, at + filled / self.rate))
                else:
                    seg[2] = index
            if filled < n:
                out[filled:] = 0
            self._pending -= filled
            self._position = start + n
        for event in events:
            try:
                if event[0]:
                    if self.on_played is not None:
                        self.on_played(event[1], event[2], event[3])
                elif self.on_drained is not None:
                    self.on_drained(event[1], event[2])
            except Exception:  # a hook must never stop the audio thread
                self.hook_errors += 1
                log.exception("playback hook failed")
        return filled



# --------------------------------------------------------------------------
# Devices (sounddevice is imported lazily)
# --------------------------------------------------------------------------

Kind = Literal["input", "output"]


def _sounddevice() -> ModuleType:
    """Import sounddevice on first use: PortAudio is only needed for live audio."""
    try:
        import sounddevice
    except OSError:  # sounddevice raises OSError when libportaudio is missing
        raise DeviceError("PortAudio is not installed: apt-get install libportaudio2") from None
    except ImportError:
        raise DeviceError("the sounddevice package is not installed: pip install sounddevice") from None
    return sounddevice


def _query_devices(sd: ModuleType) -> list[dict[str, Any]]:
    try:
        return [dict(d) for d in sd.query_devices()]
    except Exception as e:
        raise DeviceError(f"cannot list audio devices: {one_line(e)}") from None


def _default_index(sd: ModuleType, kind: Kind) -> int | None:
    """PortAudio's default device of ``kind``, or None when there is none."""
    try:
        info = sd.query_devices(kind=kind)
    except Exception:
        return None
    index = info.get("index") if isinstance(info, dict) else None
    return index if isinstance(index, int) and index >= 0 else None


def _host_api_names(sd: ModuleType) -> list[str]:
    try:
        return [h["name"] for h in sd.query_hostapis()]
    except Exception:
        return []


def list_devices() -> str:
    """A readable table of audio devices, or what to do when there are none."""
    sd = _sounddevice()
    devices = _query_devices(sd)
    if not devices:
        return _NO_DEVICES
    apis = _host_api_names(sd)
    default_in, default_out = _default_index(sd, "input"), _default_index(sd, "output")
    rows = []
    for i, d in enumerate(devices):
        index = d.get("index", i)
        marks = [m for m, idx in (("input", default_in), ("output", default_out)) if idx == index]
        api = d.get("hostapi", -1)
        rows.append(
            (
                str(index),
                str(d.get("name", "?")),
                str(d.get("max_input_channels", 0)),
                str(d.get("max_output_channels", 0)),
                f"{float(d.get('default_samplerate', 0)):.0f}",
                apis[api] if 0 <= api < len(apis) else "?",
                "default " + "+".join(marks) if marks else "",
            )
        )
    header = ("#", "name", "in", "out", "rate", "host API", "")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    right = {0, 2, 3, 4}

    def fmt(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if k in right else c.ljust(w) for k, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    lines = [fmt(header), *(fmt(r) for r in rows)]
    if default_in is None:
        lines.append("(no default input device)")
    if default_out is None:
        lines.append("(no default output device)")
    return "\n".join(lines)


def resolve_device(spec: str | int | None, kind: Kind) -> int | None:
    """Turn a user's device choice into a PortAudio index.

    ``None`` means the default device (checked to exist; returned as None so
    PortAudio keeps choosing it); an int or a string of digits is an index;
    any other string is a case-insensitive part of a device name, which must
    pick exactly one device with channels of ``kind``.
    """
    if kind not in ("input", "output"):
        raise ValueError(f"kind must be 'input' or 'output', got {kind!r}")
    sd = _sounddevice()
    channels_key = "max_input_channels" if kind == "input" else "max_output_channels"
    what = "a microphone" if kind == "input" else "speakers or headphones"
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        if _default_index(sd, kind) is None:
            raise DeviceError(
                f"no audio {kind} device found: connect {what}, or run PulseAudio, "
                "or use `voice-assistant converse FILE` instead"
            )
        return None
    devices = _query_devices(sd)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        if not 0 <= index < len(devices):
            raise DeviceError(
                f"no audio device #{index}: there are {len(devices)} device(s), "
                f"numbered 0 to {len(devices) - 1}"
                if devices
                else f"no audio device #{index}: PortAudio sees no sound card on this machine"
            )
        device = devices[index]
        if device.get(channels_key, 0) < 1:
            raise DeviceError(f"audio device #{index} ({device['name']}) has no {kind} channels")
        return index
    needle = spec.strip().casefold()
    matches = [(i, d) for i, d in enumerate(devices) if needle in str(d.get("name", "")).casefold()]
    if not matches:
        names = ", ".join(f"#{i} {d.get('name', '?')}" for i, d in enumerate(devices))
        raise DeviceError(f"no audio device matches {spec!r} (devices: {names or 'none'})")
    usable = [(i, d) for i, d in matches if d.get(channels_key, 0) >= 1]
    if not usable:
        names = ", ".join(f"#{i} {d['name']}" for i, d in matches)
        raise DeviceError(f"audio device {spec!r} has no {kind} channels ({names})")
    exact = [(i, d) for i, d in usable if str(d.get("name", "")).casefold() == needle]
    if len(exact) == 1:
        return exact[0][0]
    if len(usable) > 1:
        names = ", ".join(f"#{i} {d['name']}" for i, d in usable)
        raise DeviceError(f"audio device {spec!r} is ambiguous: {names}; give its number")
    return usable[0][0]


def _open_stream(
    kind: Kind,
    device: str | int | None,
    rate: int,
    frame_ms: int | float,
    callback: Callable[..., None],
) -> tuple[Any, int, int]:
    """Open (not start) a raw int16 PortAudio stream; return it, its rate and channels.

    Prefers mono at ``rate``; falls back to the device's default rate (the
    caller resamples) and then to two channels (the caller downmixes or
    duplicates), because many devices accept only their native format.
    Kept as one small function so tests can replace it with a fake stream.
    """
    sd = _sounddevice()
    index = resolve_device(device, kind)
    try:
        info = dict(sd.query_devices(index, kind))
    except Exception as e:
        raise DeviceError(f"cannot query the audio {kind} device: {one_line(e)}") from None
    name = info.get("name", "?")
    default_rate = int(round(float(info.get("default_samplerate") or rate)))
    max_channels = int(info.get("max_input_channels" if kind == "input" else "max_output_channels", 1))
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    candidates = [(rate, 1), (default_rate, 1)]
    if max_channels >= 2:
        candidates += [(rate, 2), (default_rate, 2)]
    chosen = (default_rate, 1)
    for stream_rate, channels in dict.fromkeys(candidates):
        try:
            check(device=index, channels=channels, dtype="int16", samplerate=stream_rate)
        except Exception:
            continue
        chosen = (stream_rate, channels)
        break
    stream_rate, channels = chosen
    blocksize = max(1, round(stream_rate * frame_ms / 1000))
    cls = sd.RawInputStream if kind == "input" else sd.RawOutputStream
    try:
        stream = cls(
            samplerate=stream_rate,
            blocksize=blocksize,
            device=index,
            channels=channels,
            dtype="int16",
            latency="low",
            callback=callback,
        )
    except Exception as e:
        raise DeviceError(f"cannot open audio {kind} device {name!r}: {one_line(e)}") from None
    return stream, stream_rate, channels


def _start(stream: Any, kind: Kind) -> None:
    try:
        stream.start()
    except Exception as e:
        try:
            stream.close()
        except Exception:
            pass
        raise DeviceError(f"cannot start audio {kind}: {one_line(e)}") from None


def _close(stream: Any) -> None:
    try:
        stream.stop()
    finally:
        stream.close()


class Microphone:
    """Captures mono int16 frames of exactly ``rate * frame_ms / 1000`` samples.

    ``on_frame(pcm, captured_at)`` is called on the audio thread, with
    ``captured_at`` the ``time.monotonic()`` at which the frame's last
    sample was in; the caller hops to asyncio with
    ``loop.call_soon_threadsafe``. If the device refuses ``rate``, it runs at
    its default rate and the audio is resampled here.
    """

    def __init__(
        self,
        device: str | int | None,
        frame_ms: int,
        on_frame: Callable[[np.ndarray, float], None],
        rate: int = 16000,
    ) -> None:
        self.device = device
        self.frame_ms = frame_ms
        self.rate = rate
        self.on_frame = on_frame
        self.frame_samples = frame_samples(rate, frame_ms)
        self.device_rate: int | None = None
        self.overflows = 0
        self.callback_errors = 0
        self._assembler = FrameAssembler(self.frame_samples)
        self._resampler: Resampler | None = None
        self._channels = 1
        self._stream: Any = None

    def start(self) -> None:
        """Open the device and start capturing (raises DeviceError)."""
        if self._stream is not None:
            return
        self._assembler.reset()
        stream, device_rate, channels = _open_stream(
            "input", self.device, self.rate, self.frame_ms, self._callback
        )
        self.device_rate, self._channels = device_rate, channels
        self._resampler = Resampler(device_rate, self.rate) if device_rate != self.rate else None
        self._stream = stream
        _start(stream, "input")

    def stop(self) -> None:
        """Stop capturing and release the device; safe to call twice."""
        stream, self._stream = self._stream, None
        if stream is not None:
            _close(stream)

    def __enter__(self) -> Microphone:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        now = time.monotonic()
        if status and getattr(status, "input_overflow", False):
            self.overflows += 1
        pcm = np.frombuffer(indata, dtype=np.int16)
        if self._channels > 1:
            pcm = pcm[:: self._channels]  # the first channel is the microphone
        if self._resampler is not None:
            pcm = self._resampler.process(pcm)
        for frame, after in self._assembler.push(pcm):
            try:
                self.on_frame(frame, now - after / self.rate)
            except Exception:  # a closed event loop must not kill the audio thread
                self.callback_errors += 1
                if self.callback_errors == 1:
                    log.exception("microphone on_frame failed")


class Speaker:
    """Plays mono int16 audio written from any thread; silence when idle.

    Samples are counted at the caller's ``rate`` even when the device runs
    at its own default rate (then audio is resampled in :meth:`write`).
    See :class:`PlaybackBuffer` for ``on_played`` / ``on_drained``; their
    time is ``time.monotonic()`` plus the stream's output latency.
    When resampling, call :meth:`finish` after a tag's last write so the
    resampler's few held-back samples are queued too.
    """

    def __init__(
        self,
        device: str | int | None = None,
        rate: int = 24000,
        frame_ms: int = 20,
        on_played: Callable[[object, int, float], None] | None = None,
        on_drained: Callable[[object, float], None] | None = None,
    ) -> None:
        self.device = device
        self.rate = rate
        self.frame_ms = frame_ms
        self.on_played = on_played
        self.on_drained = on_drained
        # Called on the audio thread with each block handed to the device
        # (mono int16, device rate, when it is heard); must be quick.
        self.on_block: Callable[[np.ndarray, int, float], None] | None = None
        self.device_rate = rate
        self.underflows = 0
        self.latency = 0.0
        self._channels = 1
        self._scratch = np.zeros(0, dtype=np.int16)
        self._buffer = PlaybackBuffer(rate, self._emit_played, self._emit_drained)
        self._resampler: Resampler | None = None
        self._resampler_tag: object = None
        self._write_lock = threading.Lock()
        self._stream: Any = None

    # -- control ----------------------------------------------------------

    def start(self) -> None:
        """Open the device and start playing the buffer (raises DeviceError)."""
        if self._stream is not None:
            return
        stream, device_rate, channels = _open_stream(
            "output", self.device, self.rate, self.frame_ms, self._callback
        )
        with self._write_lock:
            if device_rate != self.device_rate:
                if self._buffer.pending():
                    log.warning("speaker: dropping audio written before the device rate was known")
                self._buffer = PlaybackBuffer(device_rate, self._emit_played, self._emit_drained)
                self.device_rate = device_rate
            self._resampler = Resampler(self.rate, device_rate) if device_rate != self.rate else None
        self._channels = channels
        self._scratch = np.zeros(max(1, round(device_rate * self.frame_ms / 1000)) * 4, dtype=np.int16)
        self.latency = float(getattr(stream, "latency", 0.0) or 0.0)
        self._stream = stream
        _start(stream, "output")

    def stop(self) -> None:
        """Stop playing and release the device; buffered audio stays queued."""
        stream, self._stream = self._stream, None
        if stream is not None:
            _close(stream)

    def __enter__(self) -> Speaker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- audio ------------------------------------------------------------

    def write(self, pcm: np.ndarray, tag: object = None) -> None:
        """Queue samples at ``rate``; ``tag`` says whose they are (a turn id)."""
        data = as_pcm16(pcm)
        with self._write_lock:
            if self._resampler is None:
                self._buffer.write(data, tag)
                return
            if tag != self._resampler_tag:
                self._finish_locked()
                self._resampler_tag = tag
            self._buffer.write(self._resampler.process(data), tag)

    def finish(self) -> None:
        """Queue the resampler's held-back tail of the current tag (no-op otherwise)."""
        with self._write_lock:
            self._finish_locked()

    def _finish_locked(self) -> None:
        if self._resampler is not None:
            tail = self._resampler.flush()
            if len(tail):
                self._buffer.write(tail, self._resampler_tag)

    def clear(self) -> int:
        """Drop all audio not yet played, at once; return samples dropped (at ``rate``)."""
        with self._write_lock:
            if self._resampler is not None:
                self._resampler.reset()
            return self._to_rate(self._buffer.clear())

    def pending(self) -> int:
        """Samples (at ``rate``) queued and not yet handed to the device."""
        return self._to_rate(self._buffer.pending())

    def played(self, tag: object) -> int:
        """Samples (at ``rate``) of ``tag`` handed to the device so far."""
        return self._to_rate(self._buffer.played(tag))

    @property
    def buffer(self) -> PlaybackBuffer:
        return self._buffer

    def _to_rate(self, samples: int) -> int:
        if self.device_rate == self.rate:
            return samples
        return round(samples * self.rate / self.device_rate)

    def _emit_played(self, tag: object, offset: int, at: float) -> None:
        if self.on_played is not None:
            self.on_played(tag, self._to_rate(offset), at)

    def _emit_drained(self, tag: object, at: float) -> None:
        if self.on_drained is not None:
            self.on_drained(tag, at)

    def _callback(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        if status and getattr(status, "output_underflow", False):
            self.underflows += 1
        out = np.frombuffer(outdata, dtype=np.int16)
        at = time.monotonic() + self.latency
        if self._channels == 1:
            self._buffer.read_into(out, at)
            self._tap(out, at)
            return
        if len(self._scratch) < frames:
            self._scratch = np.zeros(frames, dtype=np.int16)
        mono = self._scratch[:frames]
        self._buffer.read_into(mono, at)
        out.reshape(frames, self._channels)[:] = mono[:, None]
        self._tap(mono, at)

    def _tap(self, block: np.ndarray, at: float) -> None:
        """Hand what the device is about to play to ``on_block`` (the echo
        canceller's reference: exactly these samples, heard at ``at``)."""
        if self.on_block is None:
            return
        try:
            self.on_block(block.copy(), self.device_rate, at)
        except Exception:  # a hook must never stop the audio thread
            pass
