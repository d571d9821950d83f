"""The audio frame and the one clock every stamp is read from.

They live in the audio layer because everything that cuts, captures or
plays audio stamps frames, below the pipeline that consumes them;
:mod:`pipeline.frames` re-exports both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = ["AudioFrame", "now"]


def now() -> float:
    """The pipeline clock: monotonic seconds. One clock for every stamp."""
    return time.monotonic()


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
