"""A deterministic simulated room: what the microphone hears of the speaker.

Used by the echo-cancellation tests and the barge-in scenario benchmark to
put the assistant's own voice back into a simulated microphone, the way a
kiosk's loudspeaker does. It lives in the audio layer beside ``echo.py``
because it is plain signal processing with no dependency on the pipeline or
the application (the tests, the benchmark and a simulated live microphone
all import it).

The echo path is one impulse response, made once from a seed:

* a small loudspeaker: a 2nd-order high-pass at ``low_hz`` and a 2nd-order
  low-pass at ``high_hz`` (no bass, dull top);
* the room: nothing for ``delay_ms`` (device buffers plus the flight time),
  then the direct path, then an exponentially decaying tail of filtered
  noise (``rt60_ms``: the time the tail takes to fall by 60 dB; high
  frequencies die out faster, as in real rooms) at ``drr_db`` below the
  direct path;
* the room part (direct path + tail) scaled to energy gain ``gain_db``;
  the loudspeaker passes speech at unity gain, so speech comes out within
  about 1 dB of ``gain_db`` (the seeded tail colours it a little).

An optional loudspeaker nonlinearity (``drive``, a tanh soft clip before the
room) is off by default: a linear canceller removes it only partly (see
``audio/echo.py`` for the figure).

Streaming: :meth:`RoomEcho.play` places speaker output on the microphone's
timeline (sample index at ``sample_rate``) at any time, ahead or late, and
:meth:`RoomEcho.echo` returns the echo for any mic span, frame by frame or
all at once; both give the same samples.
"""

from __future__ import annotations

import math

import numpy as np

from .resample import resample

__all__ = ["RoomEcho"]


def _biquad(b: np.ndarray, a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Direct-form filter of a short signal (the impulse response only)."""
    y = np.zeros_like(x)
    x1 = x2 = y1 = y2 = 0.0
    for i, xi in enumerate(x):
        yi = b[0] * xi + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
        x2, x1, y2, y1 = x1, xi, y1, yi
        y[i] = yi
    return y


def _butter2(kind: str, freq: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """2nd-order Butterworth (RBJ cookbook, Q = 1/sqrt 2)."""
    w0 = 2 * math.pi * freq / rate
    alpha = math.sin(w0) / (2 * (1 / math.sqrt(2)))
    cos = math.cos(w0)
    if kind == "low":
        b = np.array([(1 - cos) / 2, 1 - cos, (1 - cos) / 2])
    else:
        b = np.array([(1 + cos) / 2, -(1 + cos), (1 + cos) / 2])
    a = np.array([1 + alpha, -2 * cos, 1 - alpha])
    return b / a[0], a / a[0]


class RoomEcho:
    """The echo of a loudspeaker at a microphone in a small room.

    ``delay_ms`` is the delay of the direct path (30-120 ms is typical of a
    sound card's buffers plus the air); ``gain_db`` the echo's level
    relative to what was played (-6 dB: mic next to the speaker, -20 dB: far
    from it); ``rt60_ms`` the reverberation time; ``seed`` fixes the tail.
    Output is float in int16 units (full scale 32768), not clipped.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        delay_ms: float = 60.0,
        gain_db: float = -10.0,
        rt60_ms: float = 200.0,
        seed: int = 0,
        *,
        drr_db: float = 3.0,
        low_hz: float = 200.0,
        high_hz: float = 6000.0,
        drive: float = 0.0,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if delay_ms < 0 or rt60_ms <= 0:
            raise ValueError("delay_ms must be >= 0 and rt60_ms > 0")
        self.sample_rate = int(sample_rate)
        self.delay_ms = float(delay_ms)
        self.gain_db = float(gain_db)
        self.rt60_ms = float(rt60_ms)
        self.drive = float(drive)
        self.delay_samples = int(round(delay_ms * sample_rate / 1000))
        self.response = self._impulse_response(seed, drr_db, low_hz, high_hz)
        self._played = np.zeros(0, np.float64)  # speaker output on the mic timeline...
        self._base = 0  # ...from this sample index on (older samples dropped)

    # ------------------------------------------------------------------
    def _impulse_response(self, seed: int, drr_db: float, low_hz: float, high_hz: float) -> np.ndarray:
        rate = self.sample_rate
        rng = np.random.default_rng(seed)
        tail_len = int(rate * self.rt60_ms / 1000)  # down 60 dB at the end
        room = np.zeros(tail_len + 1)
        room[0] = 1.0
        t = np.arange(1, tail_len + 1) / rate
        decay = np.exp(-6.9078 * t / (self.rt60_ms / 1000))
        noise = rng.standard_normal(tail_len)
        # High frequencies decay faster: a one-pole low-pass whose cutoff
        # falls along the tail (a cheap frequency-dependent absorption).
        smooth = np.empty(tail_len)
        state = 0.0
        for i in range(tail_len):
            coef = 0.15 + 0.6 * (i / tail_len)  # 0 = no smoothing
            state = coef * state + (1 - coef) * noise[i]
            smooth[i] = state
        tail = smooth * decay
        # A gap of a few ms before the first reflections arrive.
        tail[: int(0.002 * rate)] = 0.0
        tail_energy = float(np.sum(tail**2))
        if tail_energy > 0:
            tail *= math.sqrt(10 ** (-drr_db / 10) / tail_energy)
        room[1:] = tail
        room *= 10 ** (self.gain_db / 20) / math.sqrt(float(np.sum(room**2)))
        # The loudspeaker's band limit (unity gain in its pass band).
        bh, ah = _butter2("high", low_hz, rate)
        bl, al = _butter2("low", min(high_hz, 0.45 * rate), rate)
        speaker = _biquad(bl, al, _biquad(bh, ah, np.r_[1.0, np.zeros(int(0.01 * rate))]))
        return np.concatenate([np.zeros(self.delay_samples), np.convolve(speaker, room)])

    # ------------------------------------------------------------------
    def play(self, pcm: np.ndarray, sample_rate: int, at_sample: int) -> None:
        """Speaker output whose first sample plays at mic sample ``at_sample``.

        ``pcm`` is int16 (or float in int16 units) at any rate; overlapping
        audio adds up, as two sounds in one room do. Audio older than what
        :meth:`echo` has already moved past is dropped.
        """
        x = np.asarray(pcm)
        x = x.astype(np.float64) if x.dtype != np.float64 else x
        if sample_rate != self.sample_rate:
            x = resample(x, sample_rate, self.sample_rate).astype(np.float64)
        if self.drive > 0:
            x = np.tanh(self.drive * x / 32768.0) / math.tanh(self.drive) * 32768.0
        start = int(at_sample)
        if start < self._base:
            x = x[self._base - start :]
            start = self._base
        if len(x) == 0:
            return
        end = start + len(x) - self._base
        if end > len(self._played):
            self._played = np.concatenate([self._played, np.zeros(end - len(self._played))])
        self._played[start - self._base : end] += x

    def echo(self, start: int, n: int) -> np.ndarray:
        """The echo at mic samples ``[start, start + n)``, float32 in int16 units.

        Also forgets speaker output too old to reach any later span, so the
        spans must not go back in time by more than the response's length.
        """
        if n <= 0:
            return np.zeros(0, np.float32)
        h = self.response
        lo = start - len(h) + 1  # oldest played sample that reaches `start`
        seg = self._segment(lo, start + n)
        if not np.any(seg):
            out = np.zeros(n, np.float32)
        elif n <= 2048:
            out = np.convolve(seg, h, mode="valid").astype(np.float32)
        else:
            size = 1 << int(math.ceil(math.log2(len(seg) + len(h))))
            full = np.fft.irfft(np.fft.rfft(seg, size) * np.fft.rfft(h, size), size)
            out = full[len(h) - 1 : len(h) - 1 + n].astype(np.float32)
        keep_from = max(self._base, lo)
        if keep_from > self._base:  # forget what no later span can hear
            self._played = self._played[keep_from - self._base :]
            self._base = keep_from
        return out

    def _segment(self, lo: int, hi: int) -> np.ndarray:
        """Played samples [lo, hi), zeros where nothing was placed."""
        out = np.zeros(hi - lo)
        a, b = max(lo, self._base), min(hi, self._base + len(self._played))
        if b > a:
            out[a - lo : b - lo] = self._played[a - self._base : b - self._base]
        return out

    def reset(self) -> None:
        """Forget everything played (the impulse response stays)."""
        self._played = np.zeros(0, np.float64)
        self._base = 0
