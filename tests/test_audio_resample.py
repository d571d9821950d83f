"""Tests for audio.resample: the streaming Resampler."""

from __future__ import annotations

import numpy as np
import pytest

from audio.resample import Resampler
from helpers import amplitude, peak_freq, sine

# --------------------------------------------------------------------------
# Resampler
# --------------------------------------------------------------------------


def resample_in_chunks(r: Resampler, pcm: np.ndarray, sizes: list[int]) -> np.ndarray:
    out, i = [], 0
    for size in sizes:
        out.append(r.process(pcm[i : i + size]))
        i += size
    assert i >= len(pcm)
    out.append(r.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("out_rate", [16000, 48000])
def test_resampler_keeps_frequency_amplitude_and_length(out_rate: int) -> None:
    tone = sine(440, 22050, 2.0)
    r = Resampler(22050, out_rate)
    out = np.concatenate([r.process(tone), r.flush()])
    assert abs(len(out) - 2.0 * out_rate) <= 3
    middle = out[out_rate // 10 : -out_rate // 10]
    assert abs(peak_freq(middle, out_rate) - 440) < 0.5
    assert abs(amplitude(middle) - 8000) < 0.01 * 8000
    # It is the same sine, sample for sample (no delay, no phase shift).
    t = np.arange(len(out)) / out_rate
    ideal = 8000 * np.sin(2 * np.pi * 440 * t)
    assert np.max(np.abs(out[100:-100] - ideal[100:-100])) < 20


@pytest.mark.parametrize("in_rate, out_rate", [(22050, 16000), (22050, 48000), (44100, 16000), (8000, 24000)])
def test_resampler_random_chunks_join_without_clicks(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(in_rate + out_rate)
    tone = sine(440, in_rate, 1.0)
    whole = Resampler(in_rate, out_rate)
    reference = np.concatenate([whole.process(tone), whole.flush()])
    sizes = []
    while sum(sizes) < len(tone):
        sizes.append(int(rng.integers(0, 700)))  # zero-sized chunks included
    chunked = resample_in_chunks(Resampler(in_rate, out_rate), tone, sizes)
    assert abs(len(chunked) - len(reference)) <= 1
    n = min(len(chunked), len(reference))
    assert np.max(np.abs(chunked[:n].astype(int) - reference[:n])) <= 1
    # No step anywhere: the sample-to-sample change stays within the sine's slope.
    max_step = 8000 * 2 * np.pi * 440 / out_rate
    assert np.max(np.abs(np.diff(chunked[50:-50].astype(int)))) <= max_step * 1.05 + 2


def test_resampler_identity_and_flush_reset() -> None:
    pcm = np.arange(-50, 50, dtype=np.int16)
    same = Resampler(16000, 16000)
    out = same.process(pcm)
    assert np.array_equal(out, pcm) and out is not pcm and len(same.flush()) == 0
    r = Resampler(16000, 8000)
    first = np.concatenate([r.process(sine(440, 16000, 0.5)), r.flush()])
    second = np.concatenate([r.process(sine(440, 16000, 0.5)), r.flush()])
    assert np.array_equal(first, second)  # flush started a fresh stream
    assert len(r.process(np.zeros(0, dtype=np.int16))) == 0
    with pytest.raises(ValueError):
        Resampler(0, 16000)
