"""Acoustic echo cancellation: the assistant's own voice off the microphone.

With a loudspeaker and a microphone in one room (``mic`` mode on a kiosk)
the assistant hears itself; without cancellation its own reply would open a
barge-in. :class:`EchoCanceller` removes that echo from each microphone
frame, using what was sent to the speaker as the reference, placed by the
monotonic stamps of both streams.

Library: WebRTC's AEC3 (linear adaptive filter with its own delay estimator,
plus a residual-echo suppressor), through LiveKit's ``livekit`` package
(``livekit.rtc.AudioProcessingModule``). Why: it is maintained (LiveKit
releases it every few weeks), Apache-2.0 (fits GPL-3.0), a manylinux wheel
with the native library inside (no compiler, no Debian package), and it runs
offline (the APM is local; nothing connects anywhere). Evaluated on the
committed speech (six piper questions as the assistant's voice, two espeak
questions as the user talking over it), with :class:`audio.room.RoomEcho`
(delay 30/60/120 ms, gain -6/-14 dB, RT60 200 ms) plus -80 dBFS noise:

============================  =====================  ====================
library                       ERLE after 3 s, dB      residual echo frames
                              (-6 dB / -14 dB echo)   webrtcvad calls voiced
============================  =====================  ====================
livekit 1.2.1 (AEC3)          38.6-38.7 / 30.4-30.6  4 of 313
aec-audio-processing 1.0.1    38.1-39.3 / 30.0-30.2  4 of 313
pyaec 1.0.1 (speex MDF)       14.2-19.3 / 13.7-18.0  300 of 313
============================  =====================  ====================

(That table is from one harness for all three, without compensating AEC3's
8 ms output delay, which caps its figure; speex also needs ~3 s to reach
it: 3-6 dB in the first 3 s, against 33-50 dB for AEC3.)
aec-audio-processing is the same AEC3 engine, but a single anonymous
maintainer and one release; speex's residual stays loud enough to read as
speech; ``speexdsp-aec`` declares a proprietary licence and ``speexdsp``
(2018) needs swig and a compiler.

This class, measured the same way with the output delay compensated: ERLE
(far-end only, after 2 s) 56.7 / 56.7 / 56.8 dB at 30 / 60 / 120 ms delay
and -6 dB, 49.4 / 49.7 / 48.5 dB at -14 dB (33-50 dB in the first 2 s);
residual at most -66 dBFS in any 20 ms frame. Longer delays (250, 400 ms)
also converge (52-53 dB). Double talk (the user talking over the echo,
webrtcvad run over each whole stream): with the user 4-14 dB above the
echo, 89-100% of the user's voiced frames stay voiced, the onset is heard
0-60 ms late, the level drops 1-5 dB; with the echo as loud as the user,
81% (AEC3's suppressor ducks a 0.4 s stretch mid-utterance; the onset is
still heard within 60 ms). Echo alone after cancellation is not speech to
webrtcvad (under 5% of frames, none louder than -50 dBFS). A *fresh* AEC3
ducks the near end through its first second or so of far-end audio: a user
talking 0.3 s into the first reply of a canceller's life is heard 280-360 ms
late (20 ms once it has heard one earlier reply), so a kiosk's first
barge-in after start is slower than the rest; the scenario harness starts
from a canceller that has heard 3 s of the assistant's voice
(``voice-assistant scenarios --fresh-canceller`` shows the first-reply case). A 22.05 or 48
kHz reference in 20 ms blocks with 2 ms stamp jitter: 53 dB. (ERLE here is
AEC3's whole output: linear filter plus suppressor.) A loudspeaker driven into distortion (``RoomEcho(drive=3)``) leaves
residual peaks of -41 dBFS: nonlinear echo is only partly removed. CPU: 0.3
to 0.7 ms per 20 ms frame (mostly the FFI calls), about 1 ms with a 22.05
kHz reference to resample.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from .frame import AudioFrame
from .resample import resample, sinc_at, sinc_design

__all__ = ["EchoCanceller"]


class _Timeline:
    """Reference audio at its own rate, indexed from an origin time.

    ``write`` appends contiguously when a chunk's stamp is within
    ``tolerance`` of where the previous chunk ended (stamps from audio
    callbacks jitter by milliseconds; following them literally would
    overlap or tear the signal the adaptive filter learns from), and
    re-anchors on the stamp otherwise (a gap, a seek, a clock drift).
    """

    def __init__(self, rate: int, origin: float, tolerance_s: float) -> None:
        self.rate = rate
        self.origin = origin
        self.tolerance = max(1, int(round(tolerance_s * rate)))
        self.start = 0  # index of buf[0]
        self.buf = np.zeros(0, np.float32)
        self.write_end: int | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.buf)

    def index(self, t: float) -> int:
        return int(round((t - self.origin) * self.rate))

    def write(self, x: np.ndarray, at: float) -> None:
        idx = self.index(at)
        if self.write_end is not None and abs(idx - self.write_end) <= self.tolerance:
            idx = self.write_end
        self.write_end = idx + len(x)
        if idx < self.start:  # already consumed: only the rest can still be heard
            x = x[self.start - idx :]
            idx = self.start
        if len(x) == 0:
            return
        stop = idx + len(x)
        if stop > self.end:
            self.buf = np.concatenate([self.buf, np.zeros(stop - self.end, np.float32)])
        self.buf[idx - self.start : stop - self.start] = x  # a re-sent span replaces

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Samples [lo, hi), zeros where nothing was written."""
        out = np.zeros(hi - lo, np.float32)
        a, b = max(lo, self.start), min(hi, self.end)
        if b > a:
            out[a - lo : b - lo] = self.buf[a - self.start : b - self.start]
        return out

    def forget_before(self, idx: int) -> None:
        if idx > self.start:
            drop = min(idx - self.start, len(self.buf))
            self.buf = self.buf[drop:]
            self.start += drop

    def drop_from(self, idx: int) -> None:
        if idx < self.end:
            self.buf = self.buf[: max(0, idx - self.start)]
        if self.write_end is not None and self.write_end > idx:
            self.write_end = None


class EchoCanceller:
    """Removes the speaker's echo from microphone frames (WebRTC AEC3).

    ``reference`` takes what was handed to the speaker, stamped with when
    its first sample plays; ``process`` takes each microphone frame and
    returns it with the echo removed, same length and stamps. The reference
    is placed by the stamps: a mic frame whose last sample was captured at
    ``t`` is paired with the reference that played over the frame's own
    interval, shifted ``delay_ms`` later, zeros where nothing played; AEC3
    then finds the acoustic delay itself (30-120 ms measured, more works).

    The output lags the input by :attr:`latency_ms` (AEC3's block delay,
    measured 128 samples at 16 kHz) on every frame, also with no reference,
    so the stream stays continuous.

    Stamps from audio callbacks jitter; both streams are read contiguously
    while a stamp lands within 15 ms of where the previous block ended, and
    re-anchored on the stamp otherwise (a gap, a pause in playback). A
    reference that arrives after the frames it belongs to were processed is
    lost for them. AEC3 sizes its own filter: ``tail_ms`` here is how long
    after the reference ends a frame still counts as holding echo
    (:attr:`echo_active`, the ERLE figures for logs: :attr:`erle_db`,
    :attr:`last_erle_db`, :attr:`ms_per_frame`).
    """

    latency_ms = 8.0  # at 16 kHz

    def __init__(self, sample_rate: int = 16000, frame_ms: int = 20, tail_ms: int = 200, delay_ms: int = 0) -> None:
        if sample_rate not in (8000, 16000, 32000, 48000):
            raise ValueError(f"sample_rate must be 8000, 16000, 32000 or 48000 (AEC3), got {sample_rate}")
        if frame_ms <= 0 or frame_ms % 10:
            raise ValueError(f"frame_ms must be a multiple of 10, got {frame_ms}")
        if tail_ms <= 0:
            raise ValueError(f"tail_ms must be positive, got {tail_ms}")
        from livekit import rtc  # lazily: the module is importable without it

        self._rtc = rtc
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.tail_ms = tail_ms
        self.delay_ms = delay_ms
        self._block = sample_rate // 100  # AEC3 takes 10 ms blocks
        self._delay = int(round(delay_ms * sample_rate / 1000))
        self._tolerance_s = 0.015
        self._apm = self._new_apm()
        self._ref: _Timeline | None = None
        self._read_next: int | None = None  # next mic sample index (origin of self._ref)
        self._origin: float | None = None
        self._ref_active_until: int | None = None  # mic index until which echo may arrive
        self._e_in = 0.0
        self._e_out = 0.0
        self.last_erle_db: float | None = None
        self.frames = 0
        self.process_s = 0.0

    def _new_apm(self):  # type: ignore[no-untyped-def]
        apm = self._rtc.AudioProcessingModule(
            echo_cancellation=True, noise_suppression=False, high_pass_filter=False, auto_gain_control=False
        )
        apm.set_stream_delay_ms(0)  # the reference is aligned here; AEC3 estimates the rest
        return apm

    # ------------------------------------------------------------------
    def reference(self, pcm: np.ndarray, sample_rate: int, plays_at: float) -> None:
        """Audio handed to the speaker (any rate; resampled inside), whose
        first sample plays at monotonic time ``plays_at``."""
        x = np.asarray(pcm)
        if x.ndim != 1:
            raise ValueError(f"expected mono PCM as a 1-D array, got shape {x.shape}")
        if len(x) == 0:
            return
        if self._origin is None:
            self._origin = plays_at
        x = x.astype(np.float32)
        if self._ref is None:
            self._ref = _Timeline(int(sample_rate), self._origin, self._tolerance_s)
        elif self._ref.rate != sample_rate:  # a new rate mid-stream (rare): convert
            x = resample(x, sample_rate, self._ref.rate).astype(np.float32)
        self._ref.write(x, plays_at)
        end = self._mic_index(plays_at) + int(round(len(x) * self.sample_rate / sample_rate)) + self._delay
        tail = int(self.tail_ms * self.sample_rate / 1000)
        self._ref_active_until = max(self._ref_active_until or 0, end + tail)

    def reset(self, after: float | None = None) -> None:
        """Drop the reference (all of it, or what plays from ``after`` on).

        For a barge-in clear: the audio thrown away will never play. The
        adaptive filter is kept: the room has not changed.
        """
        if self._ref is None:
            return
        if after is None:
            self._ref = None
            self._ref_active_until = None
            return
        self._ref.drop_from(self._ref.index(after))

    # ------------------------------------------------------------------
    def process(self, frame: AudioFrame) -> AudioFrame:
        """The microphone frame with the echo removed (same rate, length, stamps)."""
        if frame.sample_rate != self.sample_rate:
            raise ValueError(f"expected {self.sample_rate} Hz microphone frames, got {frame.sample_rate}")
        started = time.perf_counter()
        mic = np.asarray(frame.pcm, dtype=np.int16)
        n = len(mic)
        if n == 0:
            return frame
        if self._origin is None:
            self._origin = frame.captured_at
        lo = self._mic_index(frame.captured_at) - n + 1
        if self._read_next is not None and abs(lo - self._read_next) <= self._tolerance_s * self.sample_rate:
            lo = self._read_next  # stamps jitter; the signal is contiguous
        self._read_next = lo + n
        ref = self._reference_for(lo - self._delay, n)
        out = self._cancel(mic, ref)
        self._measure(mic, out, lo)
        self.frames += 1
        self.process_s += time.perf_counter() - started
        return replace(frame, pcm=out)

    def _mic_index(self, t: float) -> int:
        assert self._origin is not None
        return int(round((t - self._origin) * self.sample_rate))

    def _reference_for(self, lo: int, n: int) -> np.ndarray:
        """Reference for mic samples [lo, lo + n), as int16 at the mic rate."""
        ref = self._ref
        if ref is None:
            return np.zeros(n, np.int16)
        if ref.rate == self.sample_rate:
            x = ref.read(lo, lo + n).astype(np.float64)
            keep = lo - self.sample_rate  # one second of history is plenty
        else:
            pos = np.arange(lo, lo + n) * (ref.rate / self.sample_rate)
            cutoff, half = sinc_design(ref.rate, self.sample_rate)
            first = int(math.floor(pos[0])) - half
            seg = ref.read(first, int(math.ceil(pos[-1])) + half + 1)
            x = sinc_at(seg, pos - first, cutoff, half)
            keep = first - ref.rate
        ref.forget_before(keep)
        return np.clip(np.round(x), -32768, 32767).astype(np.int16)

    def _cancel(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Run AEC3 on 10 ms blocks (a short last block is zero-padded)."""
        rtc, apm, b = self._rtc, self._apm, self._block
        out = np.empty_like(mic)
        for i in range(0, len(mic), b):
            m, r = mic[i : i + b], ref[i : i + b]
            k = len(m)
            if k < b:
                m = np.concatenate([m, np.zeros(b - k, np.int16)])
                r = np.concatenate([r, np.zeros(b - k, np.int16)])
            apm.process_reverse_stream(rtc.AudioFrame(bytearray(r.tobytes()), self.sample_rate, 1, b))
            buf = bytearray(m.tobytes())
            apm.set_stream_delay_ms(0)
            apm.process_stream(rtc.AudioFrame(buf, self.sample_rate, 1, b))
            out[i : i + k] = np.frombuffer(buf, np.int16)[:k]
        return out

    def _measure(self, mic: np.ndarray, out: np.ndarray, lo: int) -> None:
        """Echo return loss enhancement while the reference may be echoing."""
        if self._ref_active_until is None or lo >= self._ref_active_until:
            self.last_erle_db = None
            return
        e_in = float(np.dot(mic.astype(np.float64), mic)) / len(mic)
        e_out = float(np.dot(out.astype(np.float64), out)) / len(out)
        floor = 1.0  # 1 LSB RMS: nothing below that is meaningful
        self.last_erle_db = 10 * math.log10((e_in + floor) / (e_out + floor))
        a = 0.9  # about 200 ms of 20 ms frames
        self._e_in = a * self._e_in + (1 - a) * e_in
        self._e_out = a * self._e_out + (1 - a) * e_out

    @property
    def echo_active(self) -> bool:
        """Whether the last frame could hold echo (reference within tail_ms)."""
        return self.last_erle_db is not None

    @property
    def erle_db(self) -> float | None:
        """Smoothed ERLE (mic in / out energy, dB) over recent echo frames."""
        if self._e_in <= 0:
            return None
        return 10 * math.log10((self._e_in + 1.0) / (self._e_out + 1.0))

    @property
    def ms_per_frame(self) -> float:
        """Mean CPU time of :meth:`process`, ms per frame (for logs)."""
        return 1000 * self.process_s / self.frames if self.frames else 0.0
