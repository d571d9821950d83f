"""Wake-word detection with the microWakeWord models bundled in pymicro-wakeword.

A kiosk listens all day but should only answer after its wake word ("okay
nabu"). :class:`WakeWordDetector` turns a stream of 16 kHz int16 audio into
"the wake word was just said" events. It is a pure, blocking detector (no
asyncio, no pipeline stages): the gate stage that owns it decides when to
listen, on which thread to run it and what a detection starts, and the tests
and ``scripts/wake_eval.py`` can drive it on files at full speed.

How the model sees audio: a TFLite Micro front end turns each 10 ms of audio
(160 samples) into one feature vector; the streaming model (it keeps internal
state between invocations) runs once every ``stride`` features (3 for the
bundled models: every 30 ms) and outputs a probability; the mean of the last
``sliding_window_size`` outputs (5: 150 ms) is compared with the cut-off. The
bundled models ship their cut-off in a JSON manifest next to the ``.tflite``
file; ``WakeWordSettings.threshold = None`` uses it.

One spoken wake phrase keeps the mean above the cut-off for several
invocations, so a detection is followed by a refractory period counted in
*audio* time (not wall time: the result does not depend on how fast the
audio is fed or how it is cut into frames) and the detector re-arms only
after the probability has fallen to half the cut-off. Half, not the cut-off
itself: during one phrase the window mean can hover around the cut-off (it
dipped to 0.85 and rose again on one CI machine), which must not count as a
second phrase.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures, Model

from audio.frame import as_pcm16

__all__ = ["SAMPLE_RATE", "WakeWordDetector", "WakeWordSettings", "available_models"]

SAMPLE_RATE = 16000
"""The only rate the models accept (the front end's filterbank is fixed)."""


def available_models() -> list[str]:
    """Names of the models bundled in the pymicro-wakeword wheel."""
    return sorted(m.value for m in Model)


@dataclass(frozen=True)
class WakeWordSettings:
    """Which bundled model, how sure it must be, how long one detection lasts.

    ``threshold=None`` takes the model's own cut-off from its manifest
    (0.85 for okay_nabu, 0.97 for hey_jarvis): the value its author tuned
    for few false wakes. ``refractory_s`` is the audio time after a detection
    during which no other detection is reported (one phrase, one event).
    """

    model: str = "okay_nabu"
    threshold: float | None = None
    refractory_s: float = 2.0


class WakeWordDetector:
    """Streaming wake-word detector over mono int16 16 kHz audio.

    Feed audio of any length with :meth:`process`; the result does not depend
    on how the stream is cut into calls. Metrics for the kiosk:
    ``detections`` (since construction), ``last_probability`` (the latest
    sliding-window probability), ``peak_probability`` (highest since the last
    :meth:`reset`), ``cpu_s`` (CPU time of this thread spent in
    :meth:`process`), ``frames`` (10 ms feature frames processed) and
    ``samples`` (audio samples fed), both since construction.
    """

    def __init__(self, settings: WakeWordSettings) -> None:
        names = available_models()
        if settings.model not in names:
            raise ValueError(
                f"wake word model {settings.model!r} (setting: model) is not bundled; "
                f"available: {', '.join(names)}"
            )
        if settings.threshold is not None and not 0.0 < settings.threshold < 1.0:
            raise ValueError(f"wake word threshold must be in (0, 1) or None, got {settings.threshold}")
        if settings.refractory_s < 0:
            raise ValueError(f"wake word refractory_s must be >= 0, got {settings.refractory_s}")
        self.settings = settings
        self._model = MicroWakeWord.from_builtin(Model(settings.model))
        self._features = MicroWakeWordFeatures()
        self.wake_word: str = self._model.wake_word
        """The phrase, as the manifest spells it (e.g. "Okay Nabu")."""
        self.manifest_threshold: float = float(self._model.probability_cutoff)
        self.threshold: float = (
            self.manifest_threshold if settings.threshold is None else float(settings.threshold)
        )
        self._refractory_frames = round(settings.refractory_s * 100)  # 10 ms frames
        self._rearm_below = self.threshold / 2  # hysteresis: see the module docstring
        self.detections = 0
        self.last_probability = 0.0
        self.peak_probability = 0.0
        self.cpu_s = 0.0
        self.frames = 0
        self.samples = 0
        self._stream_frames = 0  # feature frames since reset(): the refractory clock
        self._last_detection: int | None = None
        self._armed = True

    def process(self, pcm: np.ndarray) -> bool:
        """Feed the next audio; True if the wake word was detected in it."""
        data = as_pcm16(pcm)
        started = time.thread_time()
        detected = False
        for features in self._features.process_streaming(np.ascontiguousarray(data).tobytes()):
            self.frames += 1
            self._stream_frames += 1
            prob = self._model.process_streaming_prob(features)
            # The model runs on every stride-th feature frame; between runs
            # pymicro-wakeword returns 0.0, which is no new probability.
            if prob is None or self._stream_frames % self._model.stride:
                continue
            prob = float(prob)
            self.last_probability = prob
            self.peak_probability = max(self.peak_probability, prob)
            if prob <= self.threshold:
                if prob <= self._rearm_below:
                    self._armed = True
                continue
            quiet = (
                self._last_detection is None
                or self._stream_frames - self._last_detection >= self._refractory_frames
            )
            if self._armed and quiet:
                self._armed = False
                self._last_detection = self._stream_frames
                self.detections += 1
                detected = True
        self.samples += len(data)
        self.cpu_s += time.thread_time() - started
        return detected

    def reset(self) -> None:
        """Forget the stream (front end, model state, refractory); keep the counters.

        Called after a conversation, before listening again, so what was said
        to the assistant cannot complete a wake phrase with what comes next.
        The streaming model's internal state lives in the interpreter, so
        pymicro-wakeword reloads the model (a few ms).
        """
        self._features.reset()
        self._model.reset()
        self._stream_frames = 0
        self._last_detection = None
        self._armed = True
        self.last_probability = 0.0
        self.peak_probability = 0.0

    def close(self) -> None:
        """Free the TFLite interpreter now rather than at garbage collection."""
        self._model.close()
