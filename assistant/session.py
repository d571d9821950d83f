"""One conversation: a pipeline of stages over the shared models.

A :class:`Session` owns everything per-conversation (turn registry, the
conversation history, stage state, the report) and borrows the models from
:class:`~assistant.models.Models`. Audio comes from any async iterator of
:class:`~pipeline.frames.AudioFrame` (a file at real-time pace, a
microphone, later a websocket) and reply audio goes to an
:class:`~pipeline.playback.AudioOutput`.

The per-turn report (:class:`~pipeline.report.TurnReport`, REPORT.json)
reads the milestone and span table of :mod:`pipeline.metrics`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np

from pipeline.asr import ASRStage, WhisperTranscriber
from pipeline.chunker import ChunkerStage
from pipeline.frames import END, AudioFrame, BudgetExceeded, Event, SpeechStarted, now
from pipeline.llm import Conversation, LLMStage
from pipeline.playback import AudioOutput, PlaybackStage
from pipeline.report import TurnReport
from pipeline.runtime import (
    EventBus,
    PipelineContext,
    Stage,
    TurnRegistry,
    Watchdog,
    budgets_of,
    connect,
    run_stages,
)
from pipeline.tts import PiperSynthesizer, TTSStage
from pipeline.turntaking import Floor, TurnTaking
from pipeline.vad import EndpointRule, VADSettings, VADStage

from .audio_io import Resampler
from .config import Config
from .models import Models

if TYPE_CHECKING:
    from pipeline.echo import EchoCanceller

log = logging.getLogger("assistant.session")

_session_ids = itertools.count(1)


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


async def file_source(
    pcm: np.ndarray, rate: int, frame_ms: int, realtime: bool = True, start: float | None = None
) -> AsyncIterator[AudioFrame]:
    """Frames of a decoded file, at real-time pace or as fast as possible.

    At real-time pace each frame is released when its last sample would have
    been captured by a microphone, and stamped with that time.
    """
    size = rate * frame_ms // 1000
    t0 = now() if start is None else start
    for index, offset in enumerate(range(0, len(pcm), size)):
        chunk = pcm[offset : offset + size]
        if len(chunk) < size:
            chunk = np.concatenate([chunk, np.zeros(size - len(chunk), np.int16)])
        due = t0 + (offset + size) / rate
        if realtime:
            delay = due - now()
            if delay > 0:
                await asyncio.sleep(delay)
            captured = due
        else:
            if index % 25 == 0:
                await asyncio.sleep(0)
            captured = now()
        yield AudioFrame(pcm=chunk, sample_rate=rate, captured_at=captured, position=offset)


def vad_settings(config: Config, with_silero: bool) -> VADSettings:
    """The VAD's settings from the config (one place for every user of it)."""
    v = config.vad
    b = config.barge_in
    return VADSettings(
        barge_in=b.enabled,
        barge_in_min_speech_ms=b.min_speech_ms,
        barge_in_silero_threshold=b.silero_threshold if with_silero else None,
        barge_in_min_rms_dbfs=b.min_rms_dbfs,
        frame_ms=config.audio.frame_ms,
        aggressiveness=v.aggressiveness,
        min_speech_ms=v.min_speech_ms,
        silence_ms=v.silence_ms,
        pause_ms=v.pause_ms,
        preroll_ms=v.preroll_ms,
        max_utterance_s=v.max_utterance_s,
        silero_threshold=v.silero.threshold if with_silero else None,
    )


def count_speech_turns(pcm: np.ndarray, config: Config) -> int:
    """How many user turns the VAD finds in a decoded file (no other model).

    ``converse`` uses it to answer an input that holds only silence or noise
    at once, without loading the language model.
    """
    from pipeline.vad import SileroOpinion

    v = config.vad
    silero = SileroOpinion().max_probability if v.silero.enabled else None
    bus = EventBus()
    ctx = PipelineContext(bus=bus, turns=TurnRegistry(bus))
    vad = VADStage(ctx, vad_settings(config, silero is not None), silero=silero)
    starts: list[Event] = []
    bus.subscribe(lambda e: starts.append(e) if isinstance(e, SpeechStarted) else None)

    async def scan() -> None:
        async for frame in file_source(pcm, config.audio.input_rate, config.audio.frame_ms, realtime=False):
            await vad.handle(frame)
        await vad.finish()

    asyncio.run(scan())
    return len(starts)


# --------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------


class Session:
    """One conversation through the full pipeline."""

    def __init__(
        self,
        models: Models,
        config: Config,
        output: AudioOutput,
        session_id: str | None = None,
        realtime: bool = True,
        echo_canceller: EchoCanceller | None = None,
    ) -> None:
        self.id = session_id or f"s{next(_session_ids)}"
        # False for input fed faster than real time: its clock is
        # compressed, so budgets are still measured and reported but their
        # policies would act on meaningless deadlines, and turn-taking (who
        # speaks when) has no meaning: every turn is answered in order.
        self.realtime = realtime
        self.enforce_budgets = realtime
        # Removes the assistant's own voice from the input (a loudspeaker and
        # a microphone in one room); whoever plays the audio feeds it the
        # playback reference.
        self.echo_canceller = echo_canceller
        self.config = config
        self.models = models
        self.output = output
        bus = EventBus()
        self.ctx = PipelineContext(bus=bus, turns=TurnRegistry(bus))
        self.origin = now()
        self.watchdog = Watchdog(bus, budgets_of(config), self._on_budget_exceeded)
        self.report = TurnReport(bus, self.origin, config.audio.output_rate, self.watchdog)
        self._acknowledged: set[int] = set()
        observe = getattr(output, "observe", None)
        if observe is not None:
            bus.subscribe(observe)
        a = config.asr
        self.conversation = Conversation(config.llm.system_prompt, config.llm.history_tokens, models.llm.count_tokens)
        self.floor = Floor()
        self.stages: list[Stage] = [
            VADStage(
                self.ctx,
                vad_settings(config, models.silero is not None),
                silero=models.silero.probabilities if models.silero is not None else None,
                floor=self.floor if realtime else None,
            ),
            ASRStage(
                self.ctx,
                WhisperTranscriber(models.whisper, beam_size=a.beam_size, language=a.language, window_s=a.window_s),
                models.asr_executor,
                sample_rate=config.audio.input_rate,
                partial_interval_ms=a.partial_interval_ms,
                min_partial_audio_ms=a.min_partial_audio_ms,
                final_at_pause=a.final_at_pause,
                endpoint=EndpointRule(config.vad.complete_silence_ms, config.vad.incomplete_silence_ms),
            ),
            LLMStage(self.ctx, models.llm, self.conversation, self.id),
            ChunkerStage(
                self.ctx,
                first_min_words=config.chunker.first_min_words,
                first_max_words=config.chunker.first_max_words,
                min_words=config.chunker.min_words,
                max_words=config.chunker.max_words,
            ),
            TTSStage(
                self.ctx,
                PiperSynthesizer(models.piper, config.tts.length_scale),
                models.tts_executor,
                config.audio.output_rate,
                Resampler,
            ),
            PlaybackStage(self.ctx, output, self.floor),
        ]
        connect(self.ctx, self.stages)
        self.turn_taking = TurnTaking(
            self.ctx,
            self.floor,
            self.playback,
            self.conversation.record_heard,
            barge_in=config.barge_in.enabled and realtime,
            hold=realtime,
        )

    @property
    def playback(self) -> PlaybackStage:
        return next(s for s in self.stages if isinstance(s, PlaybackStage))

    def _on_budget_exceeded(self, event: BudgetExceeded) -> None:
        """Apply a stage's budget policy, the moment its deadline passes."""
        turn_id = event.turn_id
        if turn_id is None or not self.enforce_budgets:
            return
        rate = self.config.audio.output_rate
        budgets = self.config.budgets
        if event.policy == "commit_partial":
            self.asr.force_final(turn_id)
        elif event.policy == "acknowledge":
            turn = self.ctx.turns.get(turn_id)
            if turn_id in self._acknowledged or turn is None or turn.cancelled or self.playback.has_started(turn_id):
                return
            self._acknowledged.add(turn_id)
            self.playback.interject(turn_id, self.models.phrase(budgets.acknowledgement, rate))
        elif event.policy == "cancel":
            if self.cancel_turn(turn_id, f"over the {event.stage} budget ({event.budget_ms:.0f} ms)"):
                self.playback.interject(turn_id, self.models.phrase(budgets.apology, rate))

    @property
    def asr(self) -> ASRStage:
        return next(s for s in self.stages if isinstance(s, ASRStage))

    @property
    def tts(self) -> TTSStage:
        return next(s for s in self.stages if isinstance(s, TTSStage))

    @property
    def bus(self) -> EventBus:
        return self.ctx.bus

    def cancel_turn(self, turn_id: int, reason: str = "cancelled") -> bool:
        return self.ctx.cancel_turn(turn_id, reason)

    async def run(self, source: AsyncIterator[AudioFrame]) -> None:
        """Feed the source through the pipeline; return when every turn is done."""
        first = self.stages[0]

        async def feed() -> None:
            try:
                async for frame in source:
                    if self.echo_canceller is not None:
                        frame = self.echo_canceller.process(frame)
                    await first.inbox.put(frame)
            finally:
                await first.inbox.put(END)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(run_stages(self.stages), name=f"{self.id}:stages")
                group.create_task(feed(), name=f"{self.id}:feed")
        finally:
            self.watchdog.close()
