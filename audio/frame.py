"""The audio frame and the one clock every stamp is read from.

They live in the audio layer because everything that cuts, captures or
plays audio stamps frames, below the pipeline that consumes them;
:mod:`pipeline.frames` re-exports both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = ["AudioFrame", "now", "as_pcm16", "pcm16_from_bytes"]


def now() -> float:
    """The pipeline clock: monotonic seconds. One clock for every stamp."""
    return time.monotonic()


def as_pcm16(pcm: np.ndarray) -> np.ndarray:
    """Validate mono int16 PCM (1-D); other integer/float dtypes are refused
    so a float array in [-1, 1] is never silently truncated to zeros."""
    arr = np.asarray(pcm)
    if arr.ndim != 1:
        raise ValueError(f"expected mono PCM as a 1-D array, got shape {arr.shape}")
    if arr.dtype != np.int16:
        raise ValueError(f"expected int16 PCM, got {arr.dtype}")
    return arr


def pcm16_from_bytes(data: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM of ``width`` bytes a sample as mono int16.

    For audio whose format a peer chose (a WAV file, a Wyoming client):
    8-bit is unsigned, 16/24/32-bit signed, as in WAV; channels are
    averaged. A trailing partial sample frame is dropped. Raises
    ``ValueError`` for a width or channel count it cannot read.
    """
    if width not in (1, 2, 3, 4):
        raise ValueError(f"{8 * width}-bit samples are not supported (8, 16, 24 or 32)")
    if channels < 1:
        raise ValueError(f"{channels} channels: expected at least 1")
    usable = len(data) // (width * channels) * width * channels
    raw = np.frombuffer(data, dtype=np.uint8, count=usable)
    if width == 1:
        samples = (raw.astype(np.int32) - 128) << 8
    elif width == 2:
        samples = raw.view("<i2").astype(np.int32)
    elif width == 3:  # the top two bytes of each sample, sign from the highest
        triples = raw.reshape(-1, 3)
        samples = triples[:, 1].astype(np.int32) | (triples[:, 2].astype(np.int8).astype(np.int32) << 8)
    else:
        samples = raw.view("<i4") >> 16
    if channels > 1:
        frames = samples.reshape(-1, channels).astype(np.float64)
        return np.round(frames.mean(axis=1)).astype(np.int16)
    return samples.astype(np.int16)


@dataclass(slots=True)
class AudioFrame:
    """A short block of mono PCM16 audio.

    ``captured_at`` is the monotonic time at which the *last* sample of the
    frame was available (captured by a microphone, or due at real-time pace
    for a file). ``position`` is the index of the first sample in the input
    stream, which places the frame on the input's own timeline.
    """

    pcm: np.ndarray  # int16, shape (n,)
    sample_rate: int
    captured_at: float
    position: int = 0
    turn_id: int | None = None

    @property
    def duration(self) -> float:
        return len(self.pcm) / self.sample_rate

    @property
    def end_position(self) -> int:
        return self.position + len(self.pcm)
