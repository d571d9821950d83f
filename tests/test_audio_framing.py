"""Tests for audio.framing: the one framer, and everything built on it."""

from __future__ import annotations

import numpy as np
import pytest

from audio.framing import FrameAssembler, frames_from_pcm

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
