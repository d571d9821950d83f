"""Tests for audio.framing: the one framer, and everything built on it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from audio.frame import AudioFrame, now
from audio.framing import FrameAssembler, StreamFramer, file_source, frames_from_pcm

# --------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------


def test_frames_from_pcm_pads_last_frame() -> None:
    pcm = np.arange(1, 701, dtype=np.int16)
    frames = frames_from_pcm(pcm, 16000, 20)
    assert [len(f) for f in frames] == [320, 320, 320]
    assert np.array_equal(np.concatenate(frames)[:700], pcm)
    assert not frames[-1][60:].any() and frames[-1][59] == 700
    assert frames_from_pcm(np.zeros(0, dtype=np.int16), 16000, 20) == []
    assert len(frames_from_pcm(np.zeros(480, dtype=np.int16), 16000, 30)) == 1
    with pytest.raises(ValueError):
        frames_from_pcm(pcm, 22050, 10)  # 220.5 samples


def test_frame_assembler_random_chunks() -> None:
    rng = np.random.default_rng(3)
    pcm = rng.integers(-1000, 1000, 10_000).astype(np.int16)
    asm = FrameAssembler(320)
    frames, i = [], 0
    while i < len(pcm):
        size = int(rng.integers(0, 900))
        chunk = pcm[i : i + size]
        for frame, after in asm.push(chunk):
            assert len(frame) == 320
            # the frame's last sample sits `after` samples before the chunk's end
            assert frame[-1] == chunk[len(chunk) - after - 1]
            frames.append(frame)
        i += size
    joined = np.concatenate(frames)
    assert len(joined) == len(pcm) // 320 * 320 and np.array_equal(joined, pcm[: len(joined)])


def test_frame_assembler_flush_pads_and_counts_position() -> None:
    asm = FrameAssembler(320)
    assert asm.flush() is None and asm.position == 0
    pcm = np.arange(1, 701, dtype=np.int16)
    frames = [f for f, _ in asm.push(pcm)]
    assert len(frames) == 2 and asm.position == 640
    tail = asm.flush()
    assert tail is not None and len(tail) == 320 and asm.position == 960
    assert np.array_equal(tail[:60], pcm[640:]) and not tail[60:].any()
    assert asm.flush() is None  # nothing held any more
    asm.push(pcm[:10])
    asm.reset()
    assert asm.position == 0 and asm.flush() is None


# --------------------------------------------------------------------------
# StreamFramer (the server's websocket PCM)
# --------------------------------------------------------------------------


def test_stream_framer_cuts_any_chunks_and_stamps_each_frame_with_its_chunk() -> None:
    rng = np.random.default_rng(5)
    pcm = rng.integers(-1000, 1000, 10_050).astype(np.int16)
    framer = StreamFramer(16000, 20)
    frames: list[AudioFrame] = []
    i, chunk_no = 0, 0
    while i < len(pcm):
        size = int(rng.integers(0, 900))
        got = framer.push(pcm[i : i + size], float(chunk_no))
        # a frame is stamped when the chunk that completed it arrived
        assert all(f.captured_at == float(chunk_no) for f in got)
        frames += got
        i += size
        chunk_no += 1
    tail = framer.end(99.0)
    assert len(tail) == 1 and tail[0].captured_at == 99.0
    frames += tail
    assert framer.end(100.0) == []  # ended once
    assert all(f.sample_rate == 16000 and len(f.pcm) == 320 for f in frames)
    assert [f.position for f in frames] == [320 * k for k in range(len(frames))]
    # the same samples as cutting the whole stream at once
    whole = frames_from_pcm(pcm, 16000, 20)
    assert len(whole) == len(frames)
    assert all(np.array_equal(a, f.pcm) for a, f in zip(whole, frames))


def test_stream_framer_frames_do_not_share_buffers() -> None:
    framer = StreamFramer(16000, 10)
    a = framer.push(np.ones(160, np.int16), 1.0)[0]
    b = framer.push(np.full(160, 2, np.int16), 2.0)[0]
    assert a.pcm.sum() == 160 and b.pcm.sum() == 320 and b.position == 160
    with pytest.raises(ValueError):
        StreamFramer(22050, 10)  # 220.5 samples


# --------------------------------------------------------------------------
# file_source
# --------------------------------------------------------------------------


async def collect(source: Any) -> list[tuple[AudioFrame, float]]:
    """Each frame with the clock reading when it was released."""
    return [(frame, now()) async for frame in source]


def test_file_source_fast_gives_every_sample_padded_and_stamped_in_order() -> None:
    pcm = np.arange(1, 3001, dtype=np.int16)  # 9.375 frames of 20 ms
    before = now()
    got = asyncio.run(collect(file_source(pcm, 16000, 20, realtime=False)))
    frames = [f for f, _ in got]
    assert [f.position for f in frames] == [320 * k for k in range(10)]
    assert all(len(f.pcm) == 320 and f.sample_rate == 16000 and f.turn_id is None for f in frames)
    assert np.array_equal(np.concatenate([f.pcm for f in frames])[:3000], pcm)
    assert not frames[-1].pcm[120:].any()
    stamps = [f.captured_at for f in frames]
    assert stamps == sorted(stamps) and before <= stamps[0] and stamps[-1] <= now()
    assert all(f.captured_at <= released for f, released in got)
    assert asyncio.run(collect(file_source(np.zeros(0, np.int16), 16000, 20, realtime=False))) == []


def test_file_source_realtime_releases_each_frame_when_its_last_sample_is_due() -> None:
    pcm = np.zeros(1600, dtype=np.int16)  # 100 ms: 5 frames of 20 ms
    start = now() + 0.02
    got = asyncio.run(collect(file_source(pcm, 16000, 20, realtime=True, start=start)))
    assert len(got) == 5
    for k, (frame, released) in enumerate(got):
        due = start + (k + 1) * 0.02
        assert frame.captured_at == due  # stamped with the due time, not when released
        assert frame.position == 320 * k
        assert released >= due


def test_file_source_refuses_float_pcm() -> None:
    with pytest.raises(ValueError, match="int16"):
        asyncio.run(collect(file_source(np.zeros(320, np.float32), 16000, 20, realtime=False)))


# --------------------------------------------------------------------------
# A session's fed input (what a websocket client sends) uses the framer
# --------------------------------------------------------------------------


def test_fed_input_cuts_client_pcm_into_numbered_frames_and_pads_the_last() -> None:
    from assistant.session import FedInput

    async def main() -> list[AudioFrame]:
        fed = FedInput(16000, 16000, 20)
        pcm = np.arange(1, 1001, dtype=np.int16)
        before = now()
        for part in (pcm[:100], pcm[100:700], pcm[700:]):  # odd-sized websocket messages
            fed.feed(part, now())
        fed.end()
        frames = [f async for f in fed.frames()]
        assert all(before <= f.captured_at <= now() for f in frames)
        assert np.array_equal(np.concatenate([f.pcm for f in frames])[:1000], pcm)
        return frames

    frames = asyncio.run(main())
    assert [f.position for f in frames] == [0, 320, 640, 960]
    assert all(len(f.pcm) == 320 and f.sample_rate == 16000 for f in frames)
    assert not frames[-1].pcm[40:].any()


def test_held_input_reaches_no_frame_and_is_taken_whole() -> None:
    """A manual turn: the client's audio is held (resampled once), then taken as one buffer."""
    from assistant.session import FedInput

    async def main() -> tuple[np.ndarray, np.ndarray, list[AudioFrame]]:
        fed = FedInput(24000, 16000, 20)
        fed.hold(True)
        tone = (8000 * np.sin(np.arange(24000) * 2 * np.pi * 440 / 24000)).astype(np.int16)
        for part in np.array_split(tone, 7):
            fed.feed(part, now())
        first = fed.take()
        fed.feed(tone[:2400], now())
        fed.clear()
        second = fed.take()
        fed.end()
        return first, second, [f async for f in fed.frames()]

    first, second, frames = asyncio.run(main())
    assert abs(len(first) - 16000) <= 1  # one second at the pipeline's rate, the resampler's tail included
    assert np.abs(first[1000:15000]).max() > 7000
    assert len(second) == 0 and frames == []
