"""Voice activity detection: decides when a user turn opens and closes.

webrtcvad classifies every 10/20/30 ms frame. A turn *opens* once enough
voiced audio (``min_speech_ms``) falls in a short window, so clicks and
knocks do not open one; optionally Silero (bundled with faster-whisper) must
agree before it opens. The frames from before the onset (``preroll_ms``)
travel with :class:`SpeechStarted` so the first syllable is not cut. While
the turn is open every frame goes downstream tagged with the turn id. After
``pause_ms`` of silence the VAD announces :class:`SpeechPaused` (recognition
starts decoding the complete utterance then), and after ``silence_ms`` of
silence :class:`SpeechStopped` closes the turn.

The VAD is a detector: it measures, it does not decide. The turn controller
(:mod:`pipeline.turns`) tells it how much silence ends the current pause
(:meth:`VADStage.require_silence`, from the words heard) and whether the
assistant is speaking (:meth:`VADStage.set_assistant_speaking`: the stricter
barge-in onset applies then); whether an onset interrupts the reply is the
controller's call.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .frames import AudioFrame, SpeechPaused, SpeechResumed, SpeechStarted, SpeechStopped
from .runtime import EventBus, PipelineContext, Stage, TurnRegistry

log = logging.getLogger("pipeline.vad")


@dataclass(frozen=True)
class _OnsetRule:
    voiced: int  # voiced frames needed within the window
    window: int  # frames
    silero: float | None
    min_rms_dbfs: float | None

    @classmethod
    def of(cls, min_speech_ms: int, frame_ms: int, silero: float | None, min_rms_dbfs: float | None) -> _OnsetRule:
        return cls(
            voiced=max(1, min_speech_ms // frame_ms),
            window=max(1, int(round(min_speech_ms * 1.5 / frame_ms))),
            silero=silero,
            min_rms_dbfs=min_rms_dbfs,
        )


def _rms_dbfs(frames: list[AudioFrame]) -> float:
    """Loudness of some frames, in dB relative to full scale."""
    if not frames:
        return -120.0
    audio = np.concatenate([f.pcm for f in frames]).astype(np.float64) / 32768.0
    return float(10 * np.log10(np.mean(audio * audio) + 1e-12))


class FrameClassifier(Protocol):
    def is_speech(self, pcm: bytes, sample_rate: int) -> bool: ...


@dataclass(frozen=True)
class VADSettings:
    frame_ms: int = 20
    aggressiveness: int = 2
    min_speech_ms: int = 160
    silence_ms: int = 480
    pause_ms: int = 120
    preroll_ms: int = 300
    max_utterance_s: float = 20.0
    silero_threshold: float | None = 0.5  # None: no second opinion
    # While the assistant speaks (barge-in), stricter: more voiced audio,
    # a surer Silero, and a minimum loudness. barge_in=False: half duplex,
    # no turn opens while the assistant speaks.
    barge_in: bool = True
    barge_in_min_speech_ms: int = 200
    barge_in_silero_threshold: float | None = 0.6
    barge_in_min_rms_dbfs: float = -45.0


_SILERO_CHUNK_MS = 32  # Silero scores 512-sample chunks at 16 kHz


class SileroOpinion:
    """Silero's speech probability over a short window of 16 kHz audio."""

    CHUNK = 512

    def __init__(self) -> None:
        from faster_whisper.vad import get_vad_model

        self._model = get_vad_model()

    def probabilities(self, pcm: np.ndarray) -> np.ndarray:
        """Speech probability of each 32 ms chunk (fresh state per call)."""
        audio = pcm.astype(np.float32) / 32768.0
        pad = (-len(audio)) % self.CHUNK
        if pad:
            audio = np.concatenate([audio, np.zeros(pad, np.float32)])
        if len(audio) == 0:
            return np.zeros(0, np.float32)
        return np.asarray(self._model(audio), dtype=np.float32).ravel()

    def max_probability(self, pcm: np.ndarray) -> float:
        audio = pcm.astype(np.float32) / 32768.0
        pad = (-len(audio)) % self.CHUNK
        if pad:
            audio = np.concatenate([audio, np.zeros(pad, np.float32)])
        if len(audio) == 0:
            return 0.0
        probs = self._model(audio)
        return float(np.max(probs))


class VADStage(Stage):
    """Turns a stream of audio frames into speech turns."""

    name = "vad"

    def __init__(
        self,
        ctx: PipelineContext,
        settings: VADSettings,
        classifier: FrameClassifier | None = None,
        silero: Callable[[np.ndarray], float | np.ndarray] | None = None,
    ) -> None:
        super().__init__(ctx)
        if classifier is None:
            import webrtcvad

            classifier = webrtcvad.Vad(settings.aggressiveness)
        self.settings = settings
        self._classifier = classifier
        self._silero = silero
        self.assistant_speaking = False  # set by the turn controller
        self._required_silence: int | None = None  # this pause's, from the words
        frame_ms = settings.frame_ms
        self._preroll_frames = max(0, settings.preroll_ms // frame_ms)
        # Onset rules: (voiced frames needed, window in frames, Silero
        # threshold, minimum RMS in dBFS), normal and while the assistant speaks.
        self._normal = _OnsetRule.of(settings.min_speech_ms, frame_ms, settings.silero_threshold, None)
        self._barge = _OnsetRule.of(
            settings.barge_in_min_speech_ms, frame_ms, settings.barge_in_silero_threshold, settings.barge_in_min_rms_dbfs
        )
        window = max(self._normal.window, self._barge.window)
        # Recent frames while idle: the decision window plus the pre-roll before it.
        self._recent: deque[tuple[AudioFrame, bool]] = deque(maxlen=self._preroll_frames + window)
        self._rule = self._normal
        self.rejected_barge_ins = 0
        self.last_silero = 1.0
        self._turn_id: int | None = None
        self._last_voiced: AudioFrame | None = None
        self._silence_ms = 0
        self._paused = False
        self._opened_at_position = 0
        self._since_silero_check = 0
        self.rejected_by_silero = 0

    @property
    def in_speech(self) -> bool:
        return self._turn_id is not None

    # ---- commands from the turn controller -------------------------------

    def require_silence(self, turn_id: int, silence_ms: int | None) -> None:
        """End this pause of ``turn_id`` after ``silence_ms`` instead of the
        default (None: the default; until the voice comes back)."""
        if turn_id == self._turn_id:
            self._required_silence = silence_ms

    def set_assistant_speaking(self, speaking: bool) -> None:
        """Reply audio is playing: onsets need the barge-in thresholds."""
        self.assistant_speaking = speaking

    async def handle(self, item: Any) -> None:
        if not isinstance(item, AudioFrame):
            await self.send(item)
            return
        item = self._fit(item)
        voiced = self._classifier.is_speech(item.pcm.tobytes(), item.sample_rate)
        if self._turn_id is None:
            await self._idle(item, voiced)
        else:
            await self._speaking(item, voiced)

    def _fit(self, frame: AudioFrame) -> AudioFrame:
        """webrtcvad takes exactly 10/20/30 ms: pad or trim a stray frame."""
        size = frame.sample_rate * self.settings.frame_ms // 1000
        if len(frame.pcm) != size:
            pcm = np.zeros(size, np.int16)
            n = min(size, len(frame.pcm))
            pcm[:n] = frame.pcm[:n]
            frame.pcm = pcm
        return frame

    def _window(self) -> list[tuple[AudioFrame, bool]]:
        return list(self._recent)[-self._rule.window :]

    async def _idle(self, frame: AudioFrame, voiced: bool) -> None:
        self._recent.append((frame, voiced))
        barge = self.assistant_speaking
        if barge and not self.settings.barge_in:
            return  # half duplex: the assistant has the floor
        self._rule = self._barge if barge else self._normal
        window = self._window()
        voiced_count = sum(v for _, v in window)
        if not voiced or voiced_count < self._rule.voiced:
            return
        if self._rule.min_rms_dbfs is not None and _rms_dbfs([f for f, v in window if v]) < self._rule.min_rms_dbfs:
            return  # too quiet to be the user talking over the reply (residual echo, a blip)
        if self._second_opinion():
            if barge:
                log.info(
                    "barge-in onset at %.2f s: %d voiced frames, silero %.2f",
                    frame.position / frame.sample_rate,
                    voiced_count,
                    self.last_silero,
                )
            await self._open(barge_in=barge)
        elif barge:
            self.rejected_barge_ins += 1
            log.debug(
                "barge-in rejected at %.2f s: %d voiced frames, silero %.2f",
                frame.position / frame.sample_rate,
                voiced_count,
                self.last_silero,
            )

    def _second_opinion(self) -> bool:
        if self._silero is None or self._rule.silero is None:
            return True
        # Re-ask at most every third frame while the window stays voiced.
        if self._since_silero_check > 0:
            self._since_silero_check -= 1
            return False
        audio = np.concatenate([f.pcm for f, _ in self._window()])
        probs = np.atleast_1d(np.asarray(self._silero(audio), dtype=np.float32))
        self.last_silero = float(probs.max()) if len(probs) else 0.0
        if self._rule is self._barge:
            if self._sustained(probs):
                return True
        elif self.last_silero >= self._rule.silero:
            return True
        self.rejected_by_silero += 1
        self._since_silero_check = 2
        return False

    def _sustained(self, probs: np.ndarray) -> bool:
        """Barge-in's second opinion: speech that is *still going*.

        Silero's per-chunk (32 ms) probabilities over the window must be
        high on the latest two chunks, and high for most of
        ``barge_in_min_speech_ms``. A cough or a knock (100-200 ms) has
        ended by the time webrtcvad has heard enough voiced frames, and
        Silero scores it high on at most a few chunks, and only for some
        alignments (measured on the scenario bursts: 0-5 chunks, vs 11-13
        for the first half second of each committed question).
        """
        threshold = self._rule.silero or 0.0
        if len(probs) < 2 or probs[-2:].min() < threshold:
            return False
        needed = 0.6 * self.settings.barge_in_min_speech_ms / _SILERO_CHUNK_MS
        return int((probs >= 0.5).sum()) >= needed

    async def _open(self, barge_in: bool = False) -> None:
        turn = self.ctx.turns.new()
        self._turn_id = turn.id
        recent = list(self._recent)
        window_start = len(recent) - len(self._window())
        onset_index = next(i for i in range(window_start, len(recent)) if recent[i][1])
        onset = recent[onset_index][0]
        preroll = [f for f, _ in recent[max(0, onset_index - self._preroll_frames) :]]
        self._recent.clear()
        self._last_voiced = preroll[-1]
        self._silence_ms = 0
        self._paused = False
        self._required_silence = None
        self._opened_at_position = preroll[0].position
        for f in preroll:
            f.turn_id = turn.id
        onset_start = onset.captured_at - onset.duration
        await self.send(
            SpeechStarted(
                turn_id=turn.id,
                onset_at=onset_start,
                onset_position=onset.position,
                preroll=preroll,
                barge_in=barge_in,
            )
        )

    async def _speaking(self, frame: AudioFrame, voiced: bool) -> None:
        assert self._turn_id is not None and self._last_voiced is not None
        frame.turn_id = self._turn_id
        await self.send(frame)
        if voiced:
            self._last_voiced = frame
            self._silence_ms = 0
            self._required_silence = None  # the words go on: a new pause, a new reading
            if self._paused:
                self._paused = False
                await self.send(SpeechResumed(turn_id=self._turn_id))
        else:
            self._silence_ms += self.settings.frame_ms
        s = self.settings
        if not self._paused and self._silence_ms >= s.pause_ms:
            self._paused = True
            await self.send(SpeechPaused(turn_id=self._turn_id, last_voiced_at=self._last_voiced.captured_at))
        too_long = (frame.end_position - self._opened_at_position) / frame.sample_rate >= s.max_utterance_s
        required = s.silence_ms if self._required_silence is None else self._required_silence
        if self._silence_ms >= required or too_long:
            await self._close()

    async def _close(self) -> None:
        assert self._turn_id is not None and self._last_voiced is not None
        turn_id, last = self._turn_id, self._last_voiced
        self._required_silence = None
        self._turn_id = None
        self._last_voiced = None
        await self.send(
            SpeechStopped(turn_id=turn_id, last_voiced_at=last.captured_at, last_voiced_position=last.end_position)
        )

    async def finish(self) -> None:
        if self._turn_id is not None:
            await self._close()


async def count_turns(
    frames: AsyncIterator[AudioFrame],
    settings: VADSettings,
    silero: Callable[[np.ndarray], float | np.ndarray] | None = None,
) -> int:
    """How many user turns the VAD alone finds in some audio.

    ``converse`` uses it to answer an input that holds only silence or noise
    at once, without loading the language model.
    """
    bus = EventBus()
    vad = VADStage(PipelineContext(bus=bus, turns=TurnRegistry(bus)), settings, silero=silero)
    starts: list[SpeechStarted] = []
    bus.subscribe(lambda e: starts.append(e) if isinstance(e, SpeechStarted) else None)
    async for frame in frames:
        await vad.handle(frame)
    await vad.finish()
    return len(starts)
