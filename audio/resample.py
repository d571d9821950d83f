"""Resampling: every rate change of the program's audio is done here.

* :class:`Resampler` converts a *stream* of int16 chunks between two rates
  (FFmpeg's libswresample); its state carries over between calls, so chunks
  join without clicks. Microphone, speaker, server, TTS and files use it.
* :func:`resample` and :func:`sinc_at` are a band-limited (Kaiser-windowed
  sinc) interpolator on float signals, for the echo canceller and the
  simulated room: the canceller reads its reference at *fractional*
  positions set by timestamps, which a stream resampler cannot do, and both
  need float output (echo is not clipped to int16).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any

import av
import numpy as np

from .frame import as_pcm16

__all__ = ["Resampler", "resample", "sinc_at", "sinc_design"]

_EMPTY = np.zeros(0, dtype=np.int16)


class Resampler:
    """Streaming mono int16 resampler from ``in_rate`` to ``out_rate``.

    Backed by FFmpeg's libswresample (through ``av.AudioResampler``), whose
    filter state carries over between :meth:`process` calls, so the output of
    chunks fed one by one is the same as for the whole signal at once: no
    clicks at chunk joins. :meth:`flush` returns the samples still held in
    the filter and resets it for a new stream. Equal rates pass through.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._resampler: av.AudioResampler | None = None
        self._pts = 0
        self._time_base = Fraction(1, self.in_rate)

    @property
    def identity(self) -> bool:
        return self.in_rate == self.out_rate

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Resample the next chunk; may return fewer samples (filter delay)."""
        data = as_pcm16(pcm)
        if self.identity:
            return data.copy()
        if len(data) == 0:  # an empty frame makes FFmpeg fail with ENOMEM
            return _EMPTY.copy()
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(data).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.in_rate
        frame.time_base = self._time_base
        frame.pts = self._pts
        self._pts += len(data)
        if self._resampler is None:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.out_rate)
        return self._collect(self._resampler.resample(frame))

    def flush(self) -> np.ndarray:
        """Return the tail still in the filter; the next chunk starts a new stream."""
        if self._resampler is None:
            return _EMPTY.copy()
        out = self._collect(self._resampler.resample(None))
        self.reset()
        return out

    def reset(self) -> None:
        """Drop the filter state without output (after a playback is cancelled)."""
        self._resampler = None
        self._pts = 0

    @staticmethod
    def _collect(frames: list[Any]) -> np.ndarray:
        if not frames:
            return _EMPTY.copy()
        if len(frames) == 1:
            return frames[0].to_ndarray().reshape(-1).copy()
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])



# --------------------------------------------------------------------------
# Band-limited interpolation of float signals (echo canceller, simulated room)
# --------------------------------------------------------------------------

_TAPS = 16  # half-width of the interpolation kernel, in output-rate samples
_KAISER_BETA = 8.0
_PHASES = 512  # kernel table resolution: 1/512 sample of timing error at most


@functools.lru_cache(maxsize=8)
def _kernel_table(cutoff: float, half: int) -> np.ndarray:
    """Kaiser-windowed sinc taps for ``_PHASES`` fractional offsets.

    Row ``p`` holds the weights of input samples ``base - half + 1 ..
    base + half`` for a position ``base + p / _PHASES``.
    """
    frac = np.arange(_PHASES + 1)[:, None] / _PHASES
    d = np.arange(-half + 1, half + 1)[None, :] - frac
    t = d / half
    win = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - t * t, 0.0, 1.0))) / np.i0(_KAISER_BETA)
    return 2 * cutoff * np.sinc(2 * cutoff * d) * win


def sinc_design(in_rate: int, out_rate: int) -> tuple[float, int]:
    """Low-pass ``cutoff`` (cycles per input sample) and kernel half-width for a rate change.

    The cutoff sits below the lower Nyquist frequency; the kernel widens when
    downsampling so it still spans ``_TAPS`` output samples.
    """
    cutoff = 0.45 * min(in_rate, out_rate) / in_rate
    half = int(math.ceil(_TAPS * max(1.0, in_rate / out_rate)))
    return cutoff, half


def sinc_at(x: np.ndarray, pos: np.ndarray, cutoff: float, half: int) -> np.ndarray:
    """Band-limited values of ``x`` at fractional indices ``pos``.

    A Kaiser-windowed sinc of ``2 * half`` taps, low-pass at ``cutoff``
    cycles per input sample; indices outside ``x`` read as zeros.
    """
    x = np.asarray(x, dtype=np.float64)
    table = _kernel_table(round(cutoff, 9), half)
    base = np.floor(pos).astype(np.int64)
    phase = np.rint((pos - base) * _PHASES).astype(np.int64)
    idx = base[:, None] + np.arange(-half + 1, half + 1)[None, :]
    padded = np.concatenate([np.zeros(1), x])  # index 0 stands for "outside"
    inside = (idx >= 0) & (idx < len(x))
    taps = padded[np.where(inside, idx + 1, 0)]
    return np.einsum("ij,ij->i", taps, table[phase])


def resample(pcm: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Band-limited resampling of a whole signal, float64 out (same units)."""
    x = np.asarray(pcm, dtype=np.float64)
    if in_rate == out_rate or len(x) == 0:
        return x.copy()
    n_out = int(round(len(x) * out_rate / in_rate))
    pos = np.arange(n_out) * (in_rate / out_rate)
    cutoff, half = sinc_design(in_rate, out_rate)
    return sinc_at(x, pos, cutoff, half)
