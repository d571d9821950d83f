"""The wake-word detector with the real bundled model on real speech.

The wake phrase is synthesized by the project's piper voice (loaded alone,
not the session's full model set, which would load vLLM); the non-wake
speech is the committed questions. Loud, clear, normal-speed speech is the
case any usable model must get right; noisy and odd voices are measured by
scripts/wake_eval.py, not asserted.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from pipeline.wake import WakeWordDetector, WakeWordSettings, available_models
from helpers import ROOT, load_pcm, question_files

sys.path.insert(0, str(ROOT / "scripts"))
from wake_eval import speak_piper  # noqa: E402

SILENCE = np.zeros(8000, np.int16)  # 0.5 s


@pytest.fixture(scope="module")
def voice() -> Any:
    from assistant.config import load_config
    from assistant.models import load_piper

    return load_piper(load_config())


@pytest.fixture(scope="module")
def okay_nabu(voice: Any) -> np.ndarray:
    """'Okay Nabu' at normal speed between half-seconds of silence."""
    return np.concatenate([SILENCE, speak_piper(voice, "Okay Nabu."), SILENCE, SILENCE])


@pytest.fixture(scope="module")
def detector() -> WakeWordDetector:
    return WakeWordDetector(WakeWordSettings())


def feed(detector: WakeWordDetector, pcm: np.ndarray, frame: int) -> list[int]:
    """Indices of the frames in which a detection was reported."""
    return [i for i, start in enumerate(range(0, len(pcm), frame)) if detector.process(pcm[start : start + frame])]


def test_bundled_models_and_defaults() -> None:
    assert {"okay_nabu", "hey_jarvis"} <= set(available_models())
    detector = WakeWordDetector(WakeWordSettings())
    assert detector.wake_word == "Okay Nabu"
    assert 0 < detector.threshold == detector.manifest_threshold < 1  # the manifest's cut-off
    assert WakeWordDetector(WakeWordSettings(threshold=0.5)).threshold == 0.5


def test_wakes_once_on_the_phrase(detector: WakeWordDetector, okay_nabu: np.ndarray) -> None:
    detector.reset()
    before = detector.detections
    hits = feed(detector, okay_nabu, 320)  # 20 ms frames
    assert len(hits) == 1, f"peak probability {detector.peak_probability:.3f}"
    assert detector.detections == before + 1
    assert detector.peak_probability > detector.threshold
    # The detection comes while or just after the phrase is spoken, not before.
    assert hits[0] * 320 > len(SILENCE)
    assert detector.frames > 0 and detector.cpu_s > 0 and detector.samples >= len(okay_nabu)


def test_refractory_and_reset(detector: WakeWordDetector, okay_nabu: np.ndarray) -> None:
    """Said twice within the refractory period: one wake; after reset(): wakes again."""
    detector.reset()
    twice = np.concatenate([okay_nabu[: len(okay_nabu) - 8000], okay_nabu])
    long_refractory = WakeWordDetector(WakeWordSettings(refractory_s=30.0))
    assert len(feed(long_refractory, twice, 320)) == 1
    no_refractory = WakeWordDetector(WakeWordSettings(refractory_s=0.0))
    assert len(feed(no_refractory, twice, 320)) == 2  # re-armed once the probability fell
    long_refractory.reset()
    assert long_refractory.peak_probability == 0.0
    assert len(feed(long_refractory, okay_nabu, 320)) == 1


def test_stays_asleep_on_the_questions(detector: WakeWordDetector) -> None:
    detector.reset()
    speech = np.concatenate([np.concatenate([load_pcm(p), SILENCE]) for p in question_files()])
    assert feed(detector, speech, 320) == []
    assert detector.peak_probability < detector.threshold


def test_streaming_equals_one_block(okay_nabu: np.ndarray) -> None:
    """Any cut of the stream gives the same probabilities and detections."""
    traces = []
    for frame in (len(okay_nabu), 320, 97):
        detector = WakeWordDetector(WakeWordSettings())
        probs = []
        hits = 0
        for start in range(0, len(okay_nabu), frame):
            hits += detector.process(okay_nabu[start : start + frame])
            probs.append((detector.frames, detector.last_probability))
        traces.append((hits, detector.frames, detector.peak_probability, probs[-1]))
    assert traces[0] == traces[1] == traces[2]
    assert traces[0][0] == 1


def test_unknown_model_and_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"model.*'okay_nabo'.*okay_nabu"):
        WakeWordDetector(WakeWordSettings(model="okay_nabo"))
    with pytest.raises(ValueError, match="threshold"):
        WakeWordDetector(WakeWordSettings(threshold=1.5))
    with pytest.raises(ValueError, match="int16"):
        WakeWordDetector(WakeWordSettings()).process(np.zeros(320, np.float32))
