"""Framing: cutting audio into the pipeline's fixed-size frames, in one place.

:class:`FrameAssembler` is the one piece of code that cuts: chunks of any
size in, frames of exactly ``size`` samples out, the last partial frame
zero-padded on request. Everything that frames audio is built on it: the
microphone (device blocks on the audio thread), :class:`StreamFramer`
(the server's websocket PCM), :func:`frames_from_pcm` and
:func:`file_source` (a decoded file, at real-time pace or fast).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import numpy as np

from .frame import AudioFrame, as_pcm16, now

__all__ = ["frame_samples", "FrameAssembler", "StreamFramer", "frames_from_pcm", "file_source"]


def frame_samples(rate: int, frame_ms: int | float) -> int:
    """Samples in one frame; refuses a duration that is not a whole number of them."""
    n = rate * frame_ms / 1000
    if n <= 0 or n != int(n):
        raise ValueError(f"{frame_ms} ms at {rate} Hz is not a whole number of samples")
    return int(n)


class FrameAssembler:
    """Cuts a stream of arbitrary-sized chunks into frames of exactly ``size``.

    Used on the audio thread (device blocks, resampled blocks vary in size),
    so it copies into one preallocated buffer and only allocates the frames
    it hands out. ``position`` counts the samples handed out in frames (the
    stream index of the next frame's first sample).
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"frame size must be positive, got {size}")
        self.size = size
        self.position = 0
        self._buf = np.zeros(size, dtype=np.int16)
        self._fill = 0

    def push(self, pcm: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """Add samples; return ``(frame, samples_after)`` for each frame completed.

        ``samples_after`` counts the samples of this chunk that came after the
        frame's last sample, so the caller can back-date its capture stamp.
        """
        out: list[tuple[np.ndarray, int]] = []
        i, n = 0, len(pcm)
        while i < n:
            take = min(self.size - self._fill, n - i)
            self._buf[self._fill : self._fill + take] = pcm[i : i + take]
            self._fill += take
            i += take
            if self._fill == self.size:
                out.append((self._buf.copy(), n - i))
                self._fill = 0
                self.position += self.size
        return out

    def flush(self) -> np.ndarray | None:
        """The partial frame held, zero-padded to ``size`` (None when there is none).

        For the end of a stream: the last samples still reach the VAD.
        """
        if self._fill == 0:
            return None
        frame = np.zeros(self.size, dtype=np.int16)
        frame[: self._fill] = self._buf[: self._fill]
        self._fill = 0
        self.position += self.size
        return frame

    def reset(self) -> None:
        self._fill = 0
        self.position = 0


class StreamFramer:
    """PCM arriving in chunks of any size, as :class:`AudioFrame` s of ``frame_ms``.

    Each frame is stamped with the ``at`` of the chunk that completed it
    (for the server: when that websocket message arrived) and placed by its
    ``position`` on the stream's timeline.
    """

    def __init__(self, rate: int, frame_ms: int) -> None:
        self.rate = rate
        self._assembler = FrameAssembler(frame_samples(rate, frame_ms))

    @property
    def size(self) -> int:
        return self._assembler.size

    def push(self, pcm: np.ndarray, at: float) -> list[AudioFrame]:
        """The frames that ``pcm`` completes, stamped ``at``."""
        start = self._assembler.position
        return [
            AudioFrame(pcm=frame, sample_rate=self.rate, captured_at=at, position=start + k * self.size)
            for k, (frame, _) in enumerate(self._assembler.push(pcm))
        ]

    def end(self, at: float) -> list[AudioFrame]:
        """The end of the stream: the partial frame held, zero-padded, if any."""
        start = self._assembler.position
        tail = self._assembler.flush()
        if tail is None:
            return []
        return [AudioFrame(pcm=tail, sample_rate=self.rate, captured_at=at, position=start)]


def frames_from_pcm(pcm: np.ndarray, rate: int, frame_ms: int) -> list[np.ndarray]:
    """Split PCM into frames of ``frame_ms`` (the VAD's unit); the last is zero-padded."""
    assembler = FrameAssembler(frame_samples(rate, frame_ms))
    frames = [frame for frame, _ in assembler.push(as_pcm16(pcm))]
    tail = assembler.flush()
    return frames if tail is None else [*frames, tail]


async def file_source(
    pcm: np.ndarray, rate: int, frame_ms: int, realtime: bool = True, start: float | None = None
) -> AsyncIterator[AudioFrame]:
    """Frames of a decoded file, at real-time pace or as fast as possible.

    At real-time pace each frame is released when its last sample would have
    been captured by a microphone (``start`` plus the frame's end on the
    file's timeline), and stamped with that time; fast, it is stamped when
    released, yielding to the event loop every 25 frames.
    """
    data = as_pcm16(pcm)
    framer = StreamFramer(rate, frame_ms)
    t0 = now() if start is None else start

    def frames() -> Iterator[AudioFrame]:
        for offset in range(0, len(data), framer.size):  # one frame per push: lazily
            yield from framer.push(data[offset : offset + framer.size], t0)
        yield from framer.end(t0)

    for index, frame in enumerate(frames()):
        due = t0 + frame.end_position / rate
        if realtime:
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            frame.captured_at = due
        else:
            if index % 25 == 0:
                await asyncio.sleep(0)
            frame.captured_at = now()
        yield frame
