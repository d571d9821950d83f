"""The audio frame and the one clock every stamp is read from.

They live in the audio layer because everything that cuts, captures or
plays audio stamps frames, below the pipeline that consumes them;
:mod:`pipeline.frames` re-exports both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = ["AudioFrame", "now", "as_pcm16"]


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
